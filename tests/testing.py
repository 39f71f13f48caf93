"""Shared test helpers: the table of wrapper cases, small `run_layer_test`-style
checks, and NumPy references for the LoRA formulas of DESIGN.md.

Every case is a real Keras layer, small enough for the whole layer suite to run
in seconds on a CPU. Tolerances are stated where they are used.
"""

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


# -- run_layer_test-style checks ---------------------------------------------


def run_layer_test(layer: LoraLayer, inputs, training=False) -> np.ndarray:
    """Calls `layer` eagerly and symbolically and checks the wrapper contract.

    Checks: the output shape is `compute_output_shape`'s, a symbolic call gives
    the same shape, every variable is listed once, the trainable variables are
    exactly the active adapters' parameters (factors, DoRA magnitude), and the
    base variables are frozen.

    Returns:
        The eager output as a NumPy array.
    """
    outputs = layer(inputs, training=training)
    # EinsumDense reports the `None` of its `output_shape` argument, not the
    # actual size, so `None` matches any size.
    assert_shape_matches(outputs.shape, layer.compute_output_shape(inputs.shape))
    symbolic = layer(keras.Input(batch_shape=inputs.shape, dtype=inputs.dtype))
    assert_shape_matches(outputs.shape, symbolic.shape)
    assert_listed_once(layer.weights)
    active = [
        variable
        for name in layer.active_adapters
        for variable in layer.adapters[name].parameters.values()
    ]
    assert same_variables(layer.trainable_weights, active)
    assert not layer.layer.trainable
    assert all(
        any(variable is frozen for frozen in layer.non_trainable_weights)
        for variable in layer.layer.weights
    )
    return keras.ops.convert_to_numpy(outputs)


def assert_shape_matches(shape, expected) -> None:
    assert len(shape) == len(expected), (shape, expected)
    assert all(e is None or e == s for s, e in zip(shape, expected, strict=True))


def assert_listed_once(variables) -> None:
    ids = [id(variable) for variable in variables]
    assert len(ids) == len(set(ids)), [variable.path for variable in variables]


def same_variables(left, right) -> bool:
    """Whether two lists hold the same variables (by identity), in any order."""
    return sorted(map(id, left)) == sorted(map(id, right))


def layer_state(layer: LoraLayer) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "adapter_names": layer.adapter_names,
        "active_adapters": layer.active_adapters,
        "merged_adapters": layer.merged_adapters,
        "adapters_enabled": layer.adapters_enabled,
        "settings": {name: a.settings() for name, a in layer.adapters.items()},
        "trainable": [variable.path for variable in layer.trainable_weights],
        "weights": [(v.path, keras.ops.convert_to_numpy(v)) for v in layer.weights],
    }


def assert_unchanged(layer: LoraLayer, state: dict) -> None:
    now, expected = layer_state(layer), dict(state)
    weights, expected_weights = now.pop("weights"), expected.pop("weights")
    assert now == expected
    assert [path for path, _ in weights] == [path for path, _ in expected_weights]
    for (_, value), (_, expected_value) in zip(weights, expected_weights, strict=True):
        np.testing.assert_array_equal(value, expected_value)


def randomize_adapter(layer: LoraLayer, adapter_name=None, seed=0) -> None:
    """Gives an adapter's factors random non-zero values (std 0.5)."""
    adapter = layer.adapters[adapter_name or layer.active_adapter]
    rng = np.random.default_rng(seed)
    for variable in (adapter.lora_a, adapter.lora_b):
        variable.assign(rng.normal(0.0, 0.5, size=variable.shape).astype("float32"))


def numpy_weights(layer: LoraLayer, adapter_name=None):
    """`(kernel, bias, A, B, scale)` of the base layer and one adapter, float64."""
    adapter = layer.adapters[adapter_name or layer.active_adapter]
    base = layer.layer
    kernel = base.embeddings if isinstance(base, layers.Embedding) else base.kernel
    bias = getattr(base, "bias", None)

    def float64(variable):
        return keras.ops.convert_to_numpy(variable).astype("float64")

    return (
        float64(kernel),
        None if bias is None else float64(bias),
        float64(adapter.lora_a),
        float64(adapter.lora_b),
        adapter.scale,
    )


# -- models around a wrapper ---------------------------------------------------


def model_around(layer: LoraLayer, case: Case) -> keras.Model:
    inputs = keras.Input(
        shape=case.input_shape[1:],
        dtype="int32" if case.integer_inputs else "float32",
    )
    return keras.Model(inputs, layer(inputs))


