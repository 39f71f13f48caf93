"""LoraEinsumDense: LoRA for `keras.layers.EinsumDense`."""

from __future__ import annotations

import math
import string

import keras
from keras import ops

from keras_lora.layers.base import LoraLayer


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraEinsumDense(LoraLayer):
    """LoRA adapter around a `keras.layers.EinsumDense` layer.

    The kernel is read as a matrix of (input-contracted axes) x (output axes),
    the equivalent `nn.Linear` in peft, and the update is rank `r` over that
    matrix: `A` has the contracted kernel axes plus `(r,)`, `B` has `(r,)` plus
    the output kernel axes. For the attention equation `abc,cde->abde`,
    `A: (c, r)`, `B: (r, d, e)` and the adapter output is
    `einsum("abr,rde->abde", einsum("abc,cr->abr", x, A), B) * scale`. This is
    not Keras' own `enable_lora`, which factorises per head.

    Args:
        layer: the `keras.layers.EinsumDense` layer to adapt, built or not. Its
            kernel axes must each be either contracted with the input or kept
            in the output.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`. With DoRA the
            magnitude has one entry per output unit (the kept kernel axes),
            the norm running over the contracted axes.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: the wrapped layer's input tensor.
        training: Python bool; enables adapter dropout.

    Example:

    >>> base = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 8))
    >>> layer = keras_lora.LoraEinsumDense(base, rank=4)
    >>> layer(np.ones((1, 3, 16))).shape
    (1, 3, 2, 8)
    """

    base_class = keras.layers.EinsumDense

    def __init__(self, layer, *args, **kwargs):
        self._check_layer(layer)
        self._equations = _adapter_equations(layer)
        super().__init__(layer, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        # EinsumDense reports its output shape as of its build (the `None`s of
        # its `output_shape` argument on Keras 3.15, the build-time batch size
        # on 3.12), not for `input_shape`: an output axis the equation takes
        # from the input has the input's size.
        shape = self.layer.compute_output_shape(input_shape)
        x_spec, outputs = self._equations["x"], self._equations["outputs"]
        if "." in x_spec + outputs or len(x_spec) != len(input_shape):
            return shape
        sizes = dict(zip(x_spec, input_shape, strict=True))
        return tuple(
            sizes[letter] if letter in sizes else size
            for letter, size in zip(outputs, shape, strict=True)
        )

    def factor_shapes(self, rank):
        kernel_letters = self._equations["kernel"]
        sizes = dict(zip(kernel_letters, self.kernel_variable.shape, strict=True))
        a_shape = tuple(sizes[letter] for letter in self._equations["contracted"])
        b_shape = tuple(sizes[letter] for letter in self._equations["kept"])
        return (*a_shape, rank), (rank, *b_shape)

    @classmethod
    def factor_axes(cls, layer, kernel_axes):
        # A holds the contracted kernel axes, B the kept ones, in kernel order.
        equations = _adapter_equations(layer)
        axes = dict(zip(equations["kernel"], kernel_axes, strict=True))
        a_axes = tuple(axes[letter] for letter in equations["contracted"])
        b_axes = tuple(axes[letter] for letter in equations["kept"])
        return (*a_axes, None), (None, *b_axes)

    @property
    def norm_axes(self):
        kernel, contracted = self._equations["kernel"], self._equations["contracted"]
        return tuple(axis for axis, letter in enumerate(kernel) if letter in contracted)

    def output_layout(self, values, ndim):
        # `values` has the kept axes in kernel order; the outputs may order
        # them otherwise, with other axes (or an ellipsis) between them.
        kept, outputs = self._equations["kept"], self._equations["outputs"]
        ordered = sorted(kept, key=outputs.index)
        values = ops.transpose(values, [kept.index(letter) for letter in ordered])
        sizes = dict(zip(ordered, values.shape, strict=True))
        tail = outputs[outputs.index(ordered[0]) :].replace("...", "")
        shape = [sizes.get(letter, 1) for letter in tail]
        if outputs.endswith("..."):
            # Keras' "ab...,bc->ac..." form: the elided axes follow the units.
            shape += [1] * (ndim - len(outputs) + len("..."))
        return ops.reshape(values, shape)

    def kernel_matrix(self, kernel):
        # The contracted kernel axes first, then the kept ones, as in A and B.
        letters = self._equations["kernel"]
        contracted, kept = self._equations["contracted"], self._equations["kept"]
        order = [letters.index(letter) for letter in contracted + kept]
        permuted = ops.transpose(kernel, order)
        fan_in = math.prod(permuted.shape[: len(contracted)])
        return ops.reshape(permuted, (fan_in, -1))

    def adapter_output(self, x, lora_a, lora_b):
        return ops.einsum(
            self._equations["to_b"],
            ops.einsum(self._equations["to_a"], x, lora_a),
            lora_b,
        )

    def delta(self, lora_a, lora_b):
        return ops.einsum(self._equations["delta"], lora_a, lora_b)


def _adapter_equations(layer) -> dict[str, str]:
    """Splits an EinsumDense equation into the two adapter einsums and the
    merge einsum, or refuses a kernel that is not a contracted x kept matrix."""
    equation = layer.equation
    inputs, outputs = equation.split("->")
    x_spec, kernel = inputs.split(",")
    letters = set(kernel)
    contracted = "".join(c for c in kernel if c in x_spec and c not in outputs)
    kept = "".join(c for c in kernel if c in outputs and c not in x_spec)
    if len(contracted) + len(kept) != len(kernel) or not contracted or not kept:
        raise ValueError(
            f"LoraEinsumDense cannot adapt '{layer.name}': every kernel axis must "
            "be either contracted with the input or kept in the output, with at "
            f"least one of each. Received: equation={equation!r}"
        )
    rank_letter = next(
        c for c in string.ascii_letters if c not in letters | set(equation)
    )
    hidden = "".join(c for c in x_spec if c not in contracted) + rank_letter
    return {
        "x": x_spec,
        "outputs": outputs,
        "kernel": kernel,
        "contracted": contracted,
        "kept": kept,
        "to_a": f"{x_spec},{contracted}{rank_letter}->{hidden}",
        "to_b": f"{hidden},{rank_letter}{kept}->{outputs}",
        "delta": f"{contracted}{rank_letter},{rank_letter}{kept}->{kernel}",
    }
