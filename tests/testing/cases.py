"""The table of wrapper cases: every wrapper class around a real Keras layer
(strides, dilation, padding modes, groups, channels_first, mask_zero), small
enough for the whole layer suite to run in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import keras
import numpy as np

from keras_lora.layers import (
    LoraConv1D,
    LoraConv2D,
    LoraConv3D,
    LoraDense,
    LoraEinsumDense,
    LoraEmbedding,
    LoraLayer,
    LoraReversibleEmbedding,
)

RANK = 4
VOCABULARY = 10

layers = keras.layers


@dataclasses.dataclass(frozen=True)
class Case:
    """One wrapper around one configured Keras layer.

    `a_shape` and `b_shape` are the factor shapes at `RANK`, written out from
    DESIGN.md's table (Keras layout: inputs first, outputs last).
    """

    id: str
    wrapper: type[LoraLayer]
    base: Callable[..., keras.layers.Layer]
    input_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def integer_inputs(self) -> bool:
        return issubclass(self.wrapper, LoraEmbedding)

    @property
    def supports_dropout(self) -> bool:
        return not issubclass(self.wrapper, LoraEmbedding)

    def inputs(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.integer_inputs:
            # Every row has a 0 so that mask_zero has something to mask.
            ids = rng.integers(1, VOCABULARY, size=self.input_shape)
            ids[:, -1] = 0
            return ids.astype("int32")
        return rng.uniform(-1.0, 1.0, size=self.input_shape).astype("float32")

    def wrap(self, built: bool = True, **lora_kwargs) -> LoraLayer:
        """A wrapper (rank `RANK` unless given) around a fresh base layer."""
        base = self.base()
        if built:
            base.build(self.input_shape)
        lora_kwargs.setdefault("rank", RANK)
        return self.wrapper(base, **lora_kwargs)


CASES = [
    Case(
        "dense",
        LoraDense,
        functools.partial(layers.Dense, 6, activation="relu"),
        (2, 5),
        (5, RANK),
        (RANK, 6),
    ),
    Case(
        "einsum_attention",
        LoraEinsumDense,
        functools.partial(
            layers.EinsumDense,
            "abc,cde->abde",
            output_shape=(None, 2, 3),
            bias_axes="de",
        ),
        (2, 3, 5),
        (5, RANK),
        (RANK, 2, 3),
    ),
    Case(
        "einsum_output",
        LoraEinsumDense,
        functools.partial(
            layers.EinsumDense, "abcd,cde->abe", output_shape=(None, 6), bias_axes="e"
        ),
        (2, 3, 2, 3),
        (2, 3, RANK),
        (RANK, 6),
    ),
    Case(
        "einsum_matmul",
        LoraEinsumDense,
        functools.partial(layers.EinsumDense, "ab,bc->ac", output_shape=6),
        (2, 5),
        (5, RANK),
        (RANK, 6),
    ),
    Case(
        "conv1d",
        LoraConv1D,
        functools.partial(layers.Conv1D, 6, 3, activation="relu"),
        (2, 9, 3),
        (3, 3, RANK),
        (1, RANK, 6),
    ),
    Case(
        "conv1d_causal_dilated",
        LoraConv1D,
        functools.partial(layers.Conv1D, 6, 3, padding="causal", dilation_rate=2),
        (2, 9, 3),
        (3, 3, RANK),
        (1, RANK, 6),
    ),
    Case(
        "conv2d_strided_same",
        LoraConv2D,
        functools.partial(layers.Conv2D, 6, 3, strides=2, padding="same"),
        (2, 7, 7, 3),
        (3, 3, 3, RANK),
        (1, 1, RANK, 6),
    ),
    Case(
        "conv2d_dilated_valid",
        LoraConv2D,
        functools.partial(layers.Conv2D, 6, (3, 2), dilation_rate=2),
        (2, 8, 8, 3),
        (3, 2, 3, RANK),
        (1, 1, RANK, 6),
    ),
    Case(
        "conv2d_groups",
        LoraConv2D,
        functools.partial(layers.Conv2D, 6, 3, groups=2, padding="same"),
        (2, 6, 6, 4),
        (3, 3, 2, RANK),
        (1, 1, RANK // 2, 6),
    ),
    Case(
        "conv2d_channels_first",
        LoraConv2D,
        functools.partial(
            layers.Conv2D, 6, 3, strides=(1, 2), data_format="channels_first"
        ),
        (2, 3, 7, 7),
        (3, 3, 3, RANK),
        (1, 1, RANK, 6),
    ),
    Case(
        "conv3d",
        LoraConv3D,
        functools.partial(layers.Conv3D, 4, 2, strides=(1, 2, 1), padding="same"),
        (2, 4, 4, 4, 2),
        (2, 2, 2, 2, RANK),
        (1, 1, 1, RANK, 4),
    ),
    Case(
        "embedding",
        LoraEmbedding,
        functools.partial(layers.Embedding, VOCABULARY, 6),
        (2, 5),
        (VOCABULARY, RANK),
        (RANK, 6),
    ),
    Case(
        "embedding_mask_zero",
        LoraEmbedding,
        functools.partial(layers.Embedding, VOCABULARY, 6, mask_zero=True),
        (2, 5),
        (VOCABULARY, RANK),
        (RANK, 6),
    ),
    # The lookup direction, untied so that DoRA applies;
    # tests/layers/test_reversible_embedding.py checks the tied and reverse
    # directions.
    Case(
        "reversible_embedding",
        LoraReversibleEmbedding,
        functools.partial(layers.ReversibleEmbedding, VOCABULARY, 6, tie_weights=False),
        (2, 5),
        (VOCABULARY, RANK),
        (RANK, 6),
    ),
]

# One case per wrapper class, for the slower checks (fit, mixed precision).
TYPE_CASE_IDS = (
    "dense",
    "einsum_attention",
    "conv1d",
    "conv2d_strided_same",
    "conv3d",
    "embedding_mask_zero",
    "reversible_embedding",
)
TYPE_CASES = [case for case in CASES if case.id in TYPE_CASE_IDS]
DROPOUT_CASES = [case for case in CASES if case.supports_dropout]


def case_id(case: Case) -> str:
    return case.id
