"""Which wrapper adapts which Keras class, and registering new ones."""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.layers import registry


class ScaledDense(keras.layers.Dense):
    """A Dense subclass with the same call signature: wrapped as a Dense."""


class ReversibleEmbedding(keras.layers.Embedding):
    """An Embedding with an extra call mode: no wrapper covers it."""

    def call(self, inputs, reverse=False):
        return super().call(inputs)


def test_wrapper_for_picks_the_most_specific_registered_class():
    assert registry.wrapper_for(keras.layers.Dense(2)) is keras_lora.LoraDense
    assert registry.wrapper_for(ScaledDense(2)) is keras_lora.LoraDense
    assert registry.wrapper_for(keras.layers.Conv2D(2, 3)) is keras_lora.LoraConv2D
    assert registry.wrapper_for(ReversibleEmbedding(4, 2)) is None
    assert registry.wrapper_for(keras.layers.Dropout(0.1)) is None
    assert registry.supported_classes()[:6] == (
        keras.layers.Dense,
        keras.layers.EinsumDense,
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.Conv3D,
        keras.layers.Embedding,
    )


def test_register_wrapper_makes_convert_adapt_the_class(monkeypatch):
    monkeypatch.setattr(registry, "_WRAPPERS", dict(registry._WRAPPERS))

    class OtherDense(keras.layers.Dense):
        def call(self, inputs, training=None, extra=None):
            return super().call(inputs)

    class LoraOtherDense(keras_lora.LoraDense):
        base_class = OtherDense

    assert registry.wrapper_for(OtherDense(2)) is None
    keras_lora.register_wrapper(OtherDense, LoraOtherDense)
    assert registry.wrapper_for(OtherDense(2)) is LoraOtherDense

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), OtherDense(3, name="other")])
    lora_model = keras_lora.convert(model, rank=2, init=False)
    layer = lora_model.get_layer("other")
    x = np.random.default_rng(0).random((2, 4)).astype("float32")
    kernel, bias = layer.layer.kernel.numpy(), layer.layer.bias.numpy()
    expected = x @ kernel + bias + x @ layer.lora_a.numpy() @ layer.lora_b.numpy()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(lora_model(x)), expected, rtol=0, atol=1e-5
    )


def test_register_wrapper_refuses_what_is_not_a_class_pair():
    with pytest.raises(TypeError, match="`layer_class` must be"):
        keras_lora.register_wrapper("Dense", keras_lora.LoraDense)
    with pytest.raises(TypeError, match="`wrapper_class` must be"):
        keras_lora.register_wrapper(keras.layers.Dense, keras.layers.Dense)


def test_restore_wraps_a_layer_with_the_recorded_adapters_and_state():
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    wrapper = keras_lora.LoraDense(dense, rank=2, init=False)
    wrapper.add_adapter("second", rank=3, alpha=6.0, init=False)
    wrapper.set_adapter(["default", "second"])
    x = np.random.default_rng(1).random((2, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(wrapper(x))

    restored = keras_lora.LoraDense.restore(dense, wrapper.get_config())
    for name in ("default", "second"):
        for factor in ("lora_a", "lora_b"):
            getattr(restored.adapters[name], factor).assign(
                getattr(wrapper.adapters[name], factor)
            )
    assert restored.layer is dense
    assert restored.active_adapters == ("default", "second")
    assert restored.adapters["second"].scale == 2.0
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(x)), expected, rtol=0, atol=1e-6
    )
