"""keras_lora: LoRA (low-rank adaptation) for Keras 3 models.

Entry points: `convert` (and `unload`, `merge_and_unload`), model-level adapter
functions (`adapters.py`, `merging.py`, `combination.py`), adapter files
(`checkpoint`), Hugging Face peft adapters (`peft_adapters`) and `export`. The
wrappers are in `layers/`; `tree/` (paths, rebuilding, private Keras API) and
the other modules are internals.
"""

from keras_lora.adapters import (
    adapter_per_example,
    add_adapter,
    delete_adapter,
    disable_adapters,
    lora_layers,
    set_adapter,
)
from keras_lora.checkpoint import adapter_config, load_adapter, save_adapter
from keras_lora.combination import add_weighted_adapter
from keras_lora.config import LoraConfig
from keras_lora.convert import convert, merge_and_unload, unload
from keras_lora.distribution import add_adapter_layouts
from keras_lora.export import export, export_per_example
from keras_lora.layers import (
    LoraConv1D,
    LoraConv2D,
    LoraConv3D,
    LoraDense,
    LoraEinsumDense,
    LoraEmbedding,
    LoraLayer,
    LoraReversibleEmbedding,
    register_wrapper,
)
from keras_lora.merging import merge, unmerge
from keras_lora.peft_adapters import load_peft_adapter, save_peft_adapter
from keras_lora.summary import print_trainable_parameters, trainable_parameters
from keras_lora.version import __version__

__all__ = [
    "LoraConfig",
    "LoraConv1D",
    "LoraConv2D",
    "LoraConv3D",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "LoraLayer",
    "LoraReversibleEmbedding",
    "__version__",
    "adapter_config",
    "adapter_per_example",
    "add_adapter",
    "add_adapter_layouts",
    "add_weighted_adapter",
    "convert",
    "delete_adapter",
    "disable_adapters",
    "export",
    "export_per_example",
    "load_adapter",
    "load_peft_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "register_wrapper",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
