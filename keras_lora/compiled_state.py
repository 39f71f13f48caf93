"""Keeping what Keras compiled for a model in step with its adapter state.

Layer state (merged, active, enabled, routed) is Python state that Keras reads
when it traces `fit`/`evaluate`/`predict`, and a built optimizer holds slots for
one list of trainable variables. After a change, the traced functions are
dropped (as `Model.quantize` does) and a built optimizer is rebuilt when the
trainable variables changed.
"""

from __future__ import annotations

import weakref

import keras

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


def active_state(model: keras.Model, layers: dict) -> tuple:
    """What a traced predict function of `model` depends on: its
    `jit_compile` and each LoRA layer's active adapters.

    Args:
        model: a LoRA model.
        layers: its LoRA layers, path to layer.

    Returns:
        A hashable key for `switch_predict_function`.
    """
    active = tuple((path, layer.active_adapters) for path, layer in layers.items())
    return getattr(model, "jit_compile", None), active


def switch_predict_function(model: keras.Model, before: tuple, after: tuple) -> None:
    """`reset_traced_functions` for a switch of active adapters only: the
    predict function traced before is kept for `before`, and one traced
    for `after` earlier comes back.

    Args:
        model: a LoRA model.
        before: `active_state` before the switch.
        after: `active_state` after it.
    """
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
    """Replaces `model`'s built optimizer by one of the same config built for
    the current trainable variables, if they are no longer `trainable_before`.

    Otherwise `fit` refuses the new variables, and `model.save` writes slots
    that do not fit them (the file fails to load or, with equal shapes, loads
    another adapter's moments).

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
