"""DoRA (`use_dora=True`): the output against NumPy, merging, training, the
gradient of the norm, adapter files and `.keras` files, run over the case table
in `tests/testing/cases.py`."""

import json

import keras
import numpy as np
import pytest
import safetensors.numpy
from testing.cases import CASES, RANK, TYPE_CASES, case_id
from testing.layer_checks import assert_unchanged, layer_state, run_layer_test
from testing.model_checks import (
    assert_fit_changes_only,
    fit_briefly,
    model_around,
    save_and_load,
)
from testing.references import numpy, numpy_conv, numpy_conv_delta, relu

import keras_lora
from keras_lora.checkpoint.format import CONFIG_FILE, WEIGHTS_FILE
from keras_lora.layers import dora
from keras_lora.layers.conv import LoraConv

layers = keras.layers
cases = pytest.mark.parametrize("case", CASES, ids=case_id)
type_cases = pytest.mark.parametrize("case", TYPE_CASES, ids=case_id)
# Cases whose output units are its last axes, in kernel order, so that a
# per-unit vector broadcasts against the output as it is.
TRAILING_UNIT_CASES = [
    case for case in TYPE_CASES if case.id in ("dense", "einsum_attention", "conv1d")
]


def randomize(wrapper, adapter_name="default", seed=0):
    """Random non-zero factors (std 0.5), and a magnitude within a factor 1.5
    of the new weight norm (where training keeps it)."""
    adapter = wrapper.adapters[adapter_name]
    rng = np.random.default_rng(seed)
    for variable in (adapter.lora_a, adapter.lora_b):
        variable.assign(rng.normal(0.0, 0.5, size=variable.shape))
    norm = numpy(dora.weight_norm(wrapper, adapter))
    factor = rng.uniform(1 / 1.5, 1.5, size=norm.shape)
    adapter.lora_magnitude_vector.assign(norm * factor)


# -- NumPy references ----------------------------------------------------------


def norm_axes(case):
    # The input axes of the kernel: those `lora_a` has besides the rank.
    return tuple(range(len(case.a_shape) - 1))


def numpy_delta(wrapper, adapter_name="default"):
    """`A @ B` in the kernel layout, float64, unscaled."""
    adapter = wrapper.adapters[adapter_name]
    lora_a = numpy(adapter.lora_a).astype("float64")
    lora_b = numpy(adapter.lora_b).astype("float64")
    if isinstance(wrapper, LoraConv):
        return numpy_conv_delta(lora_a, lora_b, wrapper.layer.groups)
    return np.tensordot(lora_a, lora_b, axes=1)


def numpy_linear(base, x, kernel):
    """`x W` of the base layer in float64: no bias, no activation."""
    if isinstance(base, layers.Embedding):
        return kernel[x]
    if isinstance(base, layers.EinsumDense):
        return np.einsum(base.equation, x, kernel)
    if isinstance(base, layers.Dense):
        return x @ kernel
    channels_first = base.data_format == "channels_first"
    x = np.moveaxis(x, 1, -1) if channels_first else x
    y = numpy_conv(
        x, kernel, base.strides, base.padding, base.dilation_rate, base.groups
    )
    return np.moveaxis(y, -1, 1) if channels_first else y


def numpy_finish(base, y):
    """Adds the base layer's bias and applies its activation."""
    bias = getattr(base, "bias", None)
    if bias is not None:
        bias = numpy(bias).astype("float64")
        if getattr(base, "data_format", None) == "channels_first":
            bias = bias.reshape(-1, *[1] * (y.ndim - 2))
        y = y + bias
    return relu(y) if getattr(base, "activation", None) is keras.activations.relu else y


def numpy_dora_kernel(wrapper, case, kernel, adapter_name, scale):
    """`m / ||W + scale dW|| * (kernel + scale dW)`, `W` the base kernel."""
    base_kernel = numpy(wrapper.kernel_variable).astype("float64")
    delta = scale * numpy_delta(wrapper, adapter_name)
    norm = np.sqrt(
        np.sum((base_kernel + delta) ** 2, axis=norm_axes(case), keepdims=True)
    )
    magnitude = numpy(wrapper.adapters[adapter_name].lora_magnitude_vector)
    return magnitude.reshape(norm.shape) / norm * (kernel + delta)


# -- The output ----------------------------------------------------------------


