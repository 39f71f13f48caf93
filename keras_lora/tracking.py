"""The only place keras_lora touches Keras' private state-tracking API.

Keras locks a layer's state once it is built, and tracks sub-layers by object
identity. Adding an adapter to a built wrapper, and rewiring a built layer's
attribute from a base layer to its wrapper, both need to step around that lock.
`tests/test_tracking.py` fails loudly if a Keras release changes what this
module relies on (`Layer._tracker`, `Tracker.unlock/lock/locked/untrack`).
"""

from __future__ import annotations

import contextlib

import keras


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


def rewire_attribute(
    parent: keras.layers.Layer,
    attribute: str,
    new: keras.layers.Layer,
) -> None:
    """Points `parent.<attribute>` at `new`, and tracks `new` in place of the old
    layer, so that no variable is listed twice and none is lost.

    Args:
        parent: the layer that owns the attribute.
        attribute: the attribute's name.
        new: the layer to store there.
    """
    old = getattr(parent, attribute)
    with unlocked_state(parent):
        parent._tracker.untrack(old)
        setattr(parent, attribute, new)
