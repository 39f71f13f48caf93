"""save_adapter(): one adapter of a model as a small directory (the files are
described in `format.py`): each adapted layer's factors (and DoRA magnitude)
and the weights its config trains besides them, never the frozen base weights.
"""

from __future__ import annotations

import dataclasses
import os

import keras
from keras import ops

from keras_lora.adapters import check_model
from keras_lora.checkpoint.describe import config_for_layers, config_of, exact, holders
from keras_lora.checkpoint.format import FORMAT_VERSION, adapter_keys, write_directory
from keras_lora.config import LoraConfig
from keras_lora.freezing import trained_weights
from keras_lora.layers.initialization import original_base_state
from keras_lora.tree.walk import walk
from keras_lora.version import __version__


def save_adapter(
    model: keras.Model,
    directory: str | os.PathLike,
    adapter: str = "default",
    for_original_base: bool = False,
) -> None:
    """Saves one adapter of a LoRA model as `adapter_config.json` and
    `adapter.safetensors` in `directory`.

    The directory is written to a temporary name next to `directory` and
    renamed into place, replacing a previous adapter there: an interrupted
    save leaves the previous adapter (or nothing), never a half-written one.

    Args:
        model: a LoRA model.
        directory: the adapter directory; new, or holding an adapter.
        adapter: the name of the adapter to save.
        for_original_base: for an adapter whose init replaced the base kernel
            by a residual (`"pissa"`, `"pissa_niter_K"`, `"olora"`), write an
            adapter that applies the same update to the original base kernel
            instead: rank `2r`, factors `[A, A_0]` and `[B, -B_0]` (peft's
            `path_initial_model_for_weight_conversion`), loadable onto the
            original model next to other adapters. The model is unchanged.

    Raises:
        TypeError: if `model` is not a Keras model, or `for_original_base` not
            a bool.
        ValueError: if no layer has the adapter, `directory` holds other
            files, or `for_original_base=True` for an adapter whose init left
            the base kernel as it was.

    Example:

    >>> keras_lora.save_adapter(lora_model, "adapters/task-a")
    >>> sorted(os.listdir("adapters/task-a"))
    ['adapter.safetensors', 'adapter_config.json']
    """
    if not isinstance(for_original_base, bool):
        raise TypeError(
            "`for_original_base` must be a bool. "
            f"Received: for_original_base={for_original_base!r}"
        )
    check_model(model)
    sites = walk(model)
    layers = holders(model, sites, adapter, argument="adapter")
    config = config_of(model, sites, layers, adapter)
    tensors, records, saved = {}, [], {}
    for path, layer in layers.items():
        state = layer.adapters[adapter]
        settings, parameters = state.settings(), state.parameters
        if for_original_base:
            settings, parameters = original_base_state(layer, state)
        saved[path] = settings
        records.append(
            {
                "path": path,
                "wrapper": keras.saving.get_registered_name(type(layer)),
                **settings,
            }
        )
        for name, key in adapter_keys(path, settings["use_dora"]).items():
            tensors[key] = _float32(parameters[name])
    if for_original_base:
        config = config_for_layers(saved, adapter, config.bias, config.train)
    train_paths, weights = trained_weights(sites, config)
    tensors.update({key: _float32(variable) for key, variable in weights.items()})
    document = {
        "format_version": FORMAT_VERSION,
        "keras_lora_version": __version__,
        "adapter_name": adapter,
        "config": _config_dict(config, list(layers)),
        "layers": records,
        "train": train_paths,
        "weights": list(weights),
    }
    write_directory(directory, document, tensors)


def _config_dict(config: LoraConfig, paths: list[str]) -> dict:
    try:
        return config.to_dict()
    except ValueError:
        # A callable (or unregistered class) target cannot be saved; the
        # exact paths select the same layers.
        targets = [exact(path) for path in paths]
        return dataclasses.replace(config, targets=targets, exclude=None).to_dict()


def _float32(variable):
    return ops.convert_to_numpy(ops.cast(variable, "float32"))