@cases
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_output_matches_numpy(case, training, use_rslora):
    wrapper = case.wrap(alpha=6.0, use_rslora=use_rslora, use_dora=True)
    randomize(wrapper)
    x = case.inputs()
    scale = 6.0 / (np.sqrt(RANK) if use_rslora else RANK)
    kernel = numpy(wrapper.kernel_variable).astype("float64")

    adapted = numpy_dora_kernel(wrapper, case, kernel, "default", scale)
    expected = numpy_finish(wrapper.layer, numpy_linear(wrapper.layer, x, adapted))

    outputs = numpy(wrapper(x, training=training))
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("equation", "output_shape", "input_shape"),
    [
        # Output units in another order than the kernel's, an axis between.
        ("abc,cde->aebd", (3, None, 2), (2, 4, 5)),
        # Keras' right-ellipsis form: the elided axes follow the units.
        ("ab...,bc->ac...", 6, (2, 5, 3)),
    ],
)
def test_einsum_output_layout_puts_each_unit_where_the_outputs_have_it(
    equation, output_shape, input_shape
):
    base = layers.EinsumDense(
        equation,
        output_shape=output_shape,
        bias_axes="c" if "..." in equation else "de",
    )
    base.build(input_shape)
    wrapper = keras_lora.LoraEinsumDense(base, rank=RANK, use_dora=True)
    randomize(wrapper)
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    kernel = numpy(wrapper.kernel_variable).astype("float64")
    delta = numpy_delta(wrapper) * wrapper.adapters["default"].scale
    norm = np.sqrt(np.sum((kernel + delta) ** 2, axis=0, keepdims=True))
    magnitude = numpy(wrapper.adapters["default"].lora_magnitude_vector)
    adapted = magnitude.reshape(norm.shape) / norm * (kernel + delta)
    expected = np.einsum(equation, x, adapted) + numpy(base.bias)

    for training in (False, True):
        outputs = numpy(wrapper(x, training=training))
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


@cases
@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
def test_fresh_adapter_gives_the_base_output_with_magnitude_the_kernel_norm(
    case, built
):
    wrapper = case.wrap(built=built, use_dora=True)
    x = case.inputs()
    outputs = run_layer_test(wrapper, x, training=True)
    np.testing.assert_allclose(outputs, numpy(wrapper.layer(x)), rtol=0, atol=1e-6)
    kernel = numpy(wrapper.kernel_variable).astype("float64")
    magnitude = wrapper.adapters["default"].lora_magnitude_vector
    assert magnitude.dtype == "float32" and magnitude.trainable
    np.testing.assert_allclose(
        numpy(magnitude),
        np.sqrt(np.sum(kernel**2, axis=norm_axes(case))),
        rtol=1e-6,
    )


