"""The five training workloads of the suite, each at full and tiny size.

A workload builds a fresh, built base model (same seed, same weights every
time), a fixed batch, and names the layers LoRA adapts: the `targets` given to
`keras_lora.convert` and the same layers for Keras' built-in `enable_lora`.
The causal-LM workload needs keras-hub (the "hub" extra); the others Keras only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import keras
import numpy as np

RANK = 8
SEED = 1234


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model to fine-tune, and what LoRA adapts in it.

    Attributes:
        name: the workload's name in the report.
        description: what it is, for the report.
        build: returns a new built base model, seeded.
        batch: returns the fixed `(x, y)` training batch as NumPy arrays (`x`
            a dict of them for a keras-hub model).
        loss: the Keras loss.
        targets: `keras_lora.convert` targets.
        adapted: returns the layers of a base model `targets` selects, for
            Keras' built-in `enable_lora`.
        enable_builtin: how the `builtin` setup turns on Keras' built-in LoRA
            (on exactly the `adapted` layers, everything else frozen); `None`:
            `enable_lora(RANK)` on each `adapted` layer.
    """

    name: str
    description: str
    build: Callable[[], keras.Model]
    batch: Callable[[], tuple[object, np.ndarray]]
    loss: str | keras.losses.Loss
    targets: list
    adapted: Callable[[keras.Model], list[keras.layers.Layer]]
    enable_builtin: Callable[[keras.Model], None] | None = None


def dense(tiny: bool = False) -> Workload:
    """6 x Dense(1024, relu) + Dense(1024) on 16 x 64 tokens."""
    hidden, width, batch, tokens = (2, 32, 2, 4) if tiny else (6, 1024, 16, 64)

    def build():
        keras.utils.set_random_seed(SEED)
        layers = [keras.layers.Dense(width, activation="relu") for _ in range(hidden)]
        return keras.Sequential(
            [keras.Input((tokens, width)), *layers, keras.layers.Dense(width)]
        )

    return Workload(
        name="dense",
        description=f"{hidden} x Dense({width}, relu) + Dense({width}), "
        f"batch {batch} x {tokens} tokens",
        build=build,
        batch=lambda: _floats((batch, tokens, width), (batch, tokens, width)),
        loss="mse",
        targets=[keras.layers.Dense],
        adapted=lambda model: _of_type(model, keras.layers.Dense),
    )


def conv(tiny: bool = False) -> Workload:
    """4 x Conv2D(128, 3x3, same, relu) on 16 x 32 x 32 x 128."""
    count, channels, batch, side = (2, 8, 2, 8) if tiny else (4, 128, 16, 32)

    def build():
        keras.utils.set_random_seed(SEED)
        layers = [
            keras.layers.Conv2D(channels, 3, padding="same", activation="relu")
            for _ in range(count)
        ]
        return keras.Sequential([keras.Input((side, side, channels)), *layers])

    shape = (batch, side, side, channels)
    return Workload(
        name="conv",
        description=f"{count} x Conv2D({channels}, 3x3, same, relu) on "
        f"{batch} x {side} x {side} x {channels}",
        build=build,
        batch=lambda: _floats(shape, shape),
        loss="mse",
        targets=[keras.layers.Conv2D],
        adapted=lambda model: _of_type(model, keras.layers.Conv2D),
    )


def embedding(tiny: bool = False) -> Workload:
    """Embedding(50000, 256) -> average pooling -> Dense(4), 32 x 64 ids."""
    vocabulary, width, batch, tokens = (100, 16, 4, 8) if tiny else (50000, 256, 32, 64)

    def build():
        keras.utils.set_random_seed(SEED)
        return keras.Sequential(
            [
                keras.Input((tokens,), dtype="int32"),
                keras.layers.Embedding(vocabulary, width, name="embedding"),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(4, name="head"),
            ]
        )

    def batch_arrays():
        rng = np.random.default_rng(SEED)
        ids = rng.integers(0, vocabulary, (batch, tokens)).astype("int32")
        return ids, rng.integers(0, 4, (batch,)).astype("int32")

    return Workload(
        name="embedding",
        description=f"Embedding({vocabulary}, {width}) -> pooling -> Dense(4), "
        f"batch {batch} x {tokens} ids",
        build=build,
        batch=batch_arrays,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        targets=["embedding"],
        adapted=lambda model: [model.get_layer("embedding")],
    )


