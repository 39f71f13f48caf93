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


def check_wrappable(wrapper: LoraLayer, layer) -> None:
    """Refuses a layer that `wrapper`, being created, cannot wrap.

    Args:
        wrapper: the new `LoraLayer`; its `base_class` is the class it adapts.
        layer: the layer passed to it.

    Raises:
        TypeError: if `layer` is not an instance of `base_class`, or its class
            changes the call signature of `base_class` (as `wrapper_for`, it
            would have no wrapper; `register_wrapper` gives it one).
        ValueError: if `layer` is a LoRA wrapper already, or has Keras'
            built-in LoRA enabled.
    """
    wrapper_name, base_name = type(wrapper).__name__, wrapper.base_class.__name__
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"`layer` must be a keras.layers.{base_name}. "
            f"Received: layer={layer!r} of type {type(layer).__name__}"
        )
    if isinstance(layer, LoraLayer):
        raise ValueError(
            f"Layer '{layer.name}' is already a {type(layer).__name__}; add "
            "another adapter with `add_adapter()` instead of wrapping it "
            f"again. Received: layer={layer.name}"
        )
    if not isinstance(layer, wrapper.base_class):
        raise TypeError(
            f"{wrapper_name} wraps keras.layers.{base_name} layers. "
            f"Received: layer={layer.name} of type {type(layer).__name__}"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras' built-in LoRA enabled "
            "(`enable_lora`); use one or the other, not both. "
            f"Received: layer={layer.name}"
        )
    expected = _call_parameters(wrapper.base_class)
    actual = _call_parameters(type(layer))
    if actual != expected:
        raise TypeError(
            f"{wrapper_name} cannot wrap '{layer.name}': its class "
            f"{type(layer).__name__} changes the call signature of "
            f"keras.layers.{base_name} (expected call{tuple(expected)}, got "
            f"call{tuple(actual)}), so the adapter would not apply to every "
            "mode it has. Register a wrapper for it with "
            "`keras_lora.register_wrapper`."
        )


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
