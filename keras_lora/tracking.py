"""The only place keras_lora touches Keras' private state-tracking API.

Keras locks a layer's state once it is built, and tracks sub-layers by object
identity. Adding an adapter to a built wrapper, and rewiring a built layer's
attribute from a base layer to its wrapper, both need to step around that lock.
Telling a Functional model from a subclassed one needs Keras' private
`Functional` class, which is not exported; finding the layer call that made a
symbolic tensor needs its private `_keras_history`. Running a layer's own `call` on a
kernel other than its variable needs the private attribute behind the layer's
`kernel` property. `tests/test_tracking.py` fails loudly if a Keras release
changes what this module relies on (`Layer._tracker`,
`Tracker.unlock/lock/locked/replace_tracked_value`, `Functional`,
`KerasTensor._keras_history` and `Operation._inbound_nodes`,
`keras.src.backend.set_keras_mask`, a kernel
property that reads a private attribute holding the variable, and, under the
torch backend, the `torch.nn.Module` registry that holds sub-layers).
"""

from __future__ import annotations

import contextlib

import keras
from keras.src.backend import set_keras_mask
from keras.src.models.functional import Functional


def attributes(layer: keras.layers.Layer) -> list[tuple[str, object]]:
    """`(name, value)` for every attribute `layer` holds, in the order kept.

    Under the torch backend a Keras layer is also a `torch.nn.Module`, and
    torch keeps the attributes that hold modules (sub-layers) in the module's
    `_modules` dict instead of the instance's `__dict__`; the Keras layers
    there are listed in its place (not Keras' own `_torch_params` registry of
    torch parameters). `named_children()` would list a layer held by two
    attributes only once. On the other backends this is `vars(layer).items()`.

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
    """Attaches `mask` to `outputs` as a Keras layer does inside `call`
    (Keras' `ReversibleEmbedding` does; a wrapper that adds to its output
    makes a new tensor, which must carry the mask again).

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
    tracks it in the old layer's place, so that no variable is listed twice,
    none is lost, and the parent's weight order is kept.

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

    Keras layers expose their kernel through a property (`Dense.kernel`,
    `Embedding.embeddings`) that reads a private attribute holding the
    variable; swapping that attribute lets the layer's own `call` run on a
    tensor, so a subclass's math is kept. Keras' attribute tracking is
    bypassed: the swap is not a state change and is undone on exit.

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