@type_cases
def test_magnitude_starts_at_the_norm_of_the_adapted_kernel(case):
    wrapper = case.wrap(alpha=2.0, use_dora=True, init=False)
    kernel = numpy(wrapper.kernel_variable).astype("float64")
    adapted = kernel + wrapper.adapters["default"].scale * numpy_delta(wrapper)
    np.testing.assert_allclose(
        numpy(wrapper.adapters["default"].lora_magnitude_vector),
        np.sqrt(np.sum(adapted**2, axis=norm_axes(case))),
        rtol=1e-5,
    )
    # At its initial magnitude the adapter is plain LoRA.
    plain = case.wrapper(wrapper.layer, rank=RANK, alpha=2.0)
    for name in ("lora_a", "lora_b"):
        getattr(plain, name).assign(getattr(wrapper, name))
    x = case.inputs()
    np.testing.assert_allclose(
        numpy(wrapper(x, training=True)), numpy(plain(x)), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("case", TRAILING_UNIT_CASES, ids=case_id)
def test_dropout_rescales_the_base_output_of_the_dropped_inputs(case, monkeypatch):
    wrapper = case.wrap(alpha=6.0, dropout=0.5, use_dora=True)
    randomize(wrapper)
    adapter = wrapper.adapters["default"]
    x = case.inputs()
    # Keep the input the call's own dropout gives: a replayed seed state
    # would not draw the same mask on torch, where an unseeded Keras dropout
    # draws from torch's global generator.
    dropped_inputs = []
    apply_dropout = adapter.apply_dropout

    def recording_dropout(inputs, training=None):
        dropped = apply_dropout(inputs, training=training)
        dropped_inputs.append(numpy(dropped).astype("float64"))
        return dropped

    monkeypatch.setattr(adapter, "apply_dropout", recording_dropout)

    outputs = numpy(wrapper(x, training=True))

    (dropped,) = dropped_inputs
    # A dropout of rate 0.5: each input is zeroed or doubled, some of each.
    kept = dropped != 0
    assert kept.any() and not kept.all()
    np.testing.assert_array_equal(dropped[kept], 2.0 * x[kept])
    base, kernel = wrapper.layer, numpy(wrapper.kernel_variable).astype("float64")
    delta = adapter.scale * numpy_delta(wrapper)
    norm = np.sqrt(np.sum((kernel + delta) ** 2, axis=norm_axes(case)))
    factor = numpy(adapter.lora_magnitude_vector) / norm
    pre_activation = (
        numpy_linear(base, x, kernel)
        + (factor - 1) * numpy_linear(base, dropped, kernel)
        + factor * numpy_linear(base, dropped, delta)
    )
    expected = numpy_finish(base, pre_activation)
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


@type_cases
def test_disabled_adapters_give_the_base_output(case):
    wrapper = case.wrap(use_dora=True)
    randomize(wrapper)
    x = case.inputs()
    wrapper.disable_adapters()
    np.testing.assert_array_equal(numpy(wrapper(x)), numpy(wrapper.layer(x)))


@type_cases
def test_delta_weight_is_the_low_rank_part_as_in_peft(case):
    wrapper = case.wrap(alpha=6.0, use_dora=True)
    randomize(wrapper)
    np.testing.assert_allclose(
        numpy(wrapper.get_delta_weight()),
        wrapper.adapters["default"].scale * numpy_delta(wrapper),
        rtol=0,
        atol=1e-6,
    )


# -- Merging -------------------------------------------------------------------


@cases
def test_merge_matches_unmerged_output_and_unmerge_restores_the_kernel(case):
    wrapper = case.wrap(alpha=6.0, use_dora=True)
    randomize(wrapper)
    x = case.inputs()
    kernel = numpy(wrapper.kernel_variable)
    unmerged = numpy(wrapper(x, training=True))
    scale = wrapper.adapters["default"].scale
    expected_kernel = numpy_dora_kernel(
        wrapper, case, kernel.astype("float64"), "default", scale
    )

    wrapper.merge(safe=True)
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable), expected_kernel, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(numpy(wrapper(x)), unmerged, rtol=0, atol=1e-5)

    wrapper.unmerge()
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable), kernel, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        numpy(wrapper(x, training=True)), unmerged, rtol=0, atol=1e-5
    )


@type_cases
def test_several_active_adapters_apply_in_order_as_peft_forward(case):
    wrapper = case.wrap(alpha=6.0, use_dora=True, adapter_name="first")
    wrapper.add_adapter("plain", rank=2, init=False)
    wrapper.add_adapter("third", rank=RANK, alpha=3.0, use_dora=True)
    randomize(wrapper, "first", seed=1)
    randomize(wrapper, "third", seed=3)
    names = ["first", "plain", "third"]
    wrapper.set_adapter(names)
    x = case.inputs()
    base_kernel = numpy(wrapper.kernel_variable).astype("float64")
    # Each DoRA adapter rescales what the adapters before it give, by its
    # magnitude over the norm of the base kernel plus its own update.
    kernel = numpy_dora_kernel(
        wrapper, case, base_kernel, "first", wrapper.adapters["first"].scale
    )
    kernel = kernel + wrapper.adapters["plain"].scale * numpy_delta(wrapper, "plain")
    kernel = numpy_dora_kernel(
        wrapper, case, kernel, "third", wrapper.adapters["third"].scale
    )
    expected = numpy_finish(wrapper.layer, numpy_linear(wrapper.layer, x, kernel))

    for training in (False, True):
        outputs = numpy(wrapper(x, training=training))
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    wrapper.merge()
    np.testing.assert_allclose(numpy(wrapper(x)), expected, rtol=0, atol=1e-5)
    wrapper.unmerge()
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable), base_kernel, rtol=0, atol=1e-6
    )


# -- Training ------------------------------------------------------------------


@type_cases
def test_fit_changes_only_a_b_and_the_magnitude(case):
    wrapper = case.wrap(use_dora=True)
    wrapper.add_adapter("inactive", rank=2, init=False, use_dora=True)
    model = model_around(wrapper, case)
    active = wrapper.adapters["default"]
    trained = list(active.parameters.values())
    assert [variable.name for variable in trained] == [
        "lora_a",
        "lora_b",
        "lora_magnitude_vector",
    ]
    frozen = [
        *wrapper.layer.weights,
        active.weight_norm,
        *wrapper.adapters["inactive"].weights,
    ]
    assert_fit_changes_only(model, case.inputs(), trained, frozen)


