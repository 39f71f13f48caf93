"""Model-level adapter state: add, set, delete, disable, per-example routing.

Every function takes the model first and applies to all of its LoRA layers, all
or nothing, then drops the model's traced functions (`compiled_state.py`).
Merging is `merging.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import keras

from keras_lora.compiled_state import reset_traced_functions
from keras_lora.config import LoraConfig
from keras_lora.freezing import trainable_change
from keras_lora.layers.adapter_routing import adapter_routing, route, routing_of
from keras_lora.layers.base import LoraLayer
from keras_lora.targets import select
from keras_lora.tree.walk import walk


def lora_layers(model: keras.Model) -> dict[str, LoraLayer]:
    """The LoRA layers of `model`, by path.

    Args:
        model: a Keras model.

    Returns:
        A dict of path (`"block_0/self_attention/query"`) to `LoraLayer`.

    Example:

    >>> list(keras_lora.lora_layers(lora_model))
    ['dense', 'dense_1']
    """
    return {
        path: site.layer
        for path, site in walk(model).items()
        if isinstance(site.layer, LoraLayer)
    }


@contextlib.contextmanager
def disable_adapters(model: keras.Model) -> Iterator[keras.Model]:
    """Context manager in which `model` computes its base outputs.

    Args:
        model: an unmerged LoRA model.

    Yields:
        The model.

    Raises:
        ValueError: if the model has no LoRA layer or is merged.

    Example:

    >>> with keras_lora.disable_adapters(lora_model):
    ...     base_outputs = lora_model(x)
    """
    layers = require_lora_layers(model)
    _check_unmerged(model, layers, "disable adapters")
    previous = {path: layer.adapters_enabled for path, layer in layers.items()}
    for layer in layers.values():
        layer.disable_adapters()
    reset_traced_functions(model)
    try:
        yield model
    finally:
        for path, layer in layers.items():
            if previous[path]:
                layer.enable_adapters()
        reset_traced_functions(model)


@contextlib.contextmanager
def adapter_per_example(
    model: keras.Model,
    adapter_names: list[str] | tuple[str, ...],
    adapter_index=None,
) -> Iterator[keras.Model]:
    """Context manager in which each example of a batch uses its own adapter.

    Inside the block, each example gets what the model gives it alone with its
    adapter active (peft's `adapter_names=`); `"__base__"` (or index `-1`)
    gives the base model's output. Each routed adapter runs on the whole batch,
    masked to its examples. For inference only; to trace (`tf.function`,
    `jax.jit`), enter the block inside the traced function, as
    `keras_lora.export_per_example` does.

    Args:
        model: an unmerged LoRA model.
        adapter_names: with `adapter_index=None`, one adapter name per example
            (`"__base__"` for none); otherwise the adapter names the index
            refers to, each once.
        adapter_index: `None`, or integers of shape `(batch,)` (a list, NumPy
            array or tensor, symbolic inside a traced function): example `i`
            uses `adapter_names[adapter_index[i]]`, `-1` the base model.

    Yields:
        The model.

    Raises:
        TypeError: if `model` is not a Keras model, `adapter_names` is not a
            list of strings, or `adapter_index` is not integer.
        ValueError: if the model has no LoRA layer or is already routed; if a
            LoRA layer is merged, has its adapters disabled, lacks a named
            adapter or would use DoRA; if `adapter_index` has a value outside
            `[-1, len(adapter_names))`; nothing is changed then. Inside the
            block, a call in training or on a batch of another size raises
            `ValueError`.

    Example:

    >>> with keras_lora.adapter_per_example(
    ...     lora_model, ["task_a", "__base__", "task_b"]
    ... ):
    ...     y = lora_model(x[:3])
    >>> names = ["task_a", "task_b"]
    >>> with keras_lora.adapter_per_example(lora_model, names, [1, -1, 0]):
    ...     y = lora_model(x[:3])
    """
    layers = require_lora_layers(model)
    routing = adapter_routing(adapter_names, adapter_index)
    routed = [path for path, layer in layers.items() if routing_of(layer)]
    if routed:
        raise ValueError(
            f"Layers {routed} of model '{model.name}' are already routed by "
            "an enclosing `keras_lora.adapter_per_example` block; route a "
            "model with one block at a time."
        )
    for layer in layers.values():
        routing.check(layer)
    for layer in layers.values():
        route(layer, routing)
    reset_traced_functions(model)
    try:
        yield model
    finally:
        for layer in layers.values():
            route(layer, None)
        reset_traced_functions(model)


def add_adapter(model: keras.Model, adapter_name: str, config: LoraConfig) -> None:
    """Adds a new, inactive adapter to the LoRA layers `config` selects.

    `config.targets` selects among the model's LoRA layers (by their paths, or
    by the class of the layer they wrap); `None` selects all of them. Rank and
    alpha follow `config.rank_pattern` and `config.alpha_pattern`.

    Args:
        model: a LoRA model.
        adapter_name: the new adapter's name.
        config: the new adapter's settings (`config.adapter_name` is ignored).

    Raises:
        TypeError: if `config` is not a `LoraConfig`.
        ValueError: if the name exists, or a target matches no LoRA layer; no
            layer gets the adapter then.

    Example:

    >>> keras_lora.add_adapter(lora_model, "task_b", keras_lora.LoraConfig(rank=4))
    >>> keras_lora.set_adapter(lora_model, "task_b")
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"`config` must be a keras_lora.LoraConfig. Received: config={config!r}"
        )
    layers = require_lora_layers(model)
    existing = [
        path for path, layer in layers.items() if adapter_name in layer.adapters
    ]
    if existing:
        raise ValueError(
            f"Layers {existing} already have an adapter named '{adapter_name}'. "
            f"Received: adapter_name={adapter_name!r}"
        )
    bases = {path: layer.layer for path, layer in layers.items()}
    selected = select(bases, config.targets, config.exclude, require_wrapper=False)
    added = []
    try:
        for path in selected:
            settings = config.adapter_settings(path)
            layers[path].add_adapter(adapter_name, **settings.to_dict())
            added.append(layers[path])
    except Exception:
        for layer in added:
            layer.delete_adapter(adapter_name)
        raise
    record_config(model, dataclasses.replace(config, adapter_name=adapter_name))
    reset_traced_functions(model)


