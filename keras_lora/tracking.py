"""The only place keras_lora touches Keras' private state-tracking API.

Keras locks a layer's state once it is built, and tracks sub-layers by object
identity. Adding an adapter to a built wrapper, and rewiring a built layer's
attribute from a base layer to its wrapper, both need to step around that lock.
Telling a Functional model from a subclassed one needs Keras' private
`Functional` class, which is not exported. `tests/test_tracking.py` fails loudly
if a Keras release changes what this module relies on (`Layer._tracker`,
`Tracker.unlock/lock/locked/replace_tracked_value`, `Functional`).
"""

from __future__ import annotations

import contextlib

import keras
from keras.src.models.functional import Functional


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a Sequential or Functional model (a layer graph).

    Args:
        layer: any Keras layer.

    Returns:
        True for `keras.Sequential`, `Functional` models and their subclasses.
    """
    return isinstance(layer, (keras.Sequential, Functional))


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
