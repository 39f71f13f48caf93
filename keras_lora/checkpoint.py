"""save_adapter / load_adapter: one adapter of a model as a small directory.

Only adapter-sized data is written (the files are described in
`keras_lora.checkpoint_format`): each adapted layer's two factors (and DoRA
magnitude), and the
weights the adapter's config trained besides them (the layers in `train`, the
biases `bias` chose), never the frozen base weights. Loading checks every key,
shape and dtype against the model before changing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import keras
from keras import ops

from keras_lora.adapter_state import (
    adapter_snapshot,
    config_for_layers,
    describes,
    exact,
    inferred_training,
    replace_adapter,
    restore_adapter,
    trained_weights,
)
from keras_lora.adapters import (
    check_model,
    lora_layers,
    record_config,
    recorded_config,
    refresh_optimizer,
    reset_traced_functions,
    trainable_ids,
)
from keras_lora.checkpoint_format import (
    FORMAT_VERSION,
    adapter_keys,
    problems_error,
    read_directory,
    write_directory,
)
from keras_lora.checkpoint_match import (
    problems,
    saved_settings,
    snapshot_flags,
    variable_at,
)
from keras_lora.config import LoraConfig
from keras_lora.convert import convert, unload
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import original_base_state
from keras_lora.version import __version__
from keras_lora.walk import walk


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
    holders = _holders(model, adapter)
    config = adapter_config(model, adapter)
    sites = walk(model)
    tensors, records, saved = {}, [], {}
    for path, layer in holders.items():
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
        "config": _config_dict(config, list(holders)),
        "layers": records,
        "train": train_paths,
        "weights": list(weights),
    }
    write_directory(directory, document, tensors)


def load_adapter(
    model: keras.Model, directory: str | os.PathLike, adapter_name: str | None = None
) -> keras.Model:
    """Loads an adapter `save_adapter` wrote into `model`.

    Into a plain model, it converts the model as the adapter was (its saved
    layer paths, ranks, alphas, `bias` and `train`), then loads the weights;
    as with `convert`, treat the model passed in as consumed. Into a LoRA
    model, it adds the adapter, inactive until `keras_lora.set_adapter` names
    it, or replaces the adapter of that name (which keeps its active state).
    The weights of `train` layers and of biases are shared by all adapters:
    loading them overwrites the model's.

    Every key, shape and dtype is checked before anything is converted or
    assigned.

    Args:
        model: a plain Keras model with the base weights, or a LoRA model.
        directory: an adapter directory.
        adapter_name: the name to load the adapter under; `None` means the
            saved name.

    Returns:
        The LoRA model: a new model for a plain Sequential or Functional
        model, `model` itself otherwise.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: listing every problem: a missing or unreadable file, an
            unknown format version, a layer missing from the model or of
            another type, other shapes, missing or extra tensors. The model is
            left unchanged.

    Example:

    >>> lora_model = keras_lora.load_adapter(build_base_model(), "adapters/task-a")
    """
    check_model(model)
    document, tensors = read_directory(directory)
    name = document["adapter_name"] if adapter_name is None else adapter_name
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            "`adapter_name` must be a non-empty string without '/', or None for "
            f"the saved name. Received: adapter_name={adapter_name!r}"
        )
    sites = walk(model)
    found = problems(model, sites, document, tensors, name)
    if found:
        raise problems_error(
            f"Cannot load the adapter in {os.fspath(directory)!r} into model "
            f"'{model.name}'",
            found,
        )
    lora = lora_layers(model)
    if lora:
        return _load_into_lora(model, lora, document, tensors, name)
    return _load_into_plain(model, document, tensors, name)


def adapter_config(model: keras.Model, adapter_name: str = "default") -> LoraConfig:
    """Returns the `LoraConfig` that describes an adapter of a LoRA model.

    That is the config `convert` or `add_adapter` created it with, while it
    still matches the layers. Otherwise (a model loaded from a `.keras` file,
    or an adapter changed layer by layer) it is rebuilt from the layers:
    `targets` lists their exact paths, `rank_pattern` and `alpha_pattern` hold
    per-layer deviations, and `bias` and `train` are read from which
    variables are trainable (best effort: a `.keras` file keeps which layers
    train, not which of their variables do, so `bias` is then at least
    `"lora_only"`, and `save_adapter` keeps the adapted layers' biases).

    Args:
        model: a LoRA model.
        adapter_name: the adapter.

    Returns:
        A `LoraConfig`.

    Raises:
        ValueError: if no layer of the model has the adapter.

    Example:

    >>> keras_lora.adapter_config(lora_model).rank
    8
    """
    holders = _holders(model, adapter_name)
    settings = {
        path: layer.adapters[adapter_name].settings() for path, layer in holders.items()
    }
    recorded = recorded_config(model, adapter_name)
    if recorded is not None and describes(recorded, settings):
        return recorded
    bias, train = inferred_training(model, walk(model))
    # A `.keras` file keeps which layers train, not which of their variables
    # do, so whether adapted layers' biases trained is unknown: keep them.
    bias = "lora_only" if bias == "none" else bias
    return config_for_layers(settings, adapter_name, bias=bias, train=train)


def _load_into_plain(model, document, tensors, name):
    settings = saved_settings(document)
    config = config_for_layers(
        settings,
        name,
        bias=document["config"].get("bias", "none"),
        train=[exact(path) for path in document["train"]],
    )
    restore_flags = snapshot_flags(model)
    new_model = convert(model, config)
    undo = []
    try:
        layers = lora_layers(new_model)
        for path, layer_settings in settings.items():
            if layers[path].adapters[name].settings() != layer_settings:
                replace_adapter(layers[path], name, layer_settings)
        _assign(_pairs(new_model, layers, document, tensors, name), undo)
    except Exception:
        for step in reversed(undo):
            step()
        unload(new_model)
        restore_flags()
        raise
    record_config(new_model, _saved_config(document, name) or config)
    reset_traced_functions(new_model)
    return new_model


def _load_into_lora(model, lora, document, tensors, name):
    settings = saved_settings(document)
    trainable = trainable_ids(model)
    undo = []
    try:
        for path, layer_settings in settings.items():
            layer = lora[path]
            if name not in layer.adapters:
                layer.add_adapter(name, **layer_settings)
                undo.append(functools.partial(layer.delete_adapter, name))
            elif layer.adapters[name].settings() != layer_settings:
                old = adapter_snapshot(layer, name)
                replace_adapter(layer, name, layer_settings)
                undo.append(functools.partial(replace_adapter, layer, name, *old))
        for path, layer in lora.items():
            if path not in settings and name in layer.adapters:
                old = adapter_snapshot(layer, name)
                layer.delete_adapter(name)
                undo.append(functools.partial(restore_adapter, layer, name, *old))
        _assign(_pairs(model, lora, document, tensors, name), undo)
    except Exception:
        for step in reversed(undo):
            step()
        raise
    config = _saved_config(document, name) or config_for_layers(settings, name)
    record_config(model, config)
    reset_traced_functions(model)
    # Replacing an active adapter gives it new variables.
    refresh_optimizer(model, trainable)
    return model


def _pairs(model, layers, document, tensors, name):
    """`(variable, value)` for every tensor of the file, in `model`."""
    pairs = []
    for path, settings in saved_settings(document).items():
        parameters = layers[path].adapters[name].parameters
        keys = adapter_keys(path, settings["use_dora"])
        pairs += [(parameters[part], tensors[key]) for part, key in keys.items()]
    sites = walk(model)
    pairs += [(variable_at(sites, key), tensors[key]) for key in document["weights"]]
    return pairs


def _assign(pairs, undo) -> None:
    for variable, value in pairs:
        undo.append(functools.partial(variable.assign, ops.convert_to_numpy(variable)))
        variable.assign(ops.cast(value, variable.dtype))


def _saved_config(document, name) -> LoraConfig | None:
    with contextlib.suppress(TypeError, ValueError):
        return LoraConfig.from_dict({**document["config"], "adapter_name": name})
    return None


def _config_dict(config: LoraConfig, paths: list[str]) -> dict:
    try:
        return config.to_dict()
    except ValueError:
        # A callable (or unregistered class) target cannot be saved; the
        # exact paths select the same layers.
        targets = [exact(path) for path in paths]
        return dataclasses.replace(config, targets=targets, exclude=None).to_dict()


def _holders(model, adapter_name) -> dict[str, LoraLayer]:
    check_model(model)
    layers = lora_layers(model)
    holders = {
        path: layer for path, layer in layers.items() if adapter_name in layer.adapters
    }
    if not holders:
        known = sorted(
            {name for layer in layers.values() for name in layer.adapter_names}
        )
        raise ValueError(
            f"No LoRA layer of model '{model.name}' has an adapter named "
            f"{adapter_name!r}. Adapters of the model: {known}. "
            f"Received: adapter={adapter_name!r}"
        )
    return holders


def _float32(variable):
    return ops.convert_to_numpy(ops.cast(variable, "float32"))