def test_the_norm_gets_no_gradient():
    """One SGD step at learning rate 1 on `loss = sum(G * y)` moves each
    variable by minus its gradient; with the norm a constant these are
    `dL/dm = sum(G * (xW + s xAB)) / n`, `dL/dB = s (xA)^T (G f)` and
    `dL/dA = s x^T (G f) B^T`, with `f = m / n`."""
    base = layers.Dense(6, name="dense")
    base.build((4, 5))
    wrapper = keras_lora.LoraDense(base, rank=RANK, alpha=6.0, use_dora=True)
    randomize(wrapper)
    adapter = wrapper.adapters["default"]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5)).astype("float32")
    weights = rng.normal(size=(4, 6)).astype("float32")
    kernel, lora_a, lora_b, magnitude = (
        numpy(v).astype("float64")
        for v in (
            base.kernel,
            adapter.lora_a,
            adapter.lora_b,
            adapter.lora_magnitude_vector,
        )
    )
    scale = adapter.scale
    adapted = kernel + scale * lora_a @ lora_b
    norm = np.sqrt(np.sum(adapted**2, axis=0))
    factor = magnitude / norm
    expected = {
        "lora_magnitude_vector": np.sum(weights * (x @ adapted), axis=0) / norm,
        "lora_b": scale * (x @ lora_a).T @ (weights * factor),
        "lora_a": scale * x.T @ ((weights * factor) @ lora_b.T),
    }
    # What the norm's own gradient would add to B's: the test can tell.
    through_norm = np.sum(weights * (x @ adapted), axis=0) * (-magnitude / norm**2)
    extra_b = through_norm * scale * (lora_a.T @ adapted) / norm
    assert np.abs(extra_b).max() > 1e-2

    inputs = keras.Input((5,))
    model = keras.Model(inputs, wrapper(inputs))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=lambda y_true, y_pred: keras.ops.sum(y_true * y_pred),
    )
    before = {name: numpy(v) for name, v in adapter.parameters.items()}
    model.fit(x, weights, batch_size=4, epochs=1, verbose=0)

    for name, gradient in expected.items():
        step = before[name] - numpy(adapter.parameters[name])
        np.testing.assert_allclose(step, gradient, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", TRAILING_UNIT_CASES[:1], ids=case_id)
def test_mixed_precision_computes_in_the_compute_dtype(case, dtype_policy):
    dtype_policy("mixed_bfloat16")
    wrapper = case.wrap(use_dora=True, dropout=0.1)
    x = case.inputs()
    outputs = wrapper(x, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    for variable in wrapper.adapters["default"].weights:
        assert variable.dtype == "float32"
    losses = fit_briefly(model_around(wrapper, case), x, steps=2)
    assert np.all(np.isfinite(losses))


# -- Saving --------------------------------------------------------------------


@type_cases
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_keras_file_round_trip_is_exact(case, merged, tmp_path):
    wrapper = case.wrap(use_dora=True)
    wrapper.add_adapter("second", rank=2, use_dora=True)
    randomize(wrapper)
    model = model_around(wrapper, case)
    kernel = numpy(wrapper.kernel_variable)
    if merged:
        wrapper.merge()
    x = case.inputs()

    loaded = save_and_load(model, tmp_path)
    restored = loaded.layers[-1]

    assert restored.adapters["default"].use_dora
    for (path, value), (_, restored_value) in zip(
        layer_state(wrapper)["weights"],
        layer_state(restored)["weights"],
        strict=True,
    ):
        np.testing.assert_array_equal(restored_value, value, err_msg=path)
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))
    if merged:
        restored.unmerge()
        np.testing.assert_allclose(
            numpy(restored.kernel_variable), kernel, rtol=0, atol=1e-6
        )


def dora_base_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,), dtype="int32")
    x = layers.Embedding(10, 6, name="embed")(inputs)
    x = layers.Dense(8, activation="relu", name="dense")(x)
    x = layers.EinsumDense(
        "abc,cd->abd", output_shape=(None, 4), bias_axes="d", name="proj"
    )(x)
    outputs = layers.Conv1D(3, 2, name="conv")(x)
    return keras.Model(inputs, outputs)


def dora_model():
    model = keras_lora.convert(dora_base_model(), rank=2, use_dora=True, init=False)
    for seed, layer in enumerate(keras_lora.adapters.lora_layers(model).values()):
        randomize(layer, seed=seed)
    return model


IDS = np.random.default_rng(0).integers(0, 10, size=(3, 5)).astype("int32")


