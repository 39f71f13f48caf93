"""save_peft_adapter(): one adapter of a keras-hub LoRA model as a peft LoRA
adapter directory, for the transformers model of the same checkpoint.

Each module's factors are `A = lora_a.reshape(-1, r).T` and
`B = lora_b.reshape(r, -1).T` (the inverse of `load`'s layout). A module of
several layers (GPT-2's `c_attn`) becomes one adapter of rank
`r_q + r_k + r_v`: `A` the stacked `A`s, `B` block-diagonal with each block
times its layer's scale, and the module's scale 1 (zero blocks for a layer
without the adapter). A layer whose init rewrote its kernel (PiSSA, OLoRA)
saves the rank-`2r` adapter for the original kernel (`original_base_state`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter

import keras
import numpy as np
from keras import ops

from keras_lora.adapters import check_model
from keras_lora.checkpoint.describe import config_of, holders
from keras_lora.freezing import trained_weights
from keras_lora.hub_lookup import imported_keras_hub
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import original_base_state
from keras_lora.layers.settings import AdapterSettings, rewrites_kernel
from keras_lora.peft_adapters.families import family_of, module_paths
from keras_lora.peft_adapters.files import (
    KEY_PREFIX,
    MAGNITUDE_KEY,
    write_peft_directory,
)
from keras_lora.tree.walk import walk


def save_peft_adapter(
    model: keras.Model,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> None:
    """Saves one adapter of a keras-hub LoRA model as a Hugging Face peft
    LoRA adapter.

    Stock peft loads the directory onto the transformers model of the
    checkpoint the keras-hub model was built from
    (`peft.PeftModel.from_pretrained(hf_model, directory)`), with no missing or
    unexpected key, and computes the same outputs. The files are written to a
    temporary name beside `directory` and renamed into place.

    Module names are those of the transformers causal-LM model
    (`model.layers.0.self_attn.q_proj`); `target_modules` names the adapted
    modules (their short names when every layer's are adapted), and
    `rank_pattern` / `alpha_pattern` hold per-module ranks and alphas.

    Args:
        model: a keras-hub LoRA model (backbone or task model) of a family
            `load_peft_adapter` supports.
        directory: the adapter directory; new, or holding a peft adapter.
        adapter_name: the adapter to save.
        base_model_name_or_path: written to `adapter_config.json`, where peft
            and vLLM look for the base model (a hub id or a directory).

    Raises:
        TypeError: if `model` is not a Keras model, or
            `base_model_name_or_path` is not a string or `None`.
        ValueError: if the model is not of a supported family, no layer has
            the adapter, a layer with the adapter is not a module peft can
            adapt, the adapter trains weights besides its factors (`bias`,
            `train`), its layers mix DoRA and plain LoRA, or `directory`
            holds other files.

    Example:

    >>> keras_lora.save_peft_adapter(lora_lm, "peft/llama-qa",
    ...                              base_model_name_or_path="meta-llama/Llama-3.2-1B")
    """
    check_model(model)
    if base_model_name_or_path is not None and not isinstance(
        base_model_name_or_path, str
    ):
        raise TypeError(
            "`base_model_name_or_path` must be a string or None. Received: "
            f"base_model_name_or_path={base_model_name_or_path!r}"
        )
    family, backbone = family_of(model)
    sites = walk(model)
    layers = holders(model, sites, adapter_name)
    _, weights = trained_weights(sites, config_of(model, sites, layers, adapter_name))
    if weights:
        raise ValueError(
            f"Adapter {adapter_name!r} trains weights besides its factors "
            f"({sorted(weights)}); a peft adapter file holds LoRA factors only. "
            "Convert with bias='none' and no `train` to save it for peft."
        )
    paths = module_paths(family, backbone, sites)
    outside = sorted(set(layers) - {path for ps in paths.values() for path in ps})
    if outside:
        raise ValueError(
            f"Layers {outside} hold adapter {adapter_name!r} but are no module "
            f"peft adapts in a {family.name} model; delete the adapter there "
            "(`LoraLayer.delete_adapter`) to save the rest for peft."
        )
    modules = {
        module: _module(sites, layer_paths, layers, adapter_name)
        for module, layer_paths in paths.items()
        if any(path in layers for path in layer_paths)
    }
    if len({module.use_dora for module in modules.values()}) > 1:
        raise ValueError(
            f"Adapter {adapter_name!r} is DoRA on some layers and not on others; "
            "peft's `use_dora` holds for every module of an adapter."
        )
    config, tensors = _peft_files(family, paths, modules)
    config |= {
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
    }
    write_peft_directory(directory, config, tensors)


@dataclasses.dataclass(frozen=True)
class _Module:
    """One module's adapter in peft's layout: `a` `(r, in)`, `b` `(out, r)`,
    `magnitude` `(out,)` or `None`, and the settings giving its scale."""

    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None
    settings: AdapterSettings

    @property
    def use_dora(self) -> bool:
        return self.settings.use_dora

    def alpha(self, use_rslora: bool) -> float:
        """The `lora_alpha` that gives this module's scale under `use_rslora`."""
        if use_rslora == self.settings.use_rslora:
            return self.settings.alpha
        rank = self.settings.rank
        return self.settings.scale * (math.sqrt(rank) if use_rslora else rank)


def _module(sites, layer_paths, layers, adapter_name) -> _Module:
    """A module's adapter from its layers' (see the module docstring)."""
    states = [_layer_state(layers.get(path), adapter_name) for path in layer_paths]
    if len(states) == 1:
        return states[0]
    missing = [path for path in layer_paths if path not in layers]
    if missing and any(state.use_dora for state in states if state):
        raise ValueError(
            f"DoRA adapter {adapter_name!r} on a fused module needs all of its "
            f"layers adapted; {missing} are not"
        )
    fan_in = next(state.a.shape[1] for state in states if state)
    blocks = [
        state
        if state is not None
        else _Module(
            np.zeros((0, fan_in), np.float32),
            np.zeros((_fan_out(sites[path].layer, fan_in), 0), np.float32),
            None,
            AdapterSettings(rank=1),
        )
        for path, state in zip(layer_paths, states, strict=True)
    ]
    rank = sum(block.a.shape[0] for block in blocks)
    b = np.zeros((sum(block.b.shape[0] for block in blocks), rank), np.float32)
    row = column = 0
    for block in blocks:
        rows, columns = block.b.shape
        b[row : row + rows, column : column + columns] = block.settings.scale * block.b
        row, column = row + rows, column + columns
    first = next(state for state in states if state is not None)
    magnitude = None
    if first.use_dora:
        magnitude = np.concatenate([block.magnitude for block in blocks])
    settings = AdapterSettings(
        rank=rank, alpha=rank, dropout=first.settings.dropout, use_dora=first.use_dora
    )
    a = np.concatenate([block.a for block in blocks])
    return _Module(a, b, magnitude, settings)


def _layer_state(layer, adapter_name) -> _Module | None:
    """One LoRA layer's adapter in peft's layout; `None` without a layer."""
    if layer is None:
        return None
    adapter = layer.adapters[adapter_name]
    settings, parameters = adapter.settings(), adapter.parameters
    if rewrites_kernel(settings["init"]):
        settings, parameters = original_base_state(layer, adapter)
    values = {
        name: ops.convert_to_numpy(ops.cast(value, "float32"))
        for name, value in parameters.items()
    }
    rank = settings["rank"]
    magnitude = values.get("lora_magnitude_vector")
    return _Module(
        values["lora_a"].reshape(-1, rank).T,
        values["lora_b"].reshape(rank, -1).T,
        None if magnitude is None else magnitude.reshape(-1),
        AdapterSettings.from_dict(settings),
    )


def _fan_out(layer, fan_in) -> int:
    """The output size of a layer without the adapter."""
    base = layer.layer if isinstance(layer, LoraLayer) else layer
    return math.prod(base.kernel.shape) // fan_in


def _peft_files(family, paths, modules) -> tuple[dict, dict[str, np.ndarray]]:
    """`adapter_config.json`'s document and the tensors, by peft's key."""
    use_rslora = _most_common(m.settings.use_rslora for m in modules.values())
    ranks = {name: module.settings.rank for name, module in modules.items()}
    alphas = {name: _number(m.alpha(use_rslora)) for name, m in modules.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(m.settings.dropout for m in modules.values()),
        "use_rslora": use_rslora,
        "use_dora": next(iter(modules.values())).use_dora,
        "target_modules": _target_modules(paths, modules),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "fan_in_fan_out": family.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    tensors = {}
    for name, module in modules.items():
        key = f"{KEY_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(module.a)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(module.b)
        if module.magnitude is not None:
            tensors[f"{key}.{MAGNITUDE_KEY}"] = np.ascontiguousarray(module.magnitude)
    return config, tensors


def _target_modules(paths, modules) -> list[str]:
    """The shortest name suffixes that select exactly the adapted modules
    (`["q_proj", "v_proj"]`), else every adapted module's full name."""
    adapted = set(modules)
    for depth in (1, 2):
        suffixes = {_suffix(name, depth) for name in adapted}
        if {name for name in paths if _suffix(name, depth) in suffixes} == adapted:
            return sorted(suffixes)
    return sorted(adapted)


def _suffix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[-depth:])


def _number(value: float) -> int | float:
    """`8` for `8.0`: peft's own configs hold integer alphas."""
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _task_type(model) -> str | None:
    task_class = imported_keras_hub("models").CausalLM
    return "CAUSAL_LM" if isinstance(model, task_class) else None
