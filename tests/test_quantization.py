"""LoRA on a base quantized by Keras (QLoRA-style): adapters train in float32
over an int8/int4 base, and `merge_and_unload(dequantize=True)` gives a plain
float model whose kernels are the dequantized base kernels plus the update."""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.quantization import dequantized_kernel
from keras_lora.tree.walk import walk

layers = keras.layers
quantizers = keras.quantizers
IDS = np.random.default_rng(0).integers(0, 20, (4, 6)).astype("int32")
TARGETS = ["emb", "proj", "dense"]
# `model.quantize` warns about every layer it has nothing to quantize in.
pytestmark = pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize`")

# Keras' int8 also quantizes each input row to int8 (activation
# quantization) unless told not to; int4 is weight-only by default.
MODES = {
    "int8": ("int8", lambda: None),
    "int8_weight_only": (
        "int8",
        lambda: quantizers.Int8QuantizationConfig(activation_quantizer=None),
    ),
    "int4_per_channel": (
        "int4",
        lambda: quantizers.Int4QuantizationConfig(block_size=-1),
    ),
    "int4_grouped": (
        "int4",
        lambda: quantizers.Int4QuantizationConfig(block_size=4),
    ),
}
WEIGHT_ONLY = ["int8_weight_only", "int4_per_channel", "int4_grouped"]


def build_base(seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32", name="ids")
    x = layers.Embedding(20, 16, name="emb")(ids)
    x = layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 8), bias_axes="de", name="proj"
    )(x)
    x = layers.Reshape((6, 16))(x)
    x = layers.Dense(8, activation="relu", name="dense")(x)
    return keras.Model(ids, layers.Dense(3, name="head")(x))


def quantized_base(mode):
    model = build_base()
    name, config = MODES[mode]
    model.quantize(name, config=config())
    return model


def kernel_of(layer):
    return layer.embeddings if isinstance(layer, layers.Embedding) else layer.kernel


def numpy_delta(layer):
    """`scale * A @ B` in the kernel's layout, from the factors."""
    a, b = (np.asarray(v) for v in (layer.lora_a, layer.lora_b))
    adapter = layer.adapters[layer.active_adapter]
    return np.tensordot(a, b, axes=1) * adapter.scale


@pytest.mark.parametrize("mode", MODES)
def test_conversion_keeps_the_quantized_outputs_and_float32_adapters(mode):
    base = quantized_base(mode)
    expected = keras.ops.convert_to_numpy(base(IDS))
    model = keras_lora.convert(base, rank=2, targets=TARGETS)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(IDS)), expected)
    for layer in keras_lora.lora_layers(model).values():
        assert layer.layer.quantization_mode == MODES[mode][0]
    assert {v.dtype for v in model.trainable_weights} == {"float32"}
    assert len(model.trainable_weights) == 2 * len(TARGETS)


@pytest.mark.parametrize("mode", ["int8", "int4_grouped"])
def test_training_changes_only_the_adapters_and_reduces_the_loss(mode):
    model = keras_lora.convert(quantized_base(mode), rank=2, targets=TARGETS)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=False)
    before = {v.path: v.numpy().copy() for v in model.weights}
    targets = np.random.default_rng(1).normal(size=(4, 6, 3)).astype("float32")
    history = model.fit(IDS, targets, epochs=8, verbose=0).history["loss"]
    assert history[-1] < history[0]
    changed = {
        v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path])
    }
    assert changed == {
        f"{name}/default/{factor}"
        for name in TARGETS
        for factor in ("lora_a", "lora_b")
    }


def single_layers():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 16)).astype("float32")
    dense = layers.Dense(8)
    einsum = layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de"
    )
    embedding = layers.Embedding(20, 8)
    return [
        (dense, x, lambda k: x @ k + dense.bias.numpy()),
        (einsum, x, lambda k: np.einsum("abc,cde->abde", x, k) + einsum.bias.numpy()),
        (embedding, IDS, lambda k: k[IDS]),
    ]


@pytest.mark.parametrize("mode", WEIGHT_ONLY)
def test_dequantized_kernel_is_the_kernel_the_layer_computes_with(mode):
    for layer, inputs, reference in single_layers():
        layer(inputs)
        float_kernel = np.asarray(kernel_of(layer))
        name, config = MODES[mode]
        layer.quantize(name, config=config())
        kernel = dequantized_kernel(layer)
        assert kernel.shape == float_kernel.shape and kernel.dtype == np.float32
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer(inputs)), reference(kernel), atol=1e-5
        )
        if mode != "int4_grouped":
            # One rounding step at most (Keras' grouped int4 also clips).
            levels = 127 if name == "int8" else 7
            assert (
                np.abs(kernel - float_kernel).max()
                <= np.abs(float_kernel).max() / levels
            )


def test_merge_into_a_quantized_base_is_refused_with_a_pointer_to_dequantize():
    model = keras_lora.convert(
        quantized_base("int8"), rank=2, targets=TARGETS, init=False
    )
    expected = keras.ops.convert_to_numpy(model(IDS))
    with pytest.raises(ValueError, match=r"merge_and_unload\(model, dequantize=True\)"):
        keras_lora.merge_and_unload(model)
    assert not any(layer.merged for layer in keras_lora.lora_layers(model).values())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(IDS)), expected)


@pytest.mark.parametrize("mode", MODES)
def test_dequantize_merge_gives_a_plain_float_model(mode):
    model = keras_lora.convert(
        quantized_base(mode), rank=2, targets=TARGETS, init=False
    )
    lora = keras_lora.lora_layers(model)
    expected_kernels = {
        path: dequantized_kernel(layer.layer) + numpy_delta(layer)
        for path, layer in lora.items()
    }
    expected = keras.ops.convert_to_numpy(model(IDS))
    plain = keras_lora.merge_and_unload(model, dequantize=True)
    for site in walk(plain).values():
        assert not type(site.layer).__module__.startswith("keras_lora")
    for path, kernel in expected_kernels.items():
        layer = plain.get_layer(path)
        assert layer.quantization_mode is None
        assert layer.dtype_policy.name == "float32"
        np.testing.assert_allclose(kernel_of(layer), kernel, atol=1e-6)
        if path != "emb":
            np.testing.assert_array_equal(layer.bias, lora[path].layer.bias)
    # Layers without adapters keep their quantization.
    assert plain.get_layer("head").quantization_mode == MODES[mode][0]
    outputs = keras.ops.convert_to_numpy(plain(IDS))
    # Weight-only bases compute exactly what the float model does. With
    # activation quantization the quantized base rounds each input row to 127
    # levels and the float model does not: within 3% of the output range.
    atol = 1e-5 if mode in WEIGHT_ONLY else 0.03 * np.abs(expected).max()
    np.testing.assert_allclose(outputs, expected, atol=atol)
    # The LoRA model is untouched: its base stays quantized and unmerged.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(IDS)), expected)


def test_dequantize_merges_float_bases_as_usual():
    base = build_base()
    base.get_layer("proj").quantize("int4")
    model = keras_lora.convert(base, rank=2, targets=TARGETS, init=False)
    expected = keras.ops.convert_to_numpy(model(IDS))
    plain = keras_lora.merge_and_unload(model, dequantize=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(plain(IDS)), expected, atol=1e-5
    )
    assert all(layer.quantization_mode is None for layer in plain.layers)


def test_dequantize_refuses_disabled_adapters_and_other_modes():
    model = keras_lora.convert(quantized_base("int8"), rank=2, targets=TARGETS)
    with keras_lora.disable_adapters(model):
        with pytest.raises(ValueError, match="has its adapters disabled"):
            keras_lora.merge_and_unload(model, dequantize=True)
    dense = keras_lora.lora_layers(model)["dense"]
    dense.lora_b.assign(np.full(dense.lora_b.shape, np.inf, "float32"))
    with pytest.raises(ValueError, match="gives non-finite weights; nothing was"):
        keras_lora.merge_and_unload(model, dequantize=True, safe=True)
    assert keras_lora.lora_layers(model)["dense"] is dense
    float8 = layers.Dense(4)
    float8.build((None, 8))
    with pytest.raises(ValueError, match="Received: quantization_mode=None"):
        dequantized_kernel(float8)
    float8.quantize("float8")
    with pytest.raises(ValueError, match="Received: quantization_mode='float8'"):
        dequantized_kernel(float8)
    with pytest.raises(
        ValueError, match="can dequantize Dense, EinsumDense, Embedding"
    ):
        dequantized_kernel(layers.Conv1D(2, 3))


def test_keras_private_einsum_scale_layout_still_exists():
    # keras_lora.quantization undoes the int8 EinsumDense scale layout with
    # Keras' private `_adjust_scale_for_dequant`; a Keras release that drops
    # it must fail here first.
    assert callable(getattr(layers.EinsumDense, "_adjust_scale_for_dequant", None))


def test_adapters_of_a_quantized_base_save_and_load(tmp_path):
    model = keras_lora.convert(
        quantized_base("int4_grouped"), rank=2, targets=TARGETS, init=False
    )
    keras_lora.save_adapter(model, tmp_path / "qlora")
    loaded = keras_lora.load_adapter(quantized_base("int4_grouped"), tmp_path / "qlora")
    assert loaded.get_layer("dense").layer.quantization_mode == "int4"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(IDS)), keras.ops.convert_to_numpy(model(IDS))
    )
