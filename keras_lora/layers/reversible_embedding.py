"""LoraReversibleEmbedding: LoRA for a token embedding that is also the output
projection (`keras.layers.ReversibleEmbedding`, keras-hub's token embedding)."""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from keras_lora.hub_lookup import imported_keras_hub
from keras_lora.layers.adapter_routing import routing_for_call
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.embedding import LoraEmbedding
from keras_lora.tree.keras_private import attach_mask, substituted_variable

# Keras >= 3.13 has the layer natively; keras-hub's is a subclass of it there.
KERAS_REVERSIBLE_EMBEDDING = getattr(keras.layers, "ReversibleEmbedding", None)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraReversibleEmbedding(LoraEmbedding):
    """LoRA adapter around a `keras.layers.ReversibleEmbedding` layer.

    Lookup (`reverse=False`), as `LoraEmbedding`:
    `outputs = take(E, ids) + scale * take(A, ids) @ B`, with `A` of shape
    `(input_dim, rank)` (zeros at first) and `B` of shape `(rank, output_dim)`
    (standard normal), as peft's `Embedding`.

    Reverse (`reverse=True`) with tied weights (`tie_weights=True`, the same
    matrix projects hidden states back to the vocabulary):
    `logits = soft_cap(x @ E.T + scale * (x @ B.T) @ A.T)`, computed
    factorised: `E + scale * A @ B` is never formed while training, so the
    adapter gets its gradient from both directions. The base layer's
    `reverse_dtype` (the dtype the logits are computed in, the adapter term
    included) and `logit_soft_cap` (applied after the adapter term) are kept.
    `merge()` folds `scale * A @ B` into `E`, which both directions read.

    With `tie_weights=False` the reverse projection is the base layer's own
    `reverse_embeddings` kernel, which this wrapper does not adapt: the
    adapter applies to the lookup only, and `reverse=True` returns the base
    layer's logits.

    DoRA is refused with tied weights (its magnitude rescales the embedding
    dimensions of the matrix the reverse projection also reads, which has no
    factorised form here). A quantized base is supported with tied weights
    only (its untied `reverse_embeddings` cannot be dequantized by
    `keras_lora.merge_and_unload(model, dequantize=True)`).

    keras-hub's `keras_hub.layers.ReversibleEmbedding` is wrapped too: a
    subclass of Keras' class in current keras-hub, its own class in older
    releases (found once `keras_hub` is imported; keras_lora never imports it).

    Args:
        layer: the `keras.layers.ReversibleEmbedding` layer to adapt, built or
            not.
        rank, alpha, use_rslora, init, use_dora, adapter_name: the first
            adapter, see `keras_lora.layers.LoraLayer`. `use_dora=True` needs
            `tie_weights=False`.
        dropout: must be 0; embedding adapters take no dropout.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: integer ids of any shape, or with `reverse=True` hidden states
            of shape `(..., output_dim)`.
        reverse: Python bool; project hidden states to `input_dim` logits
            instead of looking up ids.
        training: Python bool. Training a merged layer raises `ValueError`.
        adapter_names, adapter_index: inference only: per-example adapters, in
            both directions; see `keras_lora.layers.LoraLayer`.

    Example:

    >>> embedding = keras.layers.ReversibleEmbedding(100, 16)
    >>> layer = keras_lora.LoraReversibleEmbedding(embedding, rank=4)
    >>> hidden = layer(np.array([[1, 2, 3]]))
    >>> layer(hidden, reverse=True).shape
    (1, 3, 100)
    """

    base_class = KERAS_REVERSIBLE_EMBEDDING or keras.layers.Embedding

    def call(
        self,
        inputs,
        reverse=False,
        training=None,
        adapter_names=None,
        adapter_index=None,
    ):
        if not reverse:
            outputs = super().call(inputs, training, adapter_names, adapter_index)
            # Keras' ReversibleEmbedding attaches its mask in `call` (its
            # `compute_mask` returns None, for the reverse direction); the
            # adapter update made a new tensor, so the mask is attached again.
            return attach_mask(
                outputs, keras.layers.Embedding.compute_mask(self.layer, inputs)
            )
        routing = routing_for_call(self, adapter_names, adapter_index)
        if routing is not None:
            routing.check(self, inputs, training)
        self._refuse_merged_training(training)
        if (
            self._merged_adapters
            or not self._adapters_enabled
            or not self.layer.tie_weights
        ):
            return self.layer(inputs, reverse=True, training=training)
        if (
            routing is None
            and not training
            and self._folding_is_cheaper(inputs, reverse=True)
        ):
            # Embedding does not autocast: the base reads the kernel in the
            # variable's dtype, and so must read the folded one.
            folded = ops.cast(
                self._kernel_plus(self._active_adapters), self.kernel_variable.dtype
            )
            with substituted_variable(self.layer, self.kernel_variable, folded):
                return self.layer(inputs, reverse=True, training=training)
        with _without_soft_cap(self.layer) as soft_cap:
            logits = self.layer(inputs, reverse=True, training=training)
        if routing is None:
            for name in self._active_adapters:
                update = self._reverse_update(self._adapters[name], inputs, logits)
                logits = logits + update
        else:
            for position, name in routing.adapters():
                update = self._reverse_update(self._adapters[name], inputs, logits)
                logits = logits + routing.select(position, update)
        if soft_cap is None:
            return logits
        return ops.multiply(ops.tanh(ops.divide(logits, soft_cap)), soft_cap)

    def compute_output_shape(self, input_shape, reverse=False):
        output_shape = list(input_shape)
        if reverse:
            output_shape[-1] = self.layer.input_dim
        else:
            output_shape.append(self.layer.output_dim)
        return tuple(output_shape)

    def compute_output_spec(self, inputs, reverse=False, **kwargs):
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape, reverse), dtype=self.compute_dtype
        )

    def check_settings(self, settings):
        if settings.use_dora and self.layer.tie_weights:
            raise ValueError(
                f"Layer '{self.layer.name}' cannot take a DoRA adapter: its embeddings "
                "are tied to the output projection (`reverse=True`), and DoRA's "
                "magnitude per embedding dimension has no factorised form there. "
                "Use use_dora=False for this layer (leave it out of a DoRA "
                "config's `targets`). Received: use_dora=True"
            )
        super().check_settings(settings)

    def _check_layer(self, layer):
        reversible = reversible_embedding_class(layer)
        if reversible is None:
            if isinstance(layer, keras.layers.Layer) and not isinstance(
                layer, LoraLayer
            ):
                raise TypeError(
                    "LoraReversibleEmbedding wraps keras.layers."
                    "ReversibleEmbedding layers (or keras-hub's); use "
                    "keras_lora.LoraEmbedding for a plain Embedding. Received: "
                    f"layer={layer.name} of type {type(layer).__name__}"
                )
        else:
            # The base checks compare the layer with the class that gives it
            # its reverse mode: Keras', or an older keras-hub's own class. Set
            # on the instance, before Keras' attribute tracking exists.
            self.__dict__["base_class"] = reversible
        super()._check_layer(layer)
        mode = getattr(layer, "quantization_mode", None)
        if mode and not layer.tie_weights:
            raise ValueError(
                f"Layer '{layer.name}' is an {mode}-quantized ReversibleEmbedding "
                "with untied weights, whose quantized `reverse_embeddings` "
                "`keras_lora.merge_and_unload(model, dequantize=True)` cannot "
                "dequantize. Adapt the float model, then quantize it. "
                f"Received: layer={layer.name}"
            )

    def _reverse_update(self, adapter, inputs, logits):
        """`scale * (x @ B.T) @ A.T` of one adapter, computed in the dtype of
        the base `logits` (its `reverse_dtype`, or what its matmul promoted
        to), as the base computes them."""
        dtype = keras.backend.standardize_dtype(logits.dtype)
        lora_b = ops.cast(adapter.lora_b, dtype)
        if adapter.scale != 1.0:
            lora_b = lora_b * adapter.scale
        hidden = ops.matmul(ops.cast(inputs, dtype), ops.transpose(lora_b))
        return ops.matmul(hidden, ops.transpose(ops.cast(adapter.lora_a, dtype)))


def keras_hub_reversible_embedding() -> type | None:
    """keras-hub's `ReversibleEmbedding` class if `keras_hub` is imported,
    else `None`; never imports it (importing keras-hub is slow)."""
    layers = imported_keras_hub("layers")
    cls = getattr(layers, "ReversibleEmbedding", None)
    if isinstance(cls, type) and issubclass(cls, keras.layers.Embedding):
        return cls
    return None


def reversible_embedding_class(layer) -> type | None:
    """The class that gives `layer` its `reverse` call mode: keras-hub's or
    Keras' `ReversibleEmbedding`, whichever comes first in its MRO, or `None`.
    """
    known = {KERAS_REVERSIBLE_EMBEDDING, keras_hub_reversible_embedding()}
    known.discard(None)
    return next((cls for cls in type(layer).__mro__ if cls in known), None)


@contextlib.contextmanager
def _without_soft_cap(layer):
    """Runs `layer` without its `logit_soft_cap`, yielding the cap: the cap
    applies to the logits with the adapter term added."""
    soft_cap = getattr(layer, "logit_soft_cap", None)
    if soft_cap is None:
        yield None
        return
    layer.logit_soft_cap = None
    try:
        yield soft_cap
    finally:
        layer.logit_soft_cap = soft_cap
