"""SavedModel export of LoRA models: unmerged, merged, and `keras_lora.export`,
reloaded by TensorFlow alone (no keras_lora) with the same outputs and the
model's input names and dtypes."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from backends import saved_model_export, tfsm_layer

import keras_lora

layers = keras.layers
RNG = np.random.default_rng(0)
INPUTS = {
    "ids": RNG.integers(0, 20, (3, 6)).astype("int32"),
    "features": RNG.uniform(-1, 1, (3, 4)).astype("float32"),
}
SIGNATURE = {"ids": ["ids", "int32"], "features": ["features", "float32"]}

# Runs in a fresh interpreter in which keras_lora cannot be imported.
RELOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["keras_lora"] = None
    import numpy as np
    import tensorflow as tf

    inputs = dict(np.load(sys.argv[1]))
    result = {}
    for directory in sys.argv[2:]:
        loaded = tf.saved_model.load(directory)
        signature = loaded.signatures["serving_default"]
        specs = signature.structured_input_signature[1]
        (output,) = signature(**inputs).values()
        result[directory] = {
            "inputs": {k: [s.name, s.dtype.name] for k, s in specs.items()},
            "outputs": output.numpy().tolist(),
        }
    loaded_modules = [name for name, module in sys.modules.items() if module]
    assert not [name for name in loaded_modules if name.startswith("keras_lora")]
    print(json.dumps(result))
    """
)


def lora_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32", name="ids")
    features = keras.Input((4,), name="features")
    x = layers.GlobalAveragePooling1D()(layers.Embedding(20, 8, name="emb")(ids))
    x = layers.Concatenate()([x, features])
    x = layers.Dense(8, activation="relu", name="dense")(x)
    base = keras.Model(
        {"ids": ids, "features": features}, layers.Dense(3, name="head")(x)
    )
    return keras_lora.convert(base, rank=2, targets=["emb", "dense"], init=False)


def outputs(model):
    return keras.ops.convert_to_numpy(model(INPUTS))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three SavedModels of one LoRA model: as is, merged in place, and via
    `keras_lora.export` (merged plain model)."""
    root = tmp_path_factory.mktemp("saved_models")
    model = lora_model()
    expected = outputs(model)
    model.export(root / "unmerged", format="tf_saved_model", verbose=False)
    keras_lora.merge(model)
    model.export(root / "merged", format="tf_saved_model", verbose=False)
    keras_lora.unmerge(model)
    before = [v.numpy().copy() for v in model.weights]
    keras_lora.export(model, root / "plain", verbose=False)
    return model, expected, before, root


@saved_model_export
def test_saved_models_reload_without_keras_lora(exported, tmp_path):
    _, expected, _, root = exported
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    directories = [str(root / name) for name in ("unmerged", "merged", "plain")]
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "inputs.npz"), *directories],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for directory in directories:
        assert reloaded[directory]["inputs"] == SIGNATURE
        np.testing.assert_allclose(reloaded[directory]["outputs"], expected, atol=1e-5)


@saved_model_export
@tfsm_layer
def test_tfsm_layer_reloads_each_saved_model(exported):
    _, expected, _, root = exported
    for name in ("unmerged", "merged", "plain"):
        layer = keras.layers.TFSMLayer(root / name, call_endpoint="serve")
        np.testing.assert_allclose(layer(INPUTS), expected, atol=1e-5)


@saved_model_export
def test_export_leaves_the_lora_model_as_it_was(exported):
    model, expected, before, _ = exported
    layers_after = keras_lora.lora_layers(model)
    assert list(layers_after) == ["emb", "dense"]
    assert not any(layer.merged for layer in layers_after.values())
    # Unmerging subtracts what merging added: equal up to float rounding.
    for variable, value in zip(model.weights, before, strict=True):
        np.testing.assert_allclose(variable.numpy(), value, atol=1e-6)
    np.testing.assert_allclose(outputs(model), expected, atol=1e-6)


@saved_model_export
def test_plain_saved_model_holds_no_adapter_variables(exported):
    _, _, _, root = exported
    names = [v.name for v in tf.saved_model.load(str(root / "plain")).variables]
    assert names and not any("lora" in name for name in names)


class Block(keras.Model):
    """A subclassed model: convert rewires its attributes in place."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(8, activation="relu", name="hidden")
        self.out = layers.Dense(2, name="out")

    def call(self, inputs):
        return self.out(self.hidden(inputs))


