"""Model-level adapter state: merge, unmerge, enable/disable, add/set/delete.

Every function takes the model first and applies to all of its LoRA layers, all
or nothing. Layer state is Python state that Keras reads when it traces
`fit`/`predict`, so each change also drops the model's traced functions (as
`Model.quantize` does); they are traced again on next use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_lora.config import LoraConfig
from keras_lora.layers.base import LoraLayer
from keras_lora.targets import select
from keras_lora.walk import walk


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


def merge(
    model: keras.Model, adapter_names: list[str] | None = None, safe: bool = False
) -> None:
    """Folds the adapters into the base weights of every LoRA layer.

    Args:
        model: a LoRA model.
        adapter_names: adapters to merge; `None` means each layer's active ones.
        safe: check every merged kernel is finite before writing it.

    Raises:
        ValueError: if the model has no LoRA layer, a layer is already merged,
            or a merge fails; layers merged before the failure are unmerged, so
            the model is left as it was.

    Example:

    >>> keras_lora.merge(lora_model)
    """
    layers = _require_lora_layers(model)
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
    """
    layers = _require_lora_layers(model)
    unmerged = [path for path, layer in layers.items() if not layer.merged]
    if unmerged:
        raise ValueError(
            f"Model '{model.name}' is not merged; layers {unmerged} have nothing "
            "to unmerge."
        )
    for layer in layers.values():
        layer.unmerge()
    reset_traced_functions(model)


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
    layers = _require_lora_layers(model)
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
    layers = _require_lora_layers(model)
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
            rank, alpha = config.resolved(path)
            layers[path].add_adapter(
                adapter_name,
                rank,
                alpha,
                config.dropout,
                config.use_rslora,
                config.init,
            )
            added.append(layers[path])
    except Exception:
        for layer in added:
            layer.delete_adapter(adapter_name)
        raise
    reset_traced_functions(model)


def set_adapter(model: keras.Model, adapter_names: str | list[str]) -> None:
    """Activates the named adapter(s) in every LoRA layer that has them.

    Args:
        model: an unmerged LoRA model.
        adapter_names: a name or a list of names.

    Raises:
        ValueError: if no layer has one of the names, or the model is merged.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = _require_lora_layers(model)
    _check_unmerged(model, layers, "set the adapter")
    known = {name for layer in layers.values() for name in layer.adapter_names}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(
            f"`adapter_names` must name adapters of model '{model.name}': "
            f"{sorted(known)}. Received: adapter_names={adapter_names!r}"
        )
    for layer in layers.values():
        own = [name for name in names if name in layer.adapters]
        if own:
            layer.set_adapter(own)
    reset_traced_functions(model)


def delete_adapter(model: keras.Model, adapter_name: str) -> None:
    """Deletes an adapter from every LoRA layer that has it.

    Args:
        model: an unmerged LoRA model.
        adapter_name: the adapter to delete.

    Raises:
        ValueError: if no layer has it, it is the last adapter of a layer, or
            the model is merged.
    """
    layers = _require_lora_layers(model)
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
    for layer in holding.values():
        layer.delete_adapter(adapter_name)
    reset_traced_functions(model)


def _require_lora_layers(model) -> dict[str, LoraLayer]:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
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


def reset_traced_functions(model: keras.Model) -> None:
    """Drops the functions Keras traced for `fit`/`evaluate`/`predict`, so the
    next call traces them with the model's current adapter state.

    Args:
        model: a Keras model.
    """
    model.train_function = None
    model.test_function = None
    model.predict_function = None
