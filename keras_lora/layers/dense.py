"""LoraDense: LoRA for `keras.layers.Dense`."""

from __future__ import annotations

import keras
from keras import ops

from keras_lora.layers.base import LoraLayer


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraDense(LoraLayer):
    """LoRA adapter around a `keras.layers.Dense` layer.

    `outputs = activation(x @ W + b + scale * dropout(x) @ A @ B)` with `A` of
    shape `(input_dim, rank)` and `B` of shape `(rank, units)`.

    Args:
        layer: the `keras.layers.Dense` layer to adapt, built or not.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: a tensor of shape `(..., input_dim)`.
        training: Python bool; enables adapter dropout.

    Example:

    >>> layer = keras_lora.LoraDense(keras.layers.Dense(16), rank=4)
    >>> layer(np.ones((2, 8))).shape
    (2, 16)
    """

    base_class = keras.layers.Dense

    def factor_shapes(self, rank):
        input_dim, units = self.kernel_variable.shape
        return (input_dim, rank), (rank, units)

    @property
    def norm_axes(self):
        return (0,)

    def adapter_output(self, x, lora_a, lora_b):
        return ops.matmul(ops.matmul(x, lora_a), lora_b)

    def delta(self, lora_a, lora_b):
        return ops.matmul(lora_a, lora_b)
