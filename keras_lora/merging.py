"""Model-level merge and unmerge: every LoRA layer, all or nothing.

`keras_lora.merge_and_unload` and `keras_lora.unload` (in `convert.py`) also
drop the wrappers; a layer's own merge is `layers/merging.py`.
"""

from __future__ import annotations

import keras

from keras_lora.adapters import require_lora_layers
from keras_lora.compiled_state import reset_traced_functions


def merge(
    model: keras.Model, adapter_names: list[str] | None = None, safe: bool = False
) -> None:
    """Folds the adapters into the base weights of every LoRA layer.

    Args:
        model: a LoRA model.
        adapter_names: adapters to merge; `None` means each layer's active ones.
        safe: check every merged kernel is finite before writing it.

    Raises:
        ValueError: if the model has no LoRA layer, a layer is already merged
            or has its adapters disabled, a name is not an adapter of every
            layer, a base is quantized, or (`safe=True`) a merged kernel would
            not be finite. Every layer is checked before any kernel changes,
            so the model is left exactly as it was.

    Example:

    >>> keras_lora.merge(lora_model)
    """
    layers = require_lora_layers(model)
    _check_merge(model, layers, adapter_names, safe)
    done = []
    try:
        for layer in layers.values():
            layer.merge(adapter_names, safe=safe)
            done.append(layer)
    except Exception:
        for layer in reversed(done):
            layer.unmerge()
        raise
    reset_traced_functions(model)


def unmerge(model: keras.Model) -> None:
    """Subtracts the merged adapters from the base weights of every LoRA layer.

    Args:
        model: a merged LoRA model.

    Raises:
        ValueError: if the model has no LoRA layer or is not merged.

    Example:

    >>> keras_lora.merge(lora_model)
    >>> keras_lora.unmerge(lora_model)
    """
    layers = require_lora_layers(model)
    unmerged = [path for path, layer in layers.items() if not layer.merged]
    if unmerged:
        raise ValueError(
            f"Model '{model.name}' is not merged; layers {unmerged} have nothing "
            "to unmerge."
        )
    for layer in layers.values():
        layer.unmerge()
    reset_traced_functions(model)


def _check_merge(model, layers, adapter_names, safe) -> None:
    """Refuses a merge that would fail part-way, before any kernel changes:
    unmerging the layers merged before a failure subtracts what was added,
    which does not give back the kernels bit for bit."""
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"Layers {merged} of model '{model.name}' are already merged. Call "
            "`keras_lora.unmerge(model)` first."
        )
    disabled = [path for path, layer in layers.items() if not layer.adapters_enabled]
    if disabled:
        raise ValueError(
            f"Layers {disabled} of model '{model.name}' have their adapters "
            "disabled; merge outside `keras_lora.disable_adapters`."
        )
    if adapter_names is not None:
        lacking = [
            path
            for path, layer in layers.items()
            if not set(adapter_names) <= set(layer.adapter_names)
        ]
        if lacking:
            raise ValueError(
                "`adapter_names` must name adapters of every LoRA layer; layers "
                f"{lacking} lack some. Received: adapter_names={adapter_names!r}"
            )
    for layer in layers.values():
        layer.merged_kernel(adapter_names, safe=safe)