@saved_model_export
def test_export_of_a_subclassed_model_puts_its_wrappers_back(tmp_path):
    keras.utils.set_random_seed(0)
    base = Block()
    x = RNG.uniform(-1, 1, (3, 5)).astype("float32")
    base(x)
    model = keras_lora.convert(base, rank=2, init=False)
    wrappers = keras_lora.lora_layers(model)
    expected = outputs_of(model, x)
    keras_lora.export(model, tmp_path / "block", verbose=False)
    assert keras_lora.lora_layers(model) == wrappers
    assert model.hidden is wrappers["hidden"] and not wrappers["hidden"].merged
    np.testing.assert_allclose(outputs_of(model, x), expected, atol=1e-6)
    loaded = tf.saved_model.load(str(tmp_path / "block"))
    np.testing.assert_allclose(loaded.serve(x), expected, atol=1e-5)


def outputs_of(model, x):
    return keras.ops.convert_to_numpy(model(x))


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize`")
def test_export_refusals(tmp_path):
    model = lora_model()
    with pytest.raises(ValueError, match="has no LoRA layer; export it with"):
        keras_lora.export(keras_lora.unload(lora_model()), tmp_path / "a")
    keras_lora.lora_layers(model)["emb"].merge()
    with pytest.raises(ValueError, match="is partly merged"):
        keras_lora.export(model, tmp_path / "b")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    base = keras.Model(inputs, layers.Dense(3, name="dense")(inputs))
    base.quantize("int8")
    quantized = keras_lora.convert(base, rank=2)
    with pytest.raises(ValueError, match=r"dequantize=True"):
        keras_lora.export(quantized, tmp_path / "c")
    assert not quantized.get_layer("dense").merged
    assert not (tmp_path / "c").exists()


# -- One SavedModel, several fine-tunes: `export_per_example` ------------------


def two_adapter_model():
    """`lora_model()` (Embedding and Dense adapted) plus a second adapter."""
    model = lora_model()
    config = keras_lora.LoraConfig(rank=3, init=False)
    keras_lora.add_adapter(model, "task_b", config)
    return model


def outputs_with(model, adapter_name):
    """The Keras model's outputs with one adapter active (or the base)."""
    if adapter_name == "__base__":
        with keras_lora.disable_adapters(model):
            return outputs(model)
    keras_lora.set_adapter(model, adapter_name)
    result = outputs(model)
    keras_lora.set_adapter(model, "default")
    return result


@saved_model_export
def test_per_example_saved_model_serves_each_adapter(tmp_path):
    model = two_adapter_model()
    names = ["default", "task_b", "__base__"]
    by_name = {name: outputs_with(model, name) for name in names}
    before = outputs(model)
    keras_lora.export_per_example(model, tmp_path / "multi", names, verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "multi"))
    signature = loaded.signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    assert {key: spec.dtype.name for key, spec in specs.items()} == {
        "ids": "int32",
        "features": "float32",
        "adapter_index": "int32",
    }
    for index in ([1, -1, 0], [2, 1, 1], [0, 0, 2]):
        routed_to = ["__base__" if k < 0 else names[k] for k in index]
        expected = np.stack([by_name[n][row] for row, n in enumerate(routed_to)])
        index = np.array(index, "int32")
        np.testing.assert_allclose(loaded.serve(INPUTS, index), expected, atol=1e-5)
        (served,) = signature(**INPUTS, adapter_index=tf.constant(index)).values()
        np.testing.assert_allclose(served, expected, atol=1e-5)
    # The LoRA model is as it was: its active adapter for every example.
    np.testing.assert_allclose(outputs(model), before, atol=1e-6)


@saved_model_export
def test_per_example_export_of_a_subclassed_model_needs_its_signature(tmp_path):
    keras.utils.set_random_seed(0)
    base = Block()
    x = RNG.uniform(-1, 1, (3, 5)).astype("float32")
    base(x)
    model = keras_lora.convert(base, rank=2, init=False)
    with pytest.raises(ValueError, match=r"pass `input_signature`"):
        keras_lora.export_per_example(model, tmp_path / "a", ["default"])
    assert not (tmp_path / "a").exists()
    signature = [keras.InputSpec(shape=(None, 5), dtype="float32")]
    keras_lora.export_per_example(
        model, tmp_path / "b", ["default"], input_signature=signature, verbose=False
    )
    loaded = tf.saved_model.load(str(tmp_path / "b"))
    index = np.array([0, -1, 0], "int32")
    with keras_lora.disable_adapters(model):
        base_outputs = outputs_of(model, x)
    expected = np.where(index[:, None] < 0, base_outputs, outputs_of(model, x))
    np.testing.assert_allclose(loaded.serve(x, index), expected, atol=1e-5)


@saved_model_export
def test_per_example_export_refusals_write_nothing(tmp_path):
    model = two_adapter_model()
    with pytest.raises(ValueError, match=r"\['task_c'\] are not"):
        keras_lora.export_per_example(model, tmp_path / "a", ["default", "task_c"])
    keras_lora.merge(model)
    with pytest.raises(ValueError, match=r"merged adapters"):
        keras_lora.export_per_example(model, tmp_path / "b", ["default"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
