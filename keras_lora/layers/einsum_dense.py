"""LoraEinsumDense: LoRA for `keras.layers.EinsumDense`."""

from __future__ import annotations

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
        rank, alpha, dropout, use_rslora, init, adapter_name: the first adapter,
            see `keras_lora.layers.LoraLayer`.
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
        # EinsumDense reports the `None`s of its `output_shape` argument even
        # where the equation takes that axis from a known input axis.
        shape = self.layer.compute_output_shape(input_shape)
        x_spec, outputs = self._equations["x"], self._equations["outputs"]
        if "." in x_spec + outputs or len(x_spec) != len(input_shape):
            return shape
        sizes = dict(zip(x_spec, input_shape, strict=True))
        return tuple(
            sizes.get(letter) if size is None else size
            for letter, size in zip(outputs, shape, strict=True)
        )

    def factor_shapes(self, rank):
        kernel_letters = self._equations["kernel"]
        sizes = dict(zip(kernel_letters, self.kernel_variable.shape, strict=True))
        a_shape = tuple(sizes[letter] for letter in self._equations["contracted"])
        b_shape = tuple(sizes[letter] for letter in self._equations["kept"])
        return (*a_shape, rank), (rank, *b_shape)

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
