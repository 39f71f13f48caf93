"""Which wrapper adapts which Keras layer class; users can register their own."""

from __future__ import annotations

import inspect

import keras

from keras_lora.layers.base import LoraLayer
from keras_lora.layers.conv import LoraConv1D, LoraConv2D, LoraConv3D
from keras_lora.layers.dense import LoraDense
from keras_lora.layers.einsum_dense import LoraEinsumDense
from keras_lora.layers.embedding import LoraEmbedding
from keras_lora.layers.reversible_embedding import (
    KERAS_REVERSIBLE_EMBEDDING,
    LoraReversibleEmbedding,
    keras_hub_reversible_embedding,
)

_WRAPPERS: dict[type, type[LoraLayer]] = {
    keras.layers.Dense: LoraDense,
    keras.layers.EinsumDense: LoraEinsumDense,
    keras.layers.Conv1D: LoraConv1D,
    keras.layers.Conv2D: LoraConv2D,
    keras.layers.Conv3D: LoraConv3D,
    keras.layers.Embedding: LoraEmbedding,
}
if KERAS_REVERSIBLE_EMBEDDING is not None:
    _WRAPPERS[KERAS_REVERSIBLE_EMBEDDING] = LoraReversibleEmbedding


def register_wrapper(
    layer_class: type[keras.layers.Layer], wrapper_class: type[LoraLayer]
) -> None:
    """Makes `convert` wrap instances of `layer_class` with `wrapper_class`.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        wrapper_class: a `keras_lora.layers.LoraLayer` subclass that adapts it.

    Raises:
        TypeError: if either is not the expected kind of class.

    Example:

    >>> keras_lora.register_wrapper(MyDense, keras_lora.LoraDense)
    """
    if not (
        isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)
    ):
        raise TypeError(
            "`layer_class` must be a keras.layers.Layer subclass. "
            f"Received: layer_class={layer_class!r}"
        )
    if not (isinstance(wrapper_class, type) and issubclass(wrapper_class, LoraLayer)):
        raise TypeError(
            "`wrapper_class` must be a keras_lora LoraLayer subclass. "
            f"Received: wrapper_class={wrapper_class!r}"
        )
    _WRAPPERS[layer_class] = wrapper_class


def wrapper_for(layer: keras.layers.Layer) -> type[LoraLayer] | None:
    """Returns the wrapper class for `layer`, or `None` if there is none.

    The most specific registered class in the layer's MRO wins. A subclass
    whose `call` signature differs from the registered class's has no wrapper
    (the wrapper could not cover its other modes) unless registered itself.
    keras-hub's `ReversibleEmbedding`, when `keras_hub` is imported and its
    class is not Keras' (older keras-hub), counts as registered.

    Args:
        layer: a Keras layer.

    Returns:
        A `LoraLayer` subclass, or `None`.
    """
    wrappers = _wrappers()
    for cls in type(layer).__mro__:
        if cls in wrappers:
            wrapper_class = wrappers[cls]
            same_call = _call_parameters(type(layer)) == _call_parameters(cls)
            return wrapper_class if same_call else None
    return None


def _call_parameters(cls) -> list[str]:
    return list(inspect.signature(cls.call).parameters)


def supported_classes() -> tuple[type, ...]:
    """The Keras layer classes that have a wrapper, in registration order."""
    return tuple(_wrappers())


def _wrappers() -> dict[type, type[LoraLayer]]:
    """The registered wrappers, plus keras-hub's own `ReversibleEmbedding`
    class, looked up only once `keras_hub` is imported (importing it is slow;
    current keras-hub subclasses Keras' class, registered above)."""
    hub_class = keras_hub_reversible_embedding()
    if hub_class is None or hub_class in _WRAPPERS:
        return _WRAPPERS
    if KERAS_REVERSIBLE_EMBEDDING and issubclass(hub_class, KERAS_REVERSIBLE_EMBEDDING):
        return _WRAPPERS
    return {**_WRAPPERS, hub_class: LoraReversibleEmbedding}
