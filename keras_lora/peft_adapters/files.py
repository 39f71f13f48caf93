"""peft's LoRA adapter directory: what its two files hold, which of its
settings keras_lora maps, and how it is read and written.

```
adapter_config.json        peft's LoraConfig: peft_type "LORA", r, lora_alpha,
                           use_rslora, use_dora, lora_dropout, target_modules,
                           rank_pattern, alpha_pattern, fan_in_fan_out, ...
adapter_model.safetensors  "base_model.model.<module>.lora_A.weight"  (r, in)
                           "base_model.model.<module>.lora_B.weight"  (out, r)
                           "base_model.model.<module>.lora_magnitude_vector"
                           (out,), DoRA only
```

`<module>` is the module's name in the transformers model peft wrapped; the
adapter's name is not part of the key. A module's scale is
`alpha / r` (`alpha / sqrt(r)` with `use_rslora`), its `r` and `alpha` those
of the first key of `rank_pattern` / `alpha_pattern` that matches its name,
else `r` and `lora_alpha`.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from keras_lora.checkpoint.format import (
    problems_error,
    read_json,
    read_tensors,
    replace_directory,
    write_json,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# The `LoraAdapter.parameters` name of each key suffix. peft 0.21 writes DoRA's
# magnitude without ".weight"; a key with it loads too.
PARTS = {
    "lora_A.weight": "lora_a",
    "lora_B.weight": "lora_b",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
}
MAGNITUDE_KEY = "lora_magnitude_vector"
# peft inits that rewrite the base weights: their adapters hold for the
# residual model peft saves beside them, not for the original checkpoint.
RESIDUAL_INITS = ("pissa", "olora", "corda", "eva", "loftq")
# peft features that change what an adapter computes beyond LoRA's update on
# a Linear; none of them maps onto keras_lora's wrappers.
_UNMAPPED = (
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "megatron_config",
)


def read_peft_directory(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Reads a peft LoRA adapter directory and refuses what keras_lora cannot
    map.

    Args:
        directory: a directory peft's `save_pretrained` wrote.

    Returns:
        `(config, modules)`: the `adapter_config.json` document, and each
        module's arrays by `LoraAdapter.parameters` name
        (`{"model.layers.0.self_attn.q_proj": {"lora_a": A, "lora_b": B}}`,
        in peft's layouts, float32).

    Raises:
        ValueError: listing every problem: a missing or unreadable file, a
            setting keras_lora does not map (another `peft_type`, `bias`,
            `modules_to_save`, a residual init, ...), a key that is not a LoRA
            factor, or a module without both factors.
    """
    root = os.fspath(directory)
    if not os.path.isdir(root):
        raise ValueError(
            "`directory` is not a peft adapter directory: it does not exist or "
            f"is not a directory. Received: directory={directory!r}"
        )
    problems = []
    config = read_json(os.path.join(root, CONFIG_FILE), problems)
    weights = os.path.join(root, WEIGHTS_FILE)
    if not os.path.isfile(weights) and os.path.isfile(
        os.path.join(root, "adapter_model.bin")
    ):
        problems.append(
            "the adapter is saved as adapter_model.bin (a torch pickle), which "
            "keras_lora does not read; save it again with peft's "
            "`save_pretrained(..., safe_serialization=True)`"
        )
        tensors = None
    else:
        tensors = read_tensors(weights, problems)
    if config is not None:
        problems.extend(config_problems(config))
    modules = {}
    if tensors is not None:
        modules = _modules(tensors, problems)
    if problems:
        raise problems_error(f"Cannot load the peft adapter in {root!r}", problems)
    return config, modules


def config_problems(config: Any) -> list[str]:
    """Why keras_lora cannot map an `adapter_config.json` document (none: `[]`).

    Args:
        config: the parsed JSON.

    Returns:
        A list of problem descriptions.
    """
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} does not hold a JSON object"]
    if config.get("peft_type") != "LORA":
        return [
            f"peft_type is {config.get('peft_type')!r}; keras_lora maps LoRA "
            "adapters (peft_type 'LORA') only"
        ]
    problems = []
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
            problems.append(f"{key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            problems.append(f"{key} must be an object, got {config[key]!r}")
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r} trains the biases, which a peft adapter "
            "file holds outside its LoRA factors; keras_lora maps bias='none' "
            "only"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={config['modules_to_save']!r} holds whole "
            "trained modules; keras_lora maps LoRA factors only"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        problems.append(
            f"init_lora_weights={init!r} rewrote the base weights: the adapter "
            "holds for peft's residual model, not for the original checkpoint; "
            "convert it in peft with `save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)`"
        )
    problems += [
        f"{key}={config[key]!r} is a peft feature keras_lora does not map"
        for key in _UNMAPPED
        if config.get(key)
    ]
    return problems


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first key of `patterns` that matches `module`, as
    peft's `get_pattern_key` (the key, a regular expression, matches the end of
    the name at a dot), or `default`.

    Args:
        patterns: a `rank_pattern` or `alpha_pattern`.
        module: a module name.
        default: the value when no key matches.

    Returns:
        The value.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_peft_directory(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
) -> None:
    """Writes a peft adapter directory, all or nothing.

    Args:
        directory: the directory to (re)place; new or holding a peft adapter.
        config: the `adapter_config.json` document.
        tensors: the float32 arrays by key.

    Raises:
        ValueError: if `directory` is a file, or holds other files.
    """

    def write(staging):
        # transformers' and peft's readers expect the metadata torch writes.
        safetensors.numpy.save_file(
            tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"}
        )
        write_json(os.path.join(staging, CONFIG_FILE), config)

    replace_directory(directory, (CONFIG_FILE, WEIGHTS_FILE), write)


def _modules(tensors, problems) -> dict[str, dict[str, np.ndarray]]:
    """The tensors by module and part; unknown keys noted in `problems`."""
    modules = {}
    for key, value in tensors.items():
        part = next((p for p in PARTS if key.endswith(f".{p}")), None)
        if not key.startswith(KEY_PREFIX) or part is None:
            problems.append(
                f"tensor {key!r} is not a LoRA factor of a Linear module "
                f"('{KEY_PREFIX}<module>.lora_A.weight', '.lora_B.weight' or "
                "'.lora_magnitude_vector')"
            )
            continue
        module = key[len(KEY_PREFIX) : -len(part) - 1]
        modules.setdefault(module, {})[PARTS[part]] = value.astype(np.float32)
    for module, parts in modules.items():
        missing = [name for name in ("lora_a", "lora_b") if name not in parts]
        if missing:
            problems.append(f"module {module!r} lacks {missing}")
        elif parts["lora_a"].ndim != 2 or parts["lora_b"].ndim != 2:
            problems.append(
                f"module {module!r} has factors of shapes {parts['lora_a'].shape} "
                f"and {parts['lora_b'].shape}; a Linear's are (r, in) and (out, r)"
            )
        elif parts["lora_a"].shape[0] != parts["lora_b"].shape[1]:
            problems.append(
                f"module {module!r} has lora_A of rank {parts['lora_a'].shape[0]} "
                f"and lora_B of rank {parts['lora_b'].shape[1]}"
            )
    return modules