def fit_briefly(
    model: keras.Model, inputs, steps: int = 3, seed: int = 0, jit_compile="auto"
):
    """Fits `model` to random targets for `steps` full-batch steps (adam, mse);
    returns the loss history. `jit_compile` is passed to `compile`."""
    outputs = keras.ops.convert_to_numpy(model(inputs))
    targets = np.random.default_rng(seed).normal(size=outputs.shape)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=jit_compile
    )
    history = model.fit(
        inputs, targets.astype("float32"), batch_size=len(inputs), epochs=steps
    )
    return history.history["loss"]


def assert_fit_changes_only(model: keras.Model, inputs, trained, frozen) -> None:
    """Fits `model` briefly and checks that every variable in `trained`
    changed and none in `frozen` did."""

    def values(variables):
        return [keras.ops.convert_to_numpy(variable) for variable in variables]

    trained_before, frozen_before = values(trained), values(frozen)
    losses = fit_briefly(model, inputs, steps=3)
    assert np.all(np.isfinite(losses))
    for variable, before in zip(frozen, frozen_before, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(variable), before), (
            variable.path
        )
    for variable, before in zip(trained, trained_before, strict=True):
        assert not np.array_equal(keras.ops.convert_to_numpy(variable), before), (
            variable.path
        )


def save_and_load(model: keras.Model, tmp_path) -> keras.Model:
    path = tmp_path / "model.keras"
    model.save(path)
    return keras.models.load_model(path)


def traced(function: Callable) -> Callable:
    """`function` compiled by the backend's tracer (`tf.function`, `jax.jit`),
    so that its tensor arguments are symbolic while it is traced; a test that
    uses it is marked `backends.symbolic_tracing`, which skips the others."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    if backend == "jax":
        import jax

        return jax.jit(function)
    raise RuntimeError(
        f"`traced` has no symbolic tracer on the {backend} backend; mark the "
        "test `backends.symbolic_tracing`."
    )


# -- NumPy references ----------------------------------------------------------


def relu(x):
    return np.maximum(x, 0.0)


def numpy_conv(x, kernel, strides, padding, dilation_rate, groups=1):
    """A direct N-d convolution, channels_last, as Keras defines it.

    Args:
        x: `(batch, *spatial, in)`.
        kernel: `(*kernel_size, in / groups, out)`.
        padding: `"valid"`, `"same"` (TensorFlow's split: extra pad at the end)
            or `"causal"` (1-D: left pad only).
    """
    kernel_size = kernel.shape[:-2]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation_rate, strict=True)]
    if padding == "same":
        pads = []
        for size, span, stride in zip(x.shape[1:-1], spans, strides, strict=True):
            total = max((-(-size // stride) - 1) * stride + span - size, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "causal":
        pads = [(spans[0] - 1, 0)]
    else:
        pads = [(0, 0)] * len(kernel_size)
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_sizes = [
        (size - span) // stride + 1
        for size, span, stride in zip(x.shape[1:-1], spans, strides, strict=True)
    ]
    in_per_group = kernel.shape[-2]
    out_per_group = kernel.shape[-1] // groups
    outputs = np.zeros((x.shape[0], *out_sizes, kernel.shape[-1]))
    for offset in np.ndindex(*kernel_size):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(
                offset, dilation_rate, out_sizes, strides, strict=True
            )
        )
        patch = x[(slice(None), *window)]
        for g in range(groups):
            cols = slice(g * out_per_group, (g + 1) * out_per_group)
            rows = slice(g * in_per_group, (g + 1) * in_per_group)
            outputs[..., cols] += patch[..., rows] @ kernel[offset][:, cols]
    return outputs


def numpy_conv_delta(lora_a, lora_b, groups=1):
    """`einsum('...ir,ro->...io', A, B)` per group, as DESIGN.md states it."""
    rank, filters = lora_a.shape[-1], lora_b.shape[-1]
    rank_per_group, filters_per_group = rank // groups, filters // groups
    b = lora_b.reshape(rank_per_group, filters)
    delta = np.zeros((*lora_a.shape[:-1], filters))
    for g in range(groups):
        ranks = slice(g * rank_per_group, (g + 1) * rank_per_group)
        cols = slice(g * filters_per_group, (g + 1) * filters_per_group)
        delta[..., cols] = np.einsum("...ir,ro->...io", lora_a[..., ranks], b[:, cols])
    return delta
