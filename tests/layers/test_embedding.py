"""LoraEmbedding: the lookup formula against NumPy, mask_zero, float ids under
mixed precision, and what it refuses (dropout, a `reverse` call mode)."""

import keras
import numpy as np
import pytest
from testing.layer_checks import (
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
)
from testing.references import numpy, numpy_weights

from keras_lora import LoraEmbedding


def ids(vocabulary=10, shape=(3, 5), seed=0):
    values = np.random.default_rng(seed).integers(0, vocabulary, size=shape)
    values[:, -1] = 0
    return values.astype("int32")


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_output_is_rows_of_e_plus_scaled_rows_of_a_times_b(use_rslora):
    wrapper = LoraEmbedding(
        keras.layers.Embedding(10, 6), rank=4, alpha=2.0, use_rslora=use_rslora
    )
    wrapper.build((None, 5))
    randomize_adapter(wrapper)
    x = ids()
    outputs = run_layer_test(wrapper, x)

    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    assert scale == (2.0 / 2.0 if use_rslora else 2.0 / 4.0)
    expected = embeddings[x] + (lora_a[x] @ lora_b) * scale
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        numpy(wrapper.get_delta_weight()), scale * lora_a @ lora_b, rtol=0, atol=1e-6
    )


def test_mask_zero_is_kept_and_masks_downstream_layers():
    wrapper = LoraEmbedding(keras.layers.Embedding(10, 6, mask_zero=True), rank=4)
    x = ids()
    np.testing.assert_array_equal(numpy(wrapper.compute_mask(x)), x != 0)

    wrapper.build(x.shape)
    randomize_adapter(wrapper)
    inputs = keras.Input((5,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(wrapper(inputs))
    model = keras.Model(inputs, pooled)
    vectors = numpy(wrapper(x))
    mask = (x != 0)[..., None]
    expected = (vectors * mask).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(numpy(model(x)), expected, rtol=0, atol=1e-6)


def test_without_mask_zero_there_is_no_mask():
    wrapper = LoraEmbedding(keras.layers.Embedding(10, 6), rank=4)
    assert wrapper.compute_mask(ids()) is None


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_float_ids_look_up_the_same_rows_as_the_base(policy, dtype_policy):
    # Ids above 256 (bfloat16) or 2048 (float16) are not representable in the
    # compute dtype, so the wrapper must not cast its inputs where the base
    # Embedding does not.
    dtype_policy(policy)
    base = keras.layers.Embedding(3000, 4)
    x = np.array([[2999.0, 2049.0, 257.0, 1.0]], "float32")
    expected = numpy(keras.ops.cast(base(x), "float32"))
    wrapper = LoraEmbedding(base, rank=2)
    outputs = numpy(keras.ops.cast(wrapper(x), "float32"))
    np.testing.assert_array_equal(outputs, expected)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, wrapper(inputs))
    outputs = numpy(keras.ops.cast(model(x), "float32"))
    np.testing.assert_array_equal(outputs, expected)


@pytest.mark.parametrize("dropout", [0.1, 0.5])
def test_dropout_is_refused(dropout):
    with pytest.raises(ValueError, match="LoraEmbedding takes no dropout"):
        LoraEmbedding(keras.layers.Embedding(10, 6), rank=4, dropout=dropout)

    wrapper = LoraEmbedding(keras.layers.Embedding(10, 6), rank=4)
    wrapper.build((None, 5))
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match=f"takes no dropout.*dropout={dropout}"):
        wrapper.add_adapter("dropped", rank=2, dropout=dropout)
    assert_unchanged(wrapper, state)


class ReversibleEmbedding(keras.layers.Embedding):
    """An Embedding with a `reverse` mode (tied output projection), as in
    keras-hub: the adapter would not apply to the reverse path."""

    def call(self, inputs, reverse=False):
        if reverse:
            return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
        return super().call(inputs)


class ClippedEmbedding(keras.layers.Embedding):
    def call(self, inputs):
        return keras.ops.clip(super().call(inputs), -1.0, 1.0)


def test_embedding_with_a_reverse_mode_is_refused():
    with pytest.raises(TypeError, match="changes the call signature.*register_wrapper"):
        LoraEmbedding(ReversibleEmbedding(10, 6), rank=4)


def test_subclass_with_the_embedding_call_signature_is_wrapped():
    base = ClippedEmbedding(10, 6)
    x = ids()
    expected = numpy(base(x))
    wrapper = LoraEmbedding(base, rank=4)
    np.testing.assert_array_equal(run_layer_test(wrapper, x), expected)


def test_base_built_without_an_input_shape_is_wrapped_and_saved(tmp_path):
    base = keras.layers.Embedding(10, 6)
    base.build()  # Embedding needs no input shape; its build config has none.
    wrapper = LoraEmbedding(base, rank=4)
    assert wrapper.built and tuple(wrapper.lora_a.shape) == (10, 4)
    x = ids()
    np.testing.assert_array_equal(run_layer_test(wrapper, x), numpy(base(x)))

    randomize_adapter(wrapper)
    inputs = keras.Input((5,), dtype="int32")
    model = keras.Model(inputs, wrapper(inputs))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))
