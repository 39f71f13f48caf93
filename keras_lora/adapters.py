"""Model-level adapter state: merge, unmerge, enable/disable, add/set/delete.

Every function takes the model first and applies to all of its LoRA layers, all
or nothing. Layer state is Python state that Keras reads when it traces
`fit`/`predict`, so each change also drops the model's traced functions (as
`Model.quantize` does); they are traced again on next use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
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
    trainable = trainable_ids(model)
    before = _active_state(model, layers)
    for layer in layers.values():
        own = [name for name in names if name in layer.adapters]
        if own:
            layer.set_adapter(own)
    _switch_predict_function(model, before, _active_state(model, layers))
    refresh_optimizer(model, trainable)


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
    trainable = trainable_ids(model)
    for layer in holding.values():
        layer.delete_adapter(adapter_name)
    _CONFIGS.get(model, {}).pop(adapter_name, None)
    reset_traced_functions(model)
    refresh_optimizer(model, trainable)


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


def _check_unmerged(model, layers, operation) -> None:
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"Cannot {operation} while layers {merged} of model '{model.name}' are "
            "merged. Call `keras_lora.unmerge(model)` first."
        )


# The predict functions Keras traced for a model, by the active adapters they
# were traced with: `set_adapter` back to those adapters reuses its function
# instead of tracing it again. Any other change of adapter state drops them.
_PREDICT_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reset_traced_functions(model: keras.Model) -> None:
    """Drops the functions Keras traced for `fit`/`evaluate`/`predict`, so the
    next call traces them with the model's current adapter state.

    Args:
        model: a Keras model.
    """
    _PREDICT_FUNCTIONS.pop(model, None)
    model.train_function = None
    model.test_function = None
    model.predict_function = None


def _active_state(model: keras.Model, layers: dict[str, LoraLayer]) -> tuple:
    active = tuple((path, layer.active_adapters) for path, layer in layers.items())
    # A recompile with another `jit_compile` traces differently.
    return getattr(model, "jit_compile", None), active


def _switch_predict_function(model: keras.Model, before: tuple, after: tuple):
    """`reset_traced_functions` for a switch of active adapters only: the
    predict function traced before is kept for `before`, and one traced
    for `after` earlier comes back."""
    functions = _PREDICT_FUNCTIONS.setdefault(model, {})
    if model.predict_function is not None:
        functions[before] = model.predict_function
    model.train_function = None
    model.test_function = None
    model.predict_function = functions.get(after)


def trainable_ids(model: keras.Model) -> list[int]:
    """The ids of `model`'s trainable variables, for `refresh_optimizer`."""
    return [id(variable) for variable in model.trainable_variables]


def refresh_optimizer(model: keras.Model, trainable_before: list[int]) -> None:
    """Replaces `model`'s built optimizer by an unbuilt copy (same config) if
    its trainable variables are no longer `trainable_before`.

    A Keras optimizer is built for one list of variables: once another adapter
    is trainable, `fit` refuses the new variables, and `model.save` writes
    optimizer slots that do not fit them, so the file fails to load (or, with
    equal shapes, loads another adapter's moments). Recompiling would be the
    fix; this does it for the optimizer, built for the new trainable variables
    as `Model.compile_from_config` builds it.

    Args:
        model: a Keras model, compiled or not.
        trainable_before: `trainable_ids(model)` before the change.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return
    if trainable_ids(model) == trainable_before:
        return
    fresh = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    fresh.build(model.trainable_variables)
    model.optimizer = fresh


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
