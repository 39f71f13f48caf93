"""Every generic check of keras_lora.convert, run over the table of model kinds."""

import pathlib
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_lora
from integration.inspection import (
    adapter_variables,
    assert_bit_identical,
    assert_no_keras_lora_class,
    base_variables,
    trainable_by_layer,
    values,
)
from integration.models import (
    MODEL_KINDS,
    assert_outputs_close,
    assert_outputs_differ,
    every_layer,
    fit_targets,
    outputs,
    train,
)

KINDS = list(MODEL_KINDS)
RANK = 2
TESTS = pathlib.Path(__file__).resolve().parents[1]


def converted(kind, **config_fields):
    """`(original, lora_model, inputs, base_outputs)` for a model kind."""
    model, inputs = MODEL_KINDS[kind]()
    base = outputs(model, inputs)
    lora_model = keras_lora.convert(model, rank=RANK, **config_fields)
    return model, lora_model, inputs, base


def trained(kind, **config_fields):
    """As `converted`, after a few steps of `fit` on the LoRA model."""
    model, lora_model, inputs, base = converted(kind, **config_fields)
    train(lora_model, inputs, fit_targets(lora_model, inputs))
    return model, lora_model, inputs, base


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_unchanged_right_after_convert(kind):
    _, lora_model, inputs, base = converted(kind)
    assert keras_lora.lora_layers(lora_model)
    assert_outputs_close(outputs(lora_model, inputs), base, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_only_active_adapters_are_trainable(kind):
    _, lora_model, _, _ = converted(kind)
    adapters = adapter_variables(lora_model, active_only=True)
    assert adapters
    trainable = {id(v) for v in lora_model.trainable_weights}
    assert trainable == set(adapters)
    assert all(v.trainable for v in adapters.values())


@pytest.mark.parametrize("kind", KINDS)
def test_fit_changes_outputs_and_no_base_weight(kind):
    _, lora_model, inputs, base = converted(kind)
    base_before = values(base_variables(lora_model))
    adapters_before = values(adapter_variables(lora_model).values())
    train(lora_model, inputs, fit_targets(lora_model, inputs), graph=True)
    assert_outputs_differ(outputs(lora_model, inputs), base)
    assert_bit_identical(base_before, values(base_variables(lora_model)))
    adapters_after = values(adapter_variables(lora_model).values())
    assert any(
        not np.array_equal(old, new)
        for old, new in zip(adapters_before, adapters_after, strict=True)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_a_plain_model_with_the_lora_outputs(kind, tmp_path):
    _, lora_model, inputs, base = converted(kind, init=False)
    expected = outputs(lora_model, inputs)
    assert_outputs_differ(expected, base)
    served = keras_lora.merge_and_unload(lora_model)
    assert_outputs_close(outputs(served, inputs), expected, atol=1e-5)
    assert_no_keras_lora_class(served)
    assert not keras_lora.lora_layers(served)

    path = tmp_path / "served.keras"
    served.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    # Registered names are "package>Name": keras_lora's own, not keras_lora_tests.
    assert not re.search(r"\bkeras_lora\b", config)
    loaded = keras.models.load_model(path)
    assert_no_keras_lora_class(loaded)
    assert type(loaded) is type(served)
    assert_outputs_close(outputs(loaded, inputs), outputs(served, inputs), atol=0)


def test_merged_models_load_in_a_process_that_never_imports_keras_lora(tmp_path):
    expected = {}
    for kind in KINDS:
        _, lora_model, inputs, _ = converted(kind, init=False)
        served = keras_lora.merge_and_unload(lora_model)
        served.save(tmp_path / f"{kind}.keras")
        expected[kind] = outputs(served, inputs)
    # The process imports Keras and the test models' module (for the classes
    # and the inputs), never keras_lora.
    script = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import keras
import numpy as np
from integration import models
for kind, factory in models.MODEL_KINDS.items():
    _, inputs = factory()
    model = keras.models.load_model({str(tmp_path)!r} + f"/{{kind}}.keras")
    for i, output in enumerate(models.outputs(model, inputs)):
        np.save({str(tmp_path)!r} + f"/{{kind}}_loaded_{{i}}.npy", output)
loaded = sorted(name for name in sys.modules if name.startswith("keras_lora"))
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for kind, arrays in expected.items():
        for i, array in enumerate(arrays):
            loaded = np.load(tmp_path / f"{kind}_loaded_{i}.npy")
            np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("kind", KINDS)
def test_keras_round_trip_keeps_adapters_and_outputs(kind, tmp_path):
    _, lora_model, inputs, _ = trained(kind)
    keras_lora.add_adapter(lora_model, "b", keras_lora.LoraConfig(rank=3, init=False))
    keras_lora.set_adapter(lora_model, "b")
    expected = outputs(lora_model, inputs)

    path = tmp_path / "lora.keras"
    lora_model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded).__name__ == type(lora_model).__name__
    assert_outputs_close(outputs(loaded, inputs), expected, atol=0)
    layers = keras_lora.lora_layers(lora_model)
    loaded_layers = keras_lora.lora_layers(loaded)
    assert list(loaded_layers) == list(layers)
    assert trainable_by_layer(loaded) == trainable_by_layer(lora_model)
    for path, layer in layers.items():
        assert type(loaded_layers[path]) is type(layer)
        assert loaded_layers[path].adapter_names == ("default", "b")
        assert loaded_layers[path].active_adapters == ("b",)
        assert not loaded_layers[path].merged
    # The default adapter's trained weights came back too.
    keras_lora.set_adapter(lora_model, "default")
    keras_lora.set_adapter(loaded, "default")
    assert_outputs_close(outputs(loaded, inputs), outputs(lora_model, inputs), atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_keras_round_trip_of_a_merged_model(kind, tmp_path):
    _, lora_model, inputs, base = converted(kind, init=False)
    keras_lora.merge(lora_model)
    expected = outputs(lora_model, inputs)

    lora_model.save(tmp_path / "merged.keras")
    loaded = keras.models.load_model(tmp_path / "merged.keras")

    assert_outputs_close(outputs(loaded, inputs), expected, atol=0)
    assert all(layer.merged for layer in keras_lora.lora_layers(loaded).values())
    keras_lora.unmerge(loaded)
    keras_lora.unmerge(lora_model)
    assert_outputs_close(outputs(loaded, inputs), outputs(lora_model, inputs), atol=0)
    with keras_lora.disable_adapters(loaded):
        assert_outputs_close(outputs(loaded, inputs), base, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_tracking_is_exact(kind):
    model, inputs = MODEL_KINDS[kind]()
    original = list(model.weights)
    lora_model = keras_lora.convert(model, rank=RANK)
    keras_lora.add_adapter(lora_model, "b", keras_lora.LoraConfig(rank=RANK))

    weights = lora_model.weights
    assert len({id(v) for v in weights}) == len(weights)
    layers = keras_lora.lora_layers(lora_model)
    assert len(weights) == len(original) + 2 * 2 * len(layers)
    assert {id(v) for v in base_variables(lora_model)} == {id(v) for v in original}
    assert set(adapter_variables(lora_model)) <= {id(v) for v in weights}
    assert len({v.path for v in weights}) == len(weights)


@pytest.mark.parametrize("kind", KINDS)
def test_base_weights_are_shared_never_copied(kind):
    model, _ = MODEL_KINDS[kind]()
    layer_weights = {
        id(layer): [id(v) for v in layer.weights] for layer in every_layer(model)
    }
    original = {id(v) for v in model.weights}
    lora_model = keras_lora.convert(model, rank=RANK)
    for layer in keras_lora.lora_layers(lora_model).values():
        assert [id(v) for v in layer.layer.weights] == layer_weights[id(layer.layer)]
        assert id(layer.kernel_variable) in original
    assert {id(v) for v in base_variables(lora_model)} == original


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapters_gives_base_outputs_and_restores(kind):
    _, lora_model, inputs, base = trained(kind)
    adapted = outputs(lora_model, inputs)
    assert_outputs_differ(adapted, base)
    with keras_lora.disable_adapters(lora_model) as disabled:
        assert disabled is lora_model
        assert_outputs_close(outputs(lora_model, inputs), base, atol=1e-6)
        assert_outputs_close(
            keras.tree.flatten(lora_model.predict(inputs, verbose=0)), base, atol=1e-5
        )
    assert_outputs_close(outputs(lora_model, inputs), adapted, atol=0)
    assert_outputs_close(
        keras.tree.flatten(lora_model.predict(inputs, verbose=0)), adapted, atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_two_adapters_train_separately_and_switch(kind):
    _, lora_model, inputs, base = trained(kind)
    after_default = outputs(lora_model, inputs)
    layers = keras_lora.lora_layers(lora_model).values()
    default_factors = [(layer.lora_a, layer.lora_b) for layer in layers]
    default_values = values(keras.tree.flatten(default_factors))

    keras_lora.add_adapter(lora_model, "b", keras_lora.LoraConfig(rank=RANK))
    assert_outputs_close(outputs(lora_model, inputs), after_default, atol=0)
    keras_lora.set_adapter(lora_model, "b")
    assert all(layer.active_adapters == ("b",) for layer in layers)
    assert_outputs_close(outputs(lora_model, inputs), base, atol=1e-6)
    train(lora_model, inputs, fit_targets(lora_model, inputs, seed=8))
    after_b = outputs(lora_model, inputs)
    assert_outputs_differ(after_b, after_default)
    assert_outputs_differ(after_b, base)
    # Training "b" left "default" alone.
    assert_bit_identical(default_values, values(keras.tree.flatten(default_factors)))

    keras_lora.set_adapter(lora_model, "default")
    assert_outputs_close(outputs(lora_model, inputs), after_default, atol=0)
    keras_lora.set_adapter(lora_model, "b")
    assert_outputs_close(outputs(lora_model, inputs), after_b, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_unload_gives_base_outputs(kind):
    _, lora_model, inputs, base = converted(kind, init=False)
    assert_outputs_differ(outputs(lora_model, inputs), base)
    plain = keras_lora.unload(lora_model)
    assert_outputs_close(outputs(plain, inputs), base, atol=1e-6)
    assert_no_keras_lora_class(plain)


@pytest.mark.parametrize("kind", KINDS)
def test_unload_of_a_merged_model_gives_base_outputs(kind):
    _, lora_model, inputs, base = converted(kind, init=False)
    keras_lora.merge(lora_model)
    assert_outputs_differ(outputs(lora_model, inputs), base)
    plain = keras_lora.unload(lora_model)
    assert_outputs_close(outputs(plain, inputs), base, atol=1e-5)
    assert_no_keras_lora_class(plain)
