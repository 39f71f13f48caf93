"""The only place keras_lora uses private Keras API, one small function per use.

What each use relies on is listed in docs/design.md ("Private Keras API");
`tests/test_keras_private.py` fails loudly if a Keras release changes it.
"""

from __future__ import annotations

import contextlib

import keras
from keras.src.backend import set_keras_mask
from keras.src.models.functional import Functional


def attributes(layer: keras.layers.Layer) -> list[tuple[str, object]]:
    """`(name, value)` for every attribute `layer` holds, in the order kept.

    `vars(layer).items()`, except under the torch backend, where torch keeps
    attributes holding sub-layers in the module's `_modules` dict; those Keras
    layers are listed in its place (`named_children()` would list a layer held
    by two attributes only once).

    Args:
        layer: any Keras layer.

    Returns:
        A new list of `(attribute name, value)` pairs.
    """
    found = []
    for name, value in vars(layer).items():
        if name == "_modules" and keras.backend.backend() == "torch":
            found.extend(
                (attribute, module)
                for attribute, module in value.items()
                if isinstance(module, keras.layers.Layer)
            )
        else:
            found.append((name, value))
    return found


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a Sequential or Functional model (a layer graph).

    Args:
        layer: any Keras layer.

    Returns:
        True for `keras.Sequential`, `Functional` models and their subclasses.
    """
    return isinstance(layer, (keras.Sequential, Functional))


def producer(tensor) -> tuple[keras.layers.Layer, list, int]:
    """The layer call that made a symbolic tensor of a graph model.

    Args:
        tensor: a `KerasTensor` of a built graph model (one of its `outputs`,
            or an input of a layer call in it).

    Returns:
        `(layer, input_tensors, output_index)`: the layer, the symbolic
        tensors that call took, and which of its outputs `tensor` is.
    """
    history = tensor._keras_history
    node = history.operation._inbound_nodes[history.node_index]
    return history.operation, list(node.input_tensors), history.tensor_index


def attach_mask(outputs, mask):
    """Attaches `mask` to `outputs` as a Keras layer does inside `call`: a
    wrapper that adds to its base's masked output makes a new tensor.

    Args:
        outputs: a tensor.
        mask: a boolean mask, or `None` (nothing is attached).

    Returns:
        `outputs`.
    """
    if mask is not None:
        set_keras_mask(outputs, mask)
    return outputs


@contextlib.contextmanager
def unlocked_state(layer: keras.layers.Layer):
    """Lets `layer` take new variables or sub-layers after it was built.

    Args:
        layer: a Keras layer, built or not.

    Yields:
        Nothing; the previous lock state is restored on exit.
    """
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def rewire(reference, new: keras.layers.Layer) -> None:
    """Stores `new` where `reference` (a `walk.Reference`) holds a layer, and
    tracks it at the old layer's index, so the parent's weights keep their
    order and none is listed twice.

    Args:
        reference: where the parent holds the layer.
        new: the layer to store there.
    """
    parent = reference.parent
    old = reference.get()
    with unlocked_state(parent):
        if parent._tracker.is_in_store("layers", old):
            parent._tracker.replace_tracked_value("layers", old, new)
        if reference.key is None:
            setattr(parent, reference.attribute, new)
        else:
            container = getattr(parent, reference.attribute)
            if isinstance(container, tuple):
                items = list(container)
                items[reference.key] = new
                setattr(parent, reference.attribute, type(container)(items))
            else:
                container[reference.key] = new


@contextlib.contextmanager
def substituted_variable(layer: keras.layers.Layer, variable: keras.Variable, value):
    """Makes `layer` read `value` wherever it reads `variable`, for one call.

    Swaps the private attribute behind a kernel property (`Dense.kernel`,
    `Embedding.embeddings`), bypassing Keras' attribute tracking, and puts the
    variable back on exit.

    Args:
        layer: a built Keras layer.
        variable: one of the layer's variables, held in an attribute of its own.
        value: the tensor to read instead, shaped and typed as the layer
            computes with the variable.

    Yields:
        Nothing.

    Raises:
        ValueError: if no attribute of `layer` holds `variable`.
    """
    attributes = [name for name, held in vars(layer).items() if held is variable]
    if not attributes:
        raise ValueError(
            f"Layer '{layer.name}' holds variable '{variable.path}' in no "
            "attribute of its own; it cannot be substituted."
        )
    for name in attributes:
        object.__setattr__(layer, name, value)
    try:
        yield
    finally:
        for name in attributes:
            object.__setattr__(layer, name, variable)


def einsum_kernel_scale(layer: keras.layers.EinsumDense, scale):
    """An int8 EinsumDense's scale, laid out to broadcast against its kernel.

    Keras stores it transposed and reshaped to match the einsum output; its
    private `_adjust_scale_for_dequant` (which the layer's own gradient uses)
    undoes that. `tests/test_quantization.py` fails loudly if it goes.

    Args:
        layer: an int8-quantized `keras.layers.EinsumDense`.
        scale: its `kernel_scale` value.

    Returns:
        The scale, broadcastable against the kernel.
    """
    return layer._adjust_scale_for_dequant(scale)
