"""LoraHooks: what each LoRA layer type says about its base layer.

`LoraLayer` holds every mechanic shared by the wrapper types (named adapters,
the factorised call, merging, DoRA, saving); a wrapper type only answers the
questions below, one method each, about the Keras layer it adapts. Three are
required (`factor_shapes`, `adapter_output`, `delta`); the others have
defaults that serve kernels laid out inputs first, outputs last (Dense, Conv,
Embedding), and `norm_axes` opts a type into DoRA.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_lora.layers.settings import AdapterSettings


class LoraHooks:
    """The per-type contract of a LoRA wrapper, with its defaults.

    Attributes:
        base_class: the Keras layer class the wrapper adapts.
        zero_factor: which factor a default init starts at zero: `"b"`
            (Dense, EinsumDense, Conv) or `"a"` (Embedding), as in peft.
    """

    base_class: type[keras.layers.Layer] = keras.layers.Layer
    zero_factor = "b"

    @classmethod
    def kernel_of(cls, layer: keras.layers.Layer) -> keras.Variable:
        """Hook: the variable of a built base layer that adapters update."""
        return layer.kernel

    def check_settings(self, settings: AdapterSettings) -> None:
        """Hook: refuses adapter settings this layer type cannot take (a rank
        conv groups do not divide, dropout on embedding ids), before anything
        is created."""

    def max_rank(self) -> int:
        """Hook: the largest rank the update of a built base kernel can have,
        `min(fan_in, fan_out)`. This default reads both from the factor
        shapes, `A: (fan_in axes..., rank)` and `B: (rank, fan_out axes...)`."""
        a_shape, b_shape = self.factor_shapes(1)
        return min(math.prod(a_shape[:-1]), math.prod(b_shape[1:]))

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Hook: the shapes of `lora_a` and `lora_b` for a built base layer."""
        raise NotImplementedError

    @classmethod
    def factor_axes(
        cls, layer: keras.layers.Layer, kernel_axes: tuple[str | None, ...]
    ) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
        """Hook: the device-mesh axes of `lora_a` and `lora_b` when the base
        kernel is laid out on `kernel_axes` (one mesh axis name or `None` per
        kernel axis).

        A factor axis that stands for a kernel axis takes that axis's layout;
        the rank axis and size-1 axes are replicated. This default serves
        kernels whose last axis is the output and the others the input
        (Dense, Conv, Embedding): `lora_a` mirrors all but the last kernel
        axis, `lora_b` the last.
        """
        *inputs, output = kernel_axes
        return (*inputs, None), (*[None] * len(inputs), output)

    def adapter_output(self, x, lora_a, lora_b):
        """Hook: the unscaled adapter output, computed factorised."""
        raise NotImplementedError

    def delta(self, lora_a, lora_b):
        """Hook: the unscaled full-size update in the base kernel's layout."""
        raise NotImplementedError

    def kernel_matrix(self, kernel):
        """Hook: `kernel` (in the base kernel's layout) as the
        `(fan_in, fan_out)` matrix on which `delta(A, B)` is `A @ B`, `A`
        reshaped to `(fan_in, rank)` and `B` to `(rank, fan_out)`. The default
        serves kernels whose last axis is the output and the others the input
        (Dense, Conv, Embedding)."""
        return ops.reshape(kernel, (-1, kernel.shape[-1]))

    def check_matrix_view(self, operation: str) -> None:
        """Hook: refuses `operation` (an init or a combination that works on
        `kernel_matrix`) if the update is not one matrix (grouped conv)."""

    @property
    def norm_axes(self) -> tuple[int, ...] | None:
        """Hook: the kernel axes DoRA's weight norm reduces (the input axes);
        the other axes are the output units, one magnitude entry each. `None`
        (the default) means the layer type does not support DoRA."""
        return None

    def output_layout(self, values, ndim: int):
        """Hook: a tensor with one entry per output unit (the kernel's shape
        without `norm_axes`), laid out to broadcast against outputs of rank
        `ndim`. The default serves outputs whose last axes are the units."""
        return values

    def output_bias(self):
        """Hook: the wrapped layer's bias as its call adds it to the outputs
        (broadcastable against them), or `None`."""
        return getattr(self.layer, "bias", None)
