"""Per-example adapters: which adapter each example of a batch goes through.

This is peft's mixed-batch inference (`adapter_names=` in `forward`): every
example of a batch uses its own adapter, or none (`"__base__"`), and gets what
it would get alone with that adapter active. A `LoraLayer` finds its routing
here (`routing_for_call`): from its own call arguments, or from the model-level
`keras_lora.adapter_per_example` context, which registers it per layer. Each
routed adapter runs on the whole batch, masked to its examples (why: docs/design.md).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import keras
import numpy as np
from keras import ops

BASE = "__base__"

# The routing `keras_lora.adapter_per_example` set, per LoRA layer. Weak keys:
# outside Keras' attribute tracking, so nothing of it is saved or exported.
_ROUTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterRouting:
    """Which adapter each example of a batch goes through.

    Attributes:
        adapter_names: the adapter names the index refers to; `"__base__"`
            stands for the base layer alone.
        adapter_index: an integer tensor of shape `(batch,)`: example `i`
            uses `adapter_names[adapter_index[i]]`, and `-1` the base layer.
    """

    adapter_names: tuple[str, ...]
    adapter_index: Any

    @property
    def batch_size(self) -> int | None:
        """The number of examples routed, `None` while traced with an unknown
        batch size."""
        return self.adapter_index.shape[0]

    def adapters(self) -> list[tuple[int, str]]:
        """`(position, name)` of every adapter to compute, the base left out."""
        return [
            (position, name)
            for position, name in enumerate(self.adapter_names)
            if name != BASE
        ]

    def check(self, layer, inputs=None, training=None) -> None:
        """Refuses what per-example adapters cannot compute on `layer`.

        Args:
            layer: a `LoraLayer`.
            inputs: the layer's inputs, to check the batch size; `None` skips
                that check.
            training: the call's `training` argument.

        Raises:
            ValueError: in training, if the layer is merged or its adapters are
                disabled, if a name is not one of its adapters, if an adapter
                uses DoRA, or if the batch size is not the number of examples
                routed.
        """
        if training:
            raise ValueError(
                "Per-example adapters are for inference only (as in peft); "
                f"layer '{layer.name}' was called in training. Train one "
                "adapter at a time with `keras_lora.set_adapter`. "
                f"Received: training={training}"
            )
        if layer.merged:
            raise ValueError(
                f"Layer '{layer.name}' has merged adapters "
                f"{list(layer.merged_adapters)}; per-example adapters need the "
                "adapters unmerged. Call `keras_lora.unmerge(model)` first."
            )
        if not layer.adapters_enabled:
            raise ValueError(
                f"Layer '{layer.name}' has its adapters disabled; route "
                "examples to adapters outside `keras_lora.disable_adapters`, "
                'and route an example to "__base__" for the base output.'
            )
        unknown = [
            name for _, name in self.adapters() if name not in layer.adapter_names
        ]
        if unknown:
            raise ValueError(
                f"`adapter_names` must name adapters of layer '{layer.name}' "
                f"({list(layer.adapter_names)}) or {BASE!r}; {unknown} are not. "
                f"Received: adapter_names={list(self.adapter_names)!r}"
            )
        dora = [
            name
            for _, name in self.adapters()
            if getattr(layer.adapters[name], "use_dora", False)
        ]
        if dora:
            raise ValueError(
                f"Adapters {dora} of layer '{layer.name}' use DoRA, which "
                "per-example adapters do not support (as in peft). Received: "
                f"adapter_names={list(self.adapter_names)!r}"
            )
        batch = None if inputs is None else inputs.shape[0]
        if None not in (batch, self.batch_size) and batch != self.batch_size:
            raise ValueError(
                f"Layer '{layer.name}' got a batch of {batch} examples but "
                f"{self.batch_size} were routed: pass one adapter name or "
                f"index per example. Received: {self.batch_size} routed, "
                f"inputs of shape {tuple(inputs.shape)}"
            )

    def select(self, position: int, update):
        """Returns `update` on the examples routed to `position`, 0 elsewhere.

        Args:
            position: a position in `adapter_names`.
            update: a tensor whose first axis is the batch.

        Returns:
            `update` times a 0/1 mask broadcast over its other axes.
        """
        mask = ops.cast(ops.equal(self.adapter_index, position), update.dtype)
        return update * ops.reshape(mask, (-1,) + (1,) * (len(update.shape) - 1))


def adapter_routing(
    adapter_names: list[str] | tuple[str, ...], adapter_index=None
) -> AdapterRouting:
    """Checks and normalises the two ways of routing examples to adapters.

    Args:
        adapter_names: with `adapter_index=None`, one adapter name per example
            (`"__base__"` for none); otherwise the names the index refers to.
        adapter_index: `None`, or integers of shape `(batch,)` (a list, NumPy
            array or tensor, symbolic inside a traced function): example `i`
            uses `adapter_names[adapter_index[i]]`, `-1` the base.

    Returns:
        An `AdapterRouting`.

    Raises:
        TypeError: if `adapter_names` is not a list or tuple of strings, or
            `adapter_index` is not integer.
        ValueError: if `adapter_names` is empty, has a duplicate name while
            `adapter_index` is given, or `adapter_index` is not of rank 1 or
            (when its values are known) holds a value outside `[-1, n)`.
    """
    if not isinstance(adapter_names, (list, tuple)) or not all(
        isinstance(name, str) and name for name in adapter_names
    ):
        raise TypeError(
            "`adapter_names` must be a list of adapter names (non-empty "
            f"strings, {BASE!r} for no adapter). "
            f"Received: adapter_names={adapter_names!r}"
        )
    if not adapter_names:
        raise ValueError(
            "`adapter_names` must name at least one adapter. "
            f"Received: adapter_names={adapter_names!r}"
        )
    if adapter_index is None:
        names = tuple(dict.fromkeys(adapter_names))
        index = np.array([names.index(name) for name in adapter_names], "int32")
        return AdapterRouting(names, ops.convert_to_tensor(index))
    names = tuple(adapter_names)
    if len(set(names)) != len(names):
        raise ValueError(
            "With `adapter_index`, `adapter_names` lists each adapter once; "
            "the index picks one per example. "
            f"Received: adapter_names={adapter_names!r}"
        )
    if isinstance(adapter_index, (list, tuple)):
        adapter_index = np.asarray(adapter_index)
    dtype = keras.backend.standardize_dtype(adapter_index.dtype)
    if "int" not in dtype:
        raise TypeError(
            "`adapter_index` must hold integers (positions in `adapter_names`). "
            f"Received: adapter_index of dtype {dtype}"
        )
    if len(adapter_index.shape) != 1:
        raise ValueError(
            "`adapter_index` must have shape (batch,): one index per example. "
            f"Received: adapter_index of shape {tuple(adapter_index.shape)}"
        )
    values = _known_values(adapter_index)
    if values is not None:
        bad = sorted(set(values[(values < -1) | (values >= len(names))].tolist()))
        if bad:
            raise ValueError(
                f"`adapter_index` values must be in [-1, {len(names)}): a "
                "position in `adapter_names`, or -1 for the base model. "
                f"Received: adapter_index with values {bad}"
            )
    return AdapterRouting(names, ops.convert_to_tensor(adapter_index))


def route(layer, routing: AdapterRouting | None) -> None:
    """Sets (or, with `None`, clears) the routing `layer` uses when called
    without routing arguments.

    Args:
        layer: a `LoraLayer`.
        routing: an `AdapterRouting`, or `None`.
    """
    if routing is None:
        _ROUTINGS.pop(layer, None)
    else:
        _ROUTINGS[layer] = routing


def routing_of(layer) -> AdapterRouting | None:
    """The routing `route` set on `layer`, or `None`."""
    return _ROUTINGS.get(layer)


def routing_for_call(
    layer, adapter_names=None, adapter_index=None
) -> AdapterRouting | None:
    """The routing of one call of `layer`: its own arguments, else the one
    `route` set, else `None` (the layer's active adapters).

    Args:
        layer: a `LoraLayer`.
        adapter_names: the call's `adapter_names` argument.
        adapter_index: the call's `adapter_index` argument.

    Returns:
        An `AdapterRouting`, or `None`.

    Raises:
        ValueError: if `adapter_index` is given without `adapter_names`, or
            as `adapter_routing`.
    """
    if adapter_names is None:
        if adapter_index is not None:
            raise ValueError(
                "`adapter_index` needs `adapter_names`, the names it indexes. "
                "Received: adapter_names=None"
            )
        return _ROUTINGS.get(layer)
    return adapter_routing(adapter_names, adapter_index)


def _known_values(adapter_index) -> np.ndarray | None:
    """The index values, or `None` when they are not known yet: a symbolic
    tensor inside `tf.function` (NotImplementedError) or `jax.jit` (a
    TypeError) has none to check."""
    try:
        return np.asarray(ops.convert_to_numpy(adapter_index))
    except (NotImplementedError, TypeError):
        return None
