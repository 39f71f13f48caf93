"""PiSSA and OLoRA on a model: the base kernel becomes a residual, and every
model-level operation still gives the right model: training, `merge_and_unload`
(W + the trained update), `.keras` files (loaded, never re-initialised),
adapter files on the residual model and, converted, on the original one, and a
refused conversion that leaves the model untouched."""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.layers import initialization

layers = keras.layers
INPUTS = np.random.default_rng(0).uniform(-1, 1, (4, 4, 6)).astype("float32")
TARGETS = np.random.default_rng(1).normal(size=(4, 4, 5)).astype("float32")
KERNELS = ["dense", "attention", "conv"]
kernel_inits = pytest.mark.parametrize("init", ["pissa", "olora"])


def build_base(seed=0):
    """The same seed gives the same base weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 6))
    x = layers.Dense(8, activation="relu", name="dense")(inputs)
    x = layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), name="attention"
    )(x)
    x = layers.Reshape((4, 8))(x)
    outputs = layers.Conv1D(5, 3, padding="same", name="conv")(x)
    return keras.Model(inputs, outputs)


def kernels(model):
    found = {}
    for layer in model.layers:
        base = getattr(layer, "layer", layer)
        if layer.name in KERNELS:
            found[layer.name] = keras.ops.convert_to_numpy(base.kernel)
    return found


def trained(init, **config):
    model = keras_lora.convert(
        build_base(), rank=2, alpha=4, targets=KERNELS, init=init, **config
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(INPUTS, TARGETS, epochs=3, verbose=0)
    return model


def predict(model):
    return keras.ops.convert_to_numpy(model(INPUTS))


@kernel_inits
def test_converted_model_starts_at_the_base_outputs(init):
    expected = predict(build_base())
    model = keras_lora.convert(build_base(), rank=2, alpha=4, init=init)
    np.testing.assert_allclose(predict(model), expected, rtol=0, atol=1e-5)


@kernel_inits
def test_merge_and_unload_gives_the_original_kernel_plus_the_trained_update(init):
    original = kernels(build_base())
    model = trained(init)
    outputs = predict(model)
    updates = {}
    for path, layer in keras_lora.lora_layers(model).items():
        adapter = layer.adapters["default"]
        initial = layer.delta(adapter.initial_lora_a, adapter.initial_lora_b)
        updates[path] = keras.ops.convert_to_numpy(
            layer.get_delta_weight() - initial * adapter.scale
        )
        assert np.abs(updates[path]).max() > 1e-3  # it trained
    merged = keras_lora.merge_and_unload(model)
    np.testing.assert_allclose(predict(merged), outputs, rtol=0, atol=1e-5)
    for path, kernel in kernels(merged).items():
        np.testing.assert_allclose(
            kernel, original[path] + updates[path], rtol=0, atol=1e-5
        )


@kernel_inits
def test_unload_keeps_the_residual_kernel_as_peft_does(init):
    model = trained(init)
    residual = kernels(model)
    base = keras_lora.unload(model)
    for path, kernel in kernels(base).items():
        np.testing.assert_array_equal(kernel, residual[path])
        assert np.abs(kernel - kernels(build_base())[path]).max() > 0.05


@kernel_inits
def test_keras_file_loads_without_initialising_again(init, tmp_path, monkeypatch):
    model = trained(init)
    path = tmp_path / "model.keras"
    model.save(path)

    def refuse(*args, **kwargs):
        raise AssertionError("loading initialised an adapter again")

    for name in ("pissa_factors", "olora_factors", "orthogonal_factors"):
        monkeypatch.setattr(initialization, name, refuse)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=0, atol=1e-6)
    for path_, kernel in kernels(loaded).items():
        np.testing.assert_array_equal(kernel, kernels(model)[path_])
    adapter = keras_lora.lora_layers(loaded)["dense"].adapters["default"]
    expected = keras_lora.lora_layers(model)["dense"].adapters["default"]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(adapter.initial_lora_a),
        keras.ops.convert_to_numpy(expected.initial_lora_a),
    )


@kernel_inits
@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"use_dora": True}],
    ids=["lora", "rslora", "dora"],
)
def test_adapter_for_the_original_base_reproduces_the_trained_model(
    init, variant, tmp_path
):
    model = trained(init, rank_pattern={"conv": 1}, **variant)
    keras_lora.save_adapter(model, tmp_path / "converted", for_original_base=True)
    loaded = keras_lora.load_adapter(build_base(), tmp_path / "converted")
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=0, atol=1e-5)
    layers_ = keras_lora.lora_layers(loaded)
    assert layers_["dense"].adapters["default"].settings()["rank"] == 4
    assert layers_["conv"].adapters["default"].settings()["rank"] == 2
    assert layers_["dense"].adapters["default"].init == "default"
    # Loaded onto the original kernels, which it leaves as they are.
    for path, kernel in kernels(loaded).items():
        np.testing.assert_array_equal(kernel, kernels(build_base())[path])


def test_converted_adapter_loads_next_to_other_adapters(tmp_path):
    model = trained("pissa")
    keras_lora.save_adapter(model, tmp_path / "pissa", for_original_base=True)
    other = keras_lora.convert(build_base(), rank=2, targets=KERNELS)
    keras_lora.load_adapter(other, tmp_path / "pissa", adapter_name="pissa")
    keras_lora.set_adapter(other, "pissa")
    np.testing.assert_allclose(predict(other), predict(model), rtol=0, atol=1e-5)


def test_plain_adapter_file_reinitialises_exact_pissa_on_the_original(tmp_path):
    model = trained("pissa")
    keras_lora.save_adapter(model, tmp_path / "pissa")
    loaded = keras_lora.load_adapter(build_base(), tmp_path / "pissa")
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=0, atol=1e-5)


def test_adapter_for_the_original_base_needs_a_kernel_rewriting_init(tmp_path):
    model = keras_lora.convert(build_base(), rank=2, init="orthogonal")
    with pytest.raises(ValueError, match="init='orthogonal', which leaves the base"):
        keras_lora.save_adapter(model, tmp_path / "a", for_original_base=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match="`for_original_base` must be a bool"):
        keras_lora.save_adapter(model, tmp_path / "a", for_original_base="yes")


def test_refused_conversion_leaves_every_kernel_as_it_was():
    base = build_base()
    before = kernels(base)
    # The conv kernel is a 24 x 5 matrix: rank 6 does not fit, and it comes
    # after the two layers that would have been rewritten. Targets that name
    # layers (here a glob) raise; `targets=None` would skip the conv.
    with pytest.raises(ValueError, match="layer 'conv', a 24 x 5 matrix"):
        keras_lora.convert(base, rank=6, init="pissa", targets="*")
    for path, kernel in kernels(base).items():
        np.testing.assert_array_equal(kernel, before[path])


def test_model_level_add_adapter_refuses_a_kernel_rewriting_init():
    model = keras_lora.convert(build_base(), rank=2)
    before = kernels(model)
    with pytest.raises(ValueError, match="init='olora' replaces the base kernel"):
        keras_lora.add_adapter(
            model, "second", keras_lora.LoraConfig(rank=2, init="olora")
        )
    assert all(
        "second" not in layer.adapters
        for layer in keras_lora.lora_layers(model).values()
    )
    for path, kernel in kernels(model).items():
        np.testing.assert_array_equal(kernel, before[path])


def test_plain_adapter_file_loads_into_a_lora_model_only_over_itself(tmp_path):
    model = trained("pissa")
    keras_lora.save_adapter(model, tmp_path / "pissa")
    expected = predict(model)
    keras_lora.lora_layers(model)["dense"].adapters["default"].lora_b.assign(
        np.zeros((2, 8), "float32")
    )
    keras_lora.load_adapter(model, tmp_path / "pissa")  # in place: same settings
    np.testing.assert_allclose(predict(model), expected, rtol=0, atol=1e-6)
    before = kernels(model)
    with pytest.raises(ValueError, match="made the adapter for a residual kernel"):
        keras_lora.load_adapter(model, tmp_path / "pissa", adapter_name="again")
    for path, kernel in kernels(model).items():
        np.testing.assert_array_equal(kernel, before[path])
    assert all(
        "again" not in layer.adapters
        for layer in keras_lora.lora_layers(model).values()
    )
