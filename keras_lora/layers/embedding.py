"""LoraEmbedding: LoRA for `keras.layers.Embedding`."""

from __future__ import annotations

import keras
from keras import ops

from keras_lora.layers.base import LoraLayer


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraEmbedding(LoraLayer):
    """LoRA adapter around a `keras.layers.Embedding` layer.

    `outputs = take(E, ids) + scale * take(A, ids) @ B` with `A` of shape
    `(input_dim, rank)` and `B` of shape `(rank, output_dim)`. As in peft, `A`
    starts at zero and `B` standard normal, and there is no dropout (the input
    is integer ids). `mask_zero` is kept: the wrapper returns the base mask.

    Args:
        layer: the `keras.layers.Embedding` layer to adapt, built or not.
        rank, alpha, use_rslora, init, use_dora, adapter_name: the first
            adapter, see `keras_lora.layers.LoraLayer`. With DoRA the
            magnitude has one entry per embedding dimension, the norm running
            over the vocabulary (peft's `DoraEmbeddingLayer`).
        dropout: must be 0; embedding adapters take no dropout.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: integer ids of any shape.

    Example:

    >>> layer = keras_lora.LoraEmbedding(keras.layers.Embedding(100, 16), rank=4)
    >>> layer(np.array([[1, 2, 3]])).shape
    (1, 3, 16)
    """

    base_class = keras.layers.Embedding
    zero_factor = "a"

    def check_settings(self, settings):
        if settings.dropout:
            raise ValueError(
                "LoraEmbedding takes no dropout: its inputs are integer ids. "
                f"Received: dropout={settings.dropout!r}"
            )

    @classmethod
    def kernel_of(cls, layer):
        return layer.embeddings

    def factor_shapes(self, rank):
        input_dim, output_dim = self.kernel_variable.shape
        return (input_dim, rank), (rank, output_dim)

    @property
    def norm_axes(self):
        return (0,)

    def adapter_output(self, x, lora_a, lora_b):
        if "int" not in str(x.dtype):
            x = ops.cast(x, "int32")
        return ops.matmul(ops.take(lora_a, x, axis=0), lora_b)

    def delta(self, lora_a, lora_b):
        return ops.matmul(lora_a, lora_b)
