"""keras-hub, found without importing it.

keras-hub is optional and slow to import, and a keras-hub model or layer can
only exist once it is imported; so keras_lora looks it up in `sys.modules` and
never imports it (`tests/layers/test_reversible_embedding.py` checks).
"""

from __future__ import annotations

import sys
import types


def imported_keras_hub(submodule: str) -> types.ModuleType | None:
    """`keras_hub.<submodule>` if keras-hub is imported, else `None`.

    Args:
        submodule: the name of a keras-hub submodule, like `"models"`.

    Returns:
        The submodule, or `None` when keras-hub is not imported.
    """
    return getattr(sys.modules.get("keras_hub"), submodule, None)
