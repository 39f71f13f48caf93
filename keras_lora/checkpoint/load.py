"""load_adapter(): an adapter directory into a plain model (its saved plan is
applied) or into a LoRA model (the adapter of that name is added or replaced).
Every key, shape and dtype is checked (`match.py`) before the model changes,
and a failure after that undoes every step.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from keras_lora.adapters import check_model, record_config
from keras_lora.checkpoint.describe import config_for_layers, exact
from keras_lora.checkpoint.format import (
    adapter_keys,
    layer_settings,
    problems_error,
    read_directory,
)
from keras_lora.checkpoint.match import problems, variable_at
from keras_lora.config import LoraConfig
from keras_lora.convert import unload
from keras_lora.freezing import snapshot_flags, trainable_change
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import deferred_initialization
from keras_lora.layers.settings import AdapterSettings
from keras_lora.plan import Plan, apply
from keras_lora.tree.walk import Site, walk


def load_adapter(
    model: keras.Model, directory: str | os.PathLike, adapter_name: str | None = None
) -> keras.Model:
    """Loads an adapter `save_adapter` wrote into `model`.

    Into a plain model, it converts the model as the adapter was (its saved
    layer paths and per-layer settings, `bias` and `train`), then loads the
    weights; as with `convert`, treat the model passed in as consumed. Into a
    LoRA model, it adds the adapter, inactive until `keras_lora.set_adapter`
    names it, or replaces the adapter of that name (which keeps its active
    state). The weights of `train` layers and of biases are shared by all
    adapters: loading them overwrites the model's.

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
    check_adapter_name(name, adapter_name, "the saved name")
    summary = f"Cannot load the adapter in {os.fspath(directory)!r}"
    return load_document(model, walk(model), document, tensors, name, summary)


