"""Device-mesh layouts for adapter variables, for `keras.distribution`.

Under `keras.distribution.ModelParallel` every variable is laid out on the
device mesh when it is created, by the `LayoutMap` rule that matches its path.
A user's map has rules for the base kernels; `add_adapter_layouts` derives the
rules for the adapter factors from them, before the adapters are created.
"""

from __future__ import annotations

import re

import keras

from keras_lora.layers.base import LoraLayer, adapter_scope
from keras_lora.layers.registry import wrapper_for
from keras_lora.tree.walk import walk


def add_adapter_layouts(
    model: keras.layers.Layer, layout_map: keras.distribution.LayoutMap
) -> dict[str, tuple[str | None, ...]]:
    """Adds `layout_map` rules that lay each adapter out like its base kernel.

    Adapter variables are created next to their base layer's variables
    (`"block/query/kernel"` -> `"block/query/<adapter>/lora_a"`). For every
    layer that has a LoRA wrapper and whose kernel `layout_map` shards, this
    adds one rule per factor, for any adapter name: each factor axis that
    stands for a kernel axis is sharded as that axis, and the rank axis is
    replicated. A Dense kernel `(in, out)` sharded on `out` gives `lora_b`
    `(rank, out)` sharded on `out` and a replicated `lora_a`; sharded on `in`,
    `lora_a` `(in, rank)` is sharded on `in` and `lora_b` replicated. The
    adapter output then has the base output's layout, and the factors cost
    each device `1 / shards` of their memory on the sharded side.

    Call it once the base model is built (with the distribution set, so that
    its kernels are laid out) and before `keras_lora.convert`,
    `keras_lora.add_adapter` or `keras_lora.load_adapter` create adapters:
    Keras reads the map when a variable is created. Factors whose path some
    rule of `layout_map` already matches keep that rule. A quantized kernel
    that the layer reads through a computed view (int4) has no variable to
    look up and is skipped: its adapters are replicated.

    Args:
        model: a built Keras model or layer, plain or already converted.
        layout_map: the `keras.distribution.LayoutMap` of the
            `keras.distribution.ModelParallel` distribution; it is changed in
            place.

    Returns:
        The rules added, as `{path regex: axes}`.

    Raises:
        TypeError: if `model` is not a Keras layer or `layout_map` is not a
            `keras.distribution.LayoutMap`.
        ValueError: if a kernel's rule has a different number of axes than the
            kernel; nothing is added then.

    Example:

    >>> mesh = keras.distribution.DeviceMesh((2,), ["model"])
    >>> layout_map = keras.distribution.LayoutMap(mesh)
    >>> layout_map["up/kernel"] = (None, "model")
    >>> keras.distribution.set_distribution(
    ...     keras.distribution.ModelParallel(layout_map=layout_map)
    ... )
    >>> model = build_model()  # a Dense layer named "up" in it
    >>> keras_lora.add_adapter_layouts(model, layout_map)
    {'^up/[^/]+/lora_b$': (None, 'model')}
    >>> lora_model = keras_lora.convert(model, rank=8)
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a Keras model or layer. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise TypeError(
            "`layout_map` must be a keras.distribution.LayoutMap. "
            f"Received: layout_map={layout_map!r} of type "
            f"{type(layout_map).__name__}"
        )
    rules = {}
    for site in walk(model).values():
        wrapper_class, base = _wrapper_and_base(site.layer)
        if wrapper_class is None or not base.built:
            continue
        kernel = wrapper_class.kernel_of(base)
        if not isinstance(kernel, keras.Variable):
            continue
        kernel_axes = _sharded_axes(layout_map, kernel)
        if kernel_axes is None:
            continue
        scope = adapter_scope(base)
        factor_axes = wrapper_class.factor_axes(base, kernel_axes)
        for factor, axes in zip(("lora_a", "lora_b"), factor_axes, strict=True):
            # A user's rule for the factor (probed with the default adapter
            # name) wins; a second match would make Keras refuse the path.
            replicated = all(axis is None for axis in axes)
            if replicated or layout_map[f"{scope}/default/{factor}"] is not None:
                continue
            # Anchored: Keras 3.12 matches rules with `re.search`, 3.15 in full.
            rules[f"^{re.escape(scope)}/[^/]+/{factor}$"] = tuple(axes)
    for pattern, axes in rules.items():
        layout_map[pattern] = axes
    return rules


def _wrapper_and_base(layer):
    """The wrapper class that adapts `layer` and the base layer it wraps."""
    if isinstance(layer, LoraLayer):
        return type(layer), layer.layer
    return wrapper_for(layer), layer


def _sharded_axes(layout_map, kernel) -> tuple[str | None, ...] | None:
    """The mesh axes `layout_map` gives `kernel`, or None if it is replicated."""
    layout = layout_map[kernel.path]
    if layout is None or all(axis is None for axis in layout.axes):
        return None
    axes = tuple(layout.axes)
    if len(axes) != len(kernel.shape):
        raise ValueError(
            f"The layout_map rule for kernel '{kernel.path}' of shape "
            f"{tuple(kernel.shape)} has {len(axes)} axes; it needs one per "
            f"kernel axis. Received: axes={axes}"
        )
    return axes
