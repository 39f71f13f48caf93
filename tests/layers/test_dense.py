"""LoraDense: the formula against NumPy, merge invariants over random shapes,
subclasses and quantized bases."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testing.layer_checks import (
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
)
from testing.references import numpy, numpy_weights, relu

from keras_lora import LoraDense


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("input_shape", [(3, 5), (2, 3, 5)], ids=["2d", "3d"])
def test_output_is_activation_of_base_plus_scaled_x_a_b(use_rslora, input_shape):
    wrapper = LoraDense(
        keras.layers.Dense(6, activation="relu"),
        rank=4,
        alpha=6.0,
        use_rslora=use_rslora,
        init=False,
    )
    x = np.random.default_rng(0).uniform(-1, 1, input_shape).astype("float32")
    outputs = run_layer_test(wrapper, x)

    kernel, bias, lora_a, lora_b, scale = numpy_weights(wrapper)
    assert scale == (6.0 / 2.0 if use_rslora else 6.0 / 4.0)
    expected = relu(x @ kernel + bias + (x @ lora_a @ lora_b) * scale)
    # float32 layer against a float64 reference.
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


def test_delta_weight_is_scale_times_a_b():
    wrapper = LoraDense(keras.layers.Dense(6), rank=4, alpha=2.0)
    wrapper.build((None, 5))
    wrapper.add_adapter("rs", rank=2, alpha=3.0, use_rslora=True)
    for name, seed in (("default", 1), ("rs", 2)):
        randomize_adapter(wrapper, name, seed=seed)
        _, _, lora_a, lora_b, scale = numpy_weights(wrapper, name)
        np.testing.assert_allclose(
            numpy(wrapper.get_delta_weight(name)),
            scale * lora_a @ lora_b,
            rtol=0,
            atol=1e-6,
        )
    np.testing.assert_array_equal(
        numpy(wrapper.get_delta_weight()), numpy(wrapper.get_delta_weight("default"))
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    input_dim=st.integers(1, 8),
    units=st.integers(1, 8),
    rank=st.integers(1, 8),
    alpha=st.floats(0.5, 16.0),
    use_rslora=st.booleans(),
    use_bias=st.booleans(),
)
def test_merge_invariants_hold_for_random_shapes(
    batch, input_dim, units, rank, alpha, use_rslora, use_bias
):
    wrapper = LoraDense(
        keras.layers.Dense(units, use_bias=use_bias),
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
    )
    wrapper.build((None, input_dim))
    randomize_adapter(wrapper, seed=rank)
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, input_dim))
    x = x.astype("float32")
    kernel = numpy(wrapper.layer.kernel)
    unmerged = numpy(wrapper(x))

    wrapper.merge()
    np.testing.assert_allclose(numpy(wrapper(x)), unmerged, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(numpy(wrapper(x)), numpy(wrapper.layer(x)))
    wrapper.unmerge()
    np.testing.assert_allclose(numpy(wrapper.layer.kernel), kernel, rtol=0, atol=1e-6)


class ScaledDense(keras.layers.Dense):
    """A Dense subclass that keeps Dense's call signature."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=training) * 2.0


class NoTrainingDense(keras.layers.Dense):
    """A Dense subclass whose call signature differs from Dense's."""

    def call(self, inputs):
        return super().call(inputs)


def test_subclass_with_the_dense_call_signature_is_wrapped():
    base = ScaledDense(3)
    x = np.ones((2, 4), "float32")
    expected = numpy(base(x))
    wrapper = LoraDense(base, rank=2)
    np.testing.assert_allclose(run_layer_test(wrapper, x), expected, rtol=0, atol=1e-6)


def test_subclass_with_another_call_signature_is_refused():
    with pytest.raises(TypeError, match="changes the call signature.*register_wrapper"):
        LoraDense(NoTrainingDense(3), rank=2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_is_adapted_and_saved_but_not_merged(mode, tmp_path):
    base = keras.layers.Dense(6)
    base.build((None, 8))
    base.quantize(mode)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8)).astype("float32")
    expected = numpy(base(x))
    wrapper = LoraDense(base, rank=2)
    assert tuple(wrapper.lora_a.shape) == (8, 2)
    assert tuple(wrapper.lora_b.shape) == (2, 6)
    np.testing.assert_allclose(run_layer_test(wrapper, x), expected, rtol=0, atol=1e-6)

    state = layer_state(wrapper)
    with pytest.raises(ValueError, match=f"wraps an {mode}-quantized base.*dequantize"):
        wrapper.merge()
    assert_unchanged(wrapper, state)

    randomize_adapter(wrapper)
    inputs = keras.Input((8,))
    model = keras.Model(inputs, wrapper(inputs))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.layers[-1].layer.quantization_mode == mode
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))