def attention(tiny: bool = False) -> Workload:
    """A 4-block post-norm transformer encoder, width 512, 8 heads, FFN 2048."""
    blocks, width, heads, batch, tokens = (
        (1, 16, 2, 2, 4) if tiny else (4, 512, 8, 16, 64)
    )

    def build():
        keras.utils.set_random_seed(SEED)
        inputs = keras.Input((tokens, width))
        x = inputs
        for i in range(blocks):
            attended = keras.layers.MultiHeadAttention(
                heads, width // heads, name=f"block_{i}_attention"
            )(x, x)
            x = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x + attended)
            hidden = keras.layers.Dense(
                4 * width, activation="relu", name=f"block_{i}_ffn_1"
            )(x)
            hidden = keras.layers.Dense(width, name=f"block_{i}_ffn_2")(hidden)
            x = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x + hidden)
        return keras.Model(inputs, x)

    def adapted(model):
        # MultiHeadAttention has no public handle on its projections; these
        # are the EinsumDense layers keras_lora's "query"/"value" select.
        return [
            projection
            for layer in model.layers
            if isinstance(layer, keras.layers.MultiHeadAttention)
            for projection in (layer._query_dense, layer._value_dense)
        ]

    shape = (batch, tokens, width)
    return Workload(
        name="attention",
        description=f"{blocks} transformer blocks (MultiHeadAttention width {width}, "
        f"{heads} heads, FFN {4 * width}), batch {batch} x {tokens} tokens",
        build=build,
        batch=lambda: _floats(shape, shape),
        loss="mse",
        targets=["query", "value"],
        adapted=adapted,
    )


def causal_lm(tiny: bool = False) -> Workload:
    """A Gemma-shaped keras-hub `GemmaCausalLM`, 4 layers, hidden 512, 4 x 128
    tokens, vocabulary 8192.

    Gemma 2B's proportions at hidden 512: 8 query heads x head_dim 64 (heads x
    head_dim = hidden), one key/value head (multi-query attention), a gated
    FFN 8 x hidden wide (keras-hub's `intermediate_dim` counts the gate and up
    projections together: 8192), RMSNorm, RoPE and the tied embedding as LM
    head. The vocabulary (8192) and batch (4) keep a full run of this workload
    to about 5 minutes on 2 shared cores (docs/performance.md says why).
    """
    if tiny:
        vocabulary, layers, heads, head_dim, batch, tokens = 64, 1, 2, 8, 2, 8
    else:
        vocabulary, layers, heads, head_dim, batch, tokens = 8192, 4, 8, 64, 4, 128
    hidden = heads * head_dim
    intermediate = 16 * hidden

    def build():
        import keras_hub  # the "hub" extra, for this workload only

        keras.utils.set_random_seed(SEED)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=vocabulary,
            num_layers=layers,
            num_query_heads=heads,
            num_key_value_heads=1,
            hidden_dim=hidden,
            intermediate_dim=intermediate,
            head_dim=head_dim,
        )
        return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)

    def batch_arrays():
        rng = np.random.default_rng(SEED)
        ids = rng.integers(0, vocabulary, (batch, tokens + 1)).astype("int32")
        inputs = {
            "token_ids": ids[:, :-1],
            "padding_mask": np.ones((batch, tokens), dtype="int32"),
        }
        return inputs, ids[:, 1:]

    def adapted(model):
        # The layers keras-hub's `enable_lora` adapts by default (named
        # "query" and "value"), the same keras_lora's targets select.
        return [
            projection
            for block in model.backbone.transformer_layers
            for projection in (block.attention.query_dense, block.attention.value_dense)
        ]

    return Workload(
        name="causal_lm",
        description=f"keras-hub GemmaCausalLM ({layers} layers, hidden {hidden}, "
        f"{heads} query heads x {head_dim}, 1 key/value head, FFN "
        f"{intermediate // 2} gated, vocabulary {vocabulary}, tied LM head), "
        f"batch {batch} x {tokens} tokens",
        build=build,
        batch=batch_arrays,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        targets=["query", "value"],
        adapted=adapted,
        enable_builtin=lambda model: model.backbone.enable_lora(RANK),
    )


WORKLOADS = {
    "dense": dense,
    "conv": conv,
    "embedding": embedding,
    "attention": attention,
    "causal_lm": causal_lm,
}
# The packages a workload needs beyond Keras, by import name.
REQUIRES = {"causal_lm": "keras_hub"}


def available() -> list[str]:
    """The workloads whose packages are installed here."""
    return [
        name
        for name in WORKLOADS
        if name not in REQUIRES or importlib.util.find_spec(REQUIRES[name])
    ]


def _floats(x_shape, y_shape):
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(x_shape).astype("float32")
    return x, rng.standard_normal(y_shape).astype("float32")


def _of_type(model, layer_type):
    return [layer for layer in model.layers if isinstance(layer, layer_type)]
