"""Models around a wrapper: fitting briefly, saving and loading, tracing."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from keras_lora.layers import LoraLayer
from testing.cases import Case


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