def check_adapter_name(name: Any, adapter_name: Any, none_means: str) -> None:
    """Refuses an adapter name that is not a layer-name-like string.

    Args:
        name: the name the adapter would load under.
        adapter_name: the argument as the caller passed it, for the message.
        none_means: what `adapter_name=None` stands for, for the message.

    Raises:
        ValueError: if `name` is not a non-empty string without "/".
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            "`adapter_name` must be a non-empty string without '/', or None for "
            f"{none_means}. Received: adapter_name={adapter_name!r}"
        )


def load_document(
    model: keras.Model,
    sites: Mapping[str, Site],
    document: dict,
    tensors: Mapping,
    name: str,
    summary: str,
) -> keras.Model:
    """Loads an adapter read from files (a checked `adapter_config.json`
    document and its tensors) into `model` as adapter `name`: every problem
    (`match.problems`) first, then into a plain model or a LoRA model.

    Args:
        model: the model to load into.
        sites: its `walk()`.
        document: the adapter document.
        tensors: its tensors by file key.
        name: the adapter name.
        summary: the start of the error message, naming the files.

    Returns:
        The LoRA model.

    Raises:
        ValueError: listing every problem; the model is left unchanged.
    """
    found = problems(model, sites, document, tensors, name)
    if found:
        raise problems_error(f"{summary} into model '{model.name}'", found)
    lora = {p: s.layer for p, s in sites.items() if isinstance(s.layer, LoraLayer)}
    if lora:
        return _load_into_lora(model, sites, lora, document, tensors, name)
    return _load_into_plain(model, sites, document, tensors, name)


def _load_into_plain(model, sites, document, tensors, name):
    saved = _saved_settings(document)
    planned = Plan(
        name,
        # In walk order, the order in which `convert` wraps.
        {
            path: AdapterSettings.from_dict(saved[path])
            for path in sites
            if path in saved
        },
        bias=document["config"].get("bias", "none"),
        train=tuple(document["train"]),
    )
    restore_flags = snapshot_flags(model, sites)
    with trainable_change(model) as change:
        new_model = apply(model, planned, sites)
        new_sites = walk(new_model)
        lora = {path: new_sites[path].layer for path in saved}
        undo = []
        try:
            _assign(_pairs(new_sites, lora, document, tensors, name), undo)
        except Exception:
            # Trained weights are the base model's own variables.
            for step in reversed(undo):
                step()
            unload(new_model)
            restore_flags()
            raise
        train = [exact(path) for path in planned.train]
        config = _saved_config(document, name) or config_for_layers(
            saved, name, planned.bias, train
        )
        record_config(new_model, config)
        change.model = new_model
    return change.model


def _load_into_lora(model, sites, lora, document, tensors, name):
    saved = _saved_settings(document)
    undo = []
    # Replacing an active adapter gives it new variables.
    with trainable_change(model):
        try:
            for path, settings in saved.items():
                layer = lora[path]
                if name not in layer.adapters:
                    layer.add_adapter(name, **settings)
                    undo.append(functools.partial(layer.delete_adapter, name))
                elif layer.adapters[name].settings() != settings:
                    old = _snapshot(layer, name)
                    _replace(layer, name, settings)
                    undo.append(functools.partial(_replace, layer, name, *old))
            for path, layer in lora.items():
                if path not in saved and name in layer.adapters:
                    old = _snapshot(layer, name)
                    layer.delete_adapter(name)
                    undo.append(functools.partial(_restore, layer, name, *old))
            _assign(_pairs(sites, lora, document, tensors, name), undo)
        except Exception:
            for step in reversed(undo):
                step()
            raise
        config = _saved_config(document, name) or config_for_layers(saved, name)
        record_config(model, config)
    return model


def _saved_settings(document) -> dict[str, dict]:
    """The adapter settings of each saved layer, by path."""
    return {record["path"]: layer_settings(record) for record in document["layers"]}


def _pairs(sites, lora, document, tensors, name):
    """`(variable, value)` for every tensor of the file; `lora` holds the
    model's LoRA layers by path."""
    pairs = []
    for path, settings in _saved_settings(document).items():
        parameters = lora[path].adapters[name].parameters
        keys = adapter_keys(path, settings["use_dora"])
        pairs += [(parameters[part], tensors[key]) for part, key in keys.items()]
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


def _snapshot(layer: LoraLayer, adapter_name: str) -> tuple:
    """`(settings, values by parameter name, active adapters)` of an adapter,
    what `_restore` needs to recreate it."""
    adapter = layer.adapters[adapter_name]
    values = {
        name: ops.convert_to_numpy(variable)
        for name, variable in adapter.parameters.items()
    }
    return adapter.settings(), values, list(layer.active_adapters)


def _replace(layer, adapter_name, settings, values=None, active=None) -> None:
    """Replaces an adapter by a new one of that name with `settings` (and
    parameter `values`), then activates `active` (`None`: those active now)."""
    active = list(layer.active_adapters) if active is None else active
    placeholder = None
    if layer.adapter_names == (adapter_name,):
        # A layer cannot lose its last adapter, even for a moment.
        placeholder = f"{adapter_name}_replaced"
        with deferred_initialization():
            layer.add_adapter(placeholder, **layer.adapters[adapter_name].settings())
    layer.delete_adapter(adapter_name)
    _restore(layer, adapter_name, settings, values, active)
    if placeholder is not None:
        layer.delete_adapter(placeholder)


def _restore(layer, adapter_name, settings, values, active) -> None:
    """Adds an adapter with `settings` and parameter `values` (`None`: fresh),
    then activates `active`: the inverse of `delete_adapter`."""
    # The values (or the file loaded next) are the factors; a computed init
    # must not run again on a kernel it already rewrote.
    with deferred_initialization():
        layer.add_adapter(adapter_name, **settings)
    if values is not None:
        parameters = layer.adapters[adapter_name].parameters
        for name, value in values.items():
            parameters[name].assign(value)
    layer.set_adapter(active)