def set_adapter(model: keras.Model, adapter_names: str | list[str]) -> None:
    """Activates the named adapter(s) in every LoRA layer that has them.

    Only active adapters train. If the model is compiled, its optimizer (built
    for the previously trainable variables) is replaced by a new one of the
    same config, as recompiling would do, so `fit` and `save` keep working.

    Args:
        model: an unmerged LoRA model.
        adapter_names: a name or a list of names.

    Raises:
        ValueError: if no layer has one of the names, or the model is merged.

    Example:

    >>> keras_lora.set_adapter(lora_model, "task_b")
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = require_lora_layers(model)
    _check_unmerged(model, layers, "set the adapter")
    check_adapter_names(model, layers, "adapter_names", names, adapter_names)
    with trainable_change(model, switched=layers):
        for layer in layers.values():
            own = [name for name in names if name in layer.adapters]
            if own:
                layer.set_adapter(own)


def delete_adapter(model: keras.Model, adapter_name: str) -> None:
    """Deletes an adapter from every LoRA layer that has it.

    Args:
        model: an unmerged LoRA model.
        adapter_name: the adapter to delete.

    Raises:
        ValueError: if no layer has it, it is the last adapter of a layer, or
            the model is merged.

    Example:

    >>> keras_lora.delete_adapter(lora_model, "task_b")
    """
    layers = require_lora_layers(model)
    _check_unmerged(model, layers, "delete an adapter")
    holding = {
        path: layer for path, layer in layers.items() if adapter_name in layer.adapters
    }
    if not holding:
        raise ValueError(
            f"No LoRA layer of model '{model.name}' has an adapter named "
            f"'{adapter_name}'. Received: adapter_name={adapter_name!r}"
        )
    last = [path for path, layer in holding.items() if len(layer.adapter_names) == 1]
    if last:
        raise ValueError(
            f"'{adapter_name}' is the last adapter of layers {last}; use "
            "`keras_lora.unload(model)` to drop LoRA entirely."
        )
    with trainable_change(model):
        for layer in holding.values():
            layer.delete_adapter(adapter_name)
        _CONFIGS.get(model, {}).pop(adapter_name, None)


def check_model(model) -> None:
    """Raises `TypeError` unless `model` is a `keras.Model`.

    Args:
        model: the value passed as `model`.

    Raises:
        TypeError: if it is not a Keras model.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )


def check_adapter_names(model, layers, argument: str, names, received) -> None:
    """Refuses an empty `names` or one no LoRA layer of `model` holds.

    Args:
        model: the model, for the message.
        layers: its LoRA layers, path to layer.
        argument: the argument's name, for the message.
        names: the adapter names to check.
        received: the argument as the caller passed it, for the message.

    Raises:
        ValueError: if `names` is empty or holds an unknown name.
    """
    known = {name for layer in layers.values() for name in layer.adapter_names}
    if not names or any(name not in known for name in names):
        raise ValueError(
            f"`{argument}` must name adapters of model '{model.name}': "
            f"{sorted(known)}. Received: {argument}={received!r}"
        )


def require_lora_layers(model: keras.Model) -> dict[str, LoraLayer]:
    """Returns the LoRA layers of `model` by path, for a model-level function.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if it has no LoRA layer.
    """
    check_model(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer; call `keras_lora.convert` first."
        )
    return layers


def _check_unmerged(model, layers, operation) -> None:
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"Cannot {operation} while layers {merged} of model '{model.name}' are "
            "merged. Call `keras_lora.unmerge(model)` first."
        )


# The config each adapter was created with, per model, for `save_adapter`.
# Weak keys: the record lives as long as the model, and stays out of Keras'
# attribute tracking and of the model's saved config.
_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_config(model: keras.Model, config: LoraConfig) -> None:
    """Remembers `config` as the config of adapter `config.adapter_name` of
    `model`; `convert` and `add_adapter` call it.

    Args:
        model: a LoRA model.
        config: the config the adapter was created with.
    """
    _CONFIGS.setdefault(model, {})[config.adapter_name] = config


def recorded_config(model: keras.Model, adapter_name: str) -> LoraConfig | None:
    """Returns the config `record_config` remembered for an adapter of
    `model`, or `None` (e.g. for a model loaded from a `.keras` file).

    Args:
        model: a LoRA model.
        adapter_name: the adapter.

    Returns:
        A `LoraConfig`, or `None`.
    """
    return _CONFIGS.get(model, {}).get(adapter_name)