def test_adapter_file_round_trip_is_exact(tmp_path):
    model = dora_model()
    expected = numpy(model(IDS))
    keras_lora.save_adapter(model, tmp_path / "dora")

    tensors = safetensors.numpy.load_file(tmp_path / "dora" / WEIGHTS_FILE)
    layers_by_path = keras_lora.adapters.lora_layers(model)
    for path, layer in layers_by_path.items():
        np.testing.assert_array_equal(
            tensors[f"{path}/lora_magnitude_vector"],
            numpy(layer.adapters["default"].lora_magnitude_vector),
        )
    assert keras_lora.adapter_config(model).use_dora

    loaded = keras_lora.load_adapter(dora_base_model(), tmp_path / "dora")
    assert all(
        layer.adapters["default"].use_dora
        for layer in keras_lora.adapters.lora_layers(loaded).values()
    )
    np.testing.assert_array_equal(numpy(loaded(IDS)), expected)

    # Into a LoRA model, as a second adapter.
    keras_lora.load_adapter(model, tmp_path / "dora", adapter_name="again")
    keras_lora.set_adapter(model, "again")
    np.testing.assert_array_equal(numpy(model(IDS)), expected)


def test_model_level_add_adapter_passes_use_dora():
    model = keras_lora.convert(dora_base_model(), rank=2)
    keras_lora.add_adapter(model, "dora", keras_lora.LoraConfig(use_dora=True))
    layers_by_path = keras_lora.adapters.lora_layers(model)
    assert all(layer.adapters["dora"].use_dora for layer in layers_by_path.values())
    assert not any(
        layer.adapters["default"].use_dora for layer in layers_by_path.values()
    )
    assert keras_lora.adapter_config(model, "dora").use_dora


def test_an_adapter_file_from_before_dora_loads_as_lora(tmp_path):
    model = keras_lora.convert(dora_base_model(), rank=2, init=False)
    expected = numpy(model(IDS))
    keras_lora.save_adapter(model, tmp_path / "lora")
    config_path = tmp_path / "lora" / CONFIG_FILE
    document = json.loads(config_path.read_text())
    for record in document["layers"]:
        del record["use_dora"]
    del document["config"]["use_dora"]
    config_path.write_text(json.dumps(document))

    loaded = keras_lora.load_adapter(dora_base_model(), tmp_path / "lora")

    assert not any(
        layer.adapters["default"].use_dora
        for layer in keras_lora.adapters.lora_layers(loaded).values()
    )
    np.testing.assert_array_equal(numpy(loaded(IDS)), expected)


def test_a_magnitude_of_the_wrong_shape_is_refused(tmp_path):
    keras_lora.save_adapter(dora_model(), tmp_path / "dora")
    weights_path = tmp_path / "dora" / WEIGHTS_FILE
    tensors = safetensors.numpy.load_file(weights_path)
    tensors["dense/lora_magnitude_vector"] = np.ones(3, "float32")
    safetensors.numpy.save_file(tensors, weights_path)
    with pytest.raises(
        ValueError, match=r"'dense/lora_magnitude_vector' has shape \(3,\)"
    ):
        keras_lora.load_adapter(dora_base_model(), tmp_path / "dora")


# -- Refusals ------------------------------------------------------------------


def test_dora_on_a_quantized_base_is_refused_and_changes_nothing():
    base = layers.Dense(6)
    base.build((2, 8))
    base.quantize("int8")
    with pytest.raises(ValueError, match="int8-quantized base; DoRA needs"):
        keras_lora.LoraDense(base, rank=RANK, use_dora=True)
    wrapper = keras_lora.LoraDense(base, rank=RANK)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="int8-quantized base; DoRA needs"):
        wrapper.add_adapter("dora", rank=RANK, use_dora=True)
    assert_unchanged(wrapper, state)


def test_a_wrapper_without_norm_axes_refuses_dora():
    class NoDora(keras_lora.LoraDense):
        norm_axes = None

    with pytest.raises(ValueError, match="NoDora does not support DoRA"):
        NoDora(layers.Dense(4), rank=RANK, use_dora=True)


@pytest.mark.parametrize("make", ["config", "wrapper"])
def test_use_dora_must_be_a_bool(make):
    with pytest.raises(
        TypeError, match="`use_dora` must be a bool. Received: use_dora='yes'"
    ):
        if make == "config":
            keras_lora.LoraConfig(use_dora="yes")
        else:
            keras_lora.LoraDense(layers.Dense(4), use_dora="yes")
