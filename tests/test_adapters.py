"""Tests for keras_lora.adapters: model-level merge, unmerge, enable/disable,
add/set/delete, all or nothing, with Keras' traced functions kept current."""

import keras
import numpy as np
import pytest
from integration.inspection import (
    adapter_variables,
    assert_bit_identical,
    assert_same_snapshot,
    base_variables,
    snapshot,
    values,
)
from integration.models import BATCH, SAMPLES, WIDTH, fit_targets, outputs, train

import keras_lora

INPUTS = np.random.default_rng(0).normal(size=(SAMPLES, WIDTH)).astype("float32")


def lora_model(activation="relu", **config_fields):
    """A two-layer Sequential with random (non-zero) adapters on both."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((WIDTH,)),
            keras.layers.Dense(WIDTH, activation=activation, name="dense"),
            keras.layers.Dense(4, name="head"),
        ],
        name="model",
    )
    config_fields = {"rank": 2, "init": False, **config_fields}
    return keras_lora.convert(model, **config_fields)


def kernels(model):
    return values(
        layer.kernel_variable for layer in keras_lora.lora_layers(model).values()
    )


def predict(model):
    return model.predict(INPUTS, verbose=0)


def test_lora_layers_lists_the_lora_layers_by_path():
    model = lora_model()
    layers = keras_lora.lora_layers(model)
    assert list(layers) == ["dense", "head"]
    assert all(isinstance(layer, keras_lora.LoraDense) for layer in layers.values())
    assert keras_lora.lora_layers(keras.Sequential([keras.layers.Dense(2)])) == {}


def test_merge_then_predict_gives_the_merged_outputs():
    model = lora_model()
    before = predict(model)  # traced with the unmerged layers
    base_kernels = kernels(model)
    deltas = [
        keras.ops.convert_to_numpy(layer.get_delta_weight())
        for layer in keras_lora.lora_layers(model).values()
    ]
    keras_lora.merge(model)
    assert all(layer.merged for layer in keras_lora.lora_layers(model).values())
    for kernel, base, delta in zip(kernels(model), base_kernels, deltas, strict=True):
        np.testing.assert_allclose(kernel, base + delta, rtol=0, atol=1e-6)
    # A stale traced function would add the adapters a second time.
    np.testing.assert_allclose(predict(model), before, rtol=0, atol=1e-5)

    keras_lora.unmerge(model)
    assert not any(layer.merged for layer in keras_lora.lora_layers(model).values())
    for kernel, base in zip(kernels(model), base_kernels, strict=True):
        np.testing.assert_allclose(kernel, base, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict(model), before, rtol=0, atol=1e-5)


def test_predict_after_set_adapter_reflects_the_new_adapter():
    model = lora_model()
    default = predict(model)  # traced with "default" active
    keras.utils.set_random_seed(1)
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=3, init=False))
    np.testing.assert_array_equal(predict(model), default)
    keras_lora.set_adapter(model, "b")
    adapted_b = predict(model)
    assert np.max(np.abs(adapted_b - default)) > 1e-3
    np.testing.assert_allclose(adapted_b, outputs(model, INPUTS)[0], atol=1e-6)
    keras_lora.set_adapter(model, "default")
    np.testing.assert_allclose(predict(model), default, rtol=0, atol=1e-6)


def test_switching_back_reuses_the_predict_function_traced_for_those_adapters():
    model = lora_model()
    keras.utils.set_random_seed(1)
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=3, init=False))
    default = predict(model)
    traced_default = model.predict_function
    keras_lora.set_adapter(model, "b")
    assert model.predict_function is None
    adapted_b = predict(model)
    traced_b = model.predict_function
    keras_lora.set_adapter(model, "default")
    assert model.predict_function is traced_default
    np.testing.assert_array_equal(predict(model), default)
    keras_lora.set_adapter(model, "b")
    assert model.predict_function is traced_b
    np.testing.assert_array_equal(predict(model), adapted_b)
    # Any other change of adapter state traces anew.
    keras_lora.add_adapter(model, "c", keras_lora.LoraConfig(rank=2))
    keras_lora.set_adapter(model, "default")
    assert model.predict_function is None
    np.testing.assert_allclose(predict(model), default, atol=1e-6)


def test_several_active_adapters_add_up():
    keras.utils.set_random_seed(0)
    dense = keras.Sequential([keras.Input((WIDTH,)), keras.layers.Dense(4)])
    model = keras_lora.convert(dense, rank=2, init=False)
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=3, init=False))
    with keras_lora.disable_adapters(model):
        base = outputs(model, INPUTS)[0]
    default = outputs(model, INPUTS)[0]
    keras_lora.set_adapter(model, "b")
    only_b = outputs(model, INPUTS)[0]
    keras_lora.set_adapter(model, ["default", "b"])
    both = outputs(model, INPUTS)[0]
    expected = (default - base) + (only_b - base)
    np.testing.assert_allclose(both - base, expected, rtol=0, atol=1e-5)
    trainable = {id(v) for v in model.trainable_weights}
    assert trainable == set(adapter_variables(model))


def test_a_failed_safe_merge_leaves_every_layer_unmerged():
    model = lora_model()
    head = keras_lora.lora_layers(model)["head"]
    head.lora_b.assign(np.full(head.lora_b.shape, np.inf, dtype="float32"))
    before = kernels(model)
    state = snapshot(model)
    # "dense" merges first, then "head" fails the finiteness check.
    with pytest.raises(ValueError, match="non-finite"):
        keras_lora.merge(model, safe=True)
    assert not any(layer.merged for layer in keras_lora.lora_layers(model).values())
    assert_bit_identical(before, kernels(model))
    assert_same_snapshot(state, snapshot(model))


def merge_dense_only(model):
    keras_lora.lora_layers(model)["dense"].merge()
    keras_lora.merge(model)


def disable_head(model):
    keras_lora.lora_layers(model)["head"].disable_adapters()
    keras_lora.merge(model)


def merge_adapter_of_head_only(model):
    config = keras_lora.LoraConfig(rank=2, targets=["head"], init=False)
    keras_lora.add_adapter(model, "b", config)
    keras_lora.merge(model, ["default", "b"])


@pytest.mark.parametrize(
    "operation, message",
    [
        (keras_lora.merge, "already merged"),
        (merge_dense_only, r"\['dense'\] .* already merged"),
        (disable_head, r"\['head'\] .* disabled"),
        (merge_adapter_of_head_only, r"every LoRA layer; layers \['dense'\]"),
    ],
    ids=["twice", "one_layer_merged", "one_layer_disabled", "adapter_of_one_layer"],
)
def test_a_refused_merge_changes_no_kernel(operation, message):
    """The checks run before any kernel changes: merging and unmerging would
    not give the kernels back bit for bit."""
    model = lora_model()
    if operation is keras_lora.merge:
        keras_lora.merge(model)
    before = kernels(model)
    with pytest.raises(ValueError, match=message):
        operation(model)
    layers = keras_lora.lora_layers(model)
    if operation is merge_dense_only:
        before[0] = kernels(model)[0]  # merged by the layer-level call
        assert not layers["head"].merged
    assert_bit_identical(before, kernels(model))


@pytest.mark.parametrize(
    "operation, message",
    [
        (lambda model: keras_lora.set_adapter(model, "default"), "set the adapter"),
        (lambda model: keras_lora.delete_adapter(model, "b"), "delete an adapter"),
        (lambda model: keras_lora.disable_adapters(model).__enter__(), "disable"),
    ],
    ids=["set_adapter", "delete_adapter", "disable_adapters"],
)
def test_a_merged_model_refuses_adapter_changes(operation, message):
    model = lora_model()
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=2))
    keras_lora.merge(model)
    state = snapshot(model)
    with pytest.raises(ValueError, match=rf"Cannot {message}.*unmerge"):
        operation(model)
    assert_same_snapshot(state, snapshot(model))


def test_unmerging_an_unmerged_model_is_an_error():
    model = lora_model()
    with pytest.raises(ValueError, match="is not merged"):
        keras_lora.unmerge(model)


def test_disable_adapters_restores_them_after_an_error():
    model = lora_model()
    adapted = outputs(model, INPUTS)
    with pytest.raises(RuntimeError, match="inside"):
        with keras_lora.disable_adapters(model):
            raise RuntimeError("inside")
    assert all(
        layer.adapters_enabled for layer in keras_lora.lora_layers(model).values()
    )
    np.testing.assert_array_equal(outputs(model, INPUTS)[0], adapted[0])


def test_add_adapter_to_some_layers_and_set_it():
    model = lora_model()
    keras_lora.add_adapter(
        model, "b", keras_lora.LoraConfig(rank=3, targets=["head"], init=False)
    )
    layers = keras_lora.lora_layers(model)
    assert layers["dense"].adapter_names == ("default",)
    assert layers["head"].adapter_names == ("default", "b")
    assert layers["head"].adapters["b"].rank == 3
    assert not layers["head"].adapters["b"].trainable
    keras_lora.set_adapter(model, "b")
    assert layers["dense"].active_adapters == ("default",)
    assert layers["head"].active_adapters == ("b",)
    expected = {
        id(layers["dense"].lora_a),
        id(layers["dense"].lora_b),
        id(layers["head"].adapters["b"].lora_a),
        id(layers["head"].adapters["b"].lora_b),
    }
    assert {id(v) for v in model.trainable_weights} == expected


@pytest.mark.parametrize(
    "name, config, error, message",
    [
        ("default", keras_lora.LoraConfig(), ValueError, "already have an adapter"),
        ("b", keras_lora.LoraConfig(targets=["nothing"]), ValueError, "matches no"),
        ("b", {"rank": 2}, TypeError, "must be a keras_lora.LoraConfig"),
    ],
    ids=["existing_name", "no_match", "not_a_config"],
)
def test_a_failed_add_adapter_changes_nothing(name, config, error, message):
    model = lora_model()
    state = snapshot(model)
    with pytest.raises(error, match=message):
        keras_lora.add_adapter(model, name, config)
    assert_same_snapshot(state, snapshot(model))


def test_set_adapter_with_an_unknown_name_changes_nothing():
    model = lora_model()
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=2))
    state = snapshot(model)
    for names in ("c", ["b", "c"], []):
        with pytest.raises(ValueError, match=r"must name adapters.*\['b', 'default'\]"):
            keras_lora.set_adapter(model, names)
    assert_same_snapshot(state, snapshot(model))


def test_delete_adapter():
    model = lora_model()
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=2))
    keras_lora.set_adapter(model, "b")
    count = len(model.weights)
    keras_lora.delete_adapter(model, "b")
    for layer in keras_lora.lora_layers(model).values():
        assert layer.adapter_names == ("default",)
        assert layer.active_adapters == ("default",)
    assert len(model.weights) == count - 2 * 2
    assert {id(v) for v in model.trainable_weights} == set(adapter_variables(model))
    state = snapshot(model)
    with pytest.raises(ValueError, match="last adapter"):
        keras_lora.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="has an adapter named 'b'"):
        keras_lora.delete_adapter(model, "b")
    assert_same_snapshot(state, snapshot(model))


def test_fit_after_set_adapter_trains_the_new_adapter_without_recompiling():
    model = lora_model()
    targets = fit_targets(model, INPUTS)
    train(model, INPUTS, targets)
    layers = keras_lora.lora_layers(model).values()
    default = [v for layer in layers for v in (layer.lora_a, layer.lora_b)]
    default_before = values(default)
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=3))
    keras_lora.set_adapter(model, "b")
    b_before = outputs(model, INPUTS)[0]
    base = values(base_variables(model))
    # The same compiled model, whose optimizer was built for "default".
    model.fit(INPUTS, targets, batch_size=BATCH, verbose=0)
    assert np.max(np.abs(outputs(model, INPUTS)[0] - b_before)) > 1e-4
    assert_bit_identical(base, values(base_variables(model)))
    assert_bit_identical(default_before, values(default))


@pytest.mark.parametrize(
    "operation",
    [
        lambda model: keras_lora.merge(model),
        lambda model: keras_lora.unmerge(model),
        lambda model: keras_lora.set_adapter(model, "default"),
        lambda model: keras_lora.delete_adapter(model, "b"),
        lambda model: keras_lora.add_adapter(model, "b", keras_lora.LoraConfig()),
        lambda model: keras_lora.disable_adapters(model).__enter__(),
    ],
    ids=["merge", "unmerge", "set", "delete", "add", "disable"],
)
def test_model_level_functions_check_the_model(operation):
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        operation(keras.layers.Dense(2))
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no LoRA layer"):
        operation(plain)
