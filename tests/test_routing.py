"""Per-example adapters on a whole model (`keras_lora.adapter_per_example`),
over every model kind: each example of a mixed batch gets what it gets alone
with its adapter active, eagerly, traced with an index tensor and through
`predict`; refusals name the problem and leave the model as it was."""

import keras
import numpy as np
import pytest
from backends import symbolic_tracing
from integration.inspection import assert_same_snapshot, snapshot
from integration.models import MODEL_KINDS, SAMPLES, outputs
from testing.model_checks import traced

import keras_lora
from keras_lora.layers.adapter_routing import routing_of

kinds = pytest.mark.parametrize("kind", list(MODEL_KINDS))
NAMES = ["task_b", "__base__", "default", "task_b"] * 2
CANDIDATES = ["default", "task_b"]
INDEX = np.array([1, -1, 0, 1] * 2, "int32")  # NAMES, as an index
assert len(NAMES) == len(INDEX) == SAMPLES


def two_adapter_model(kind):
    """A LoRA model of `kind` with two random adapters on every LoRA layer."""
    model, inputs = MODEL_KINDS[kind]()
    model = keras_lora.convert(model, rank=2, init=False)
    keras_lora.add_adapter(model, "task_b", keras_lora.LoraConfig(rank=3, init=False))
    return model, inputs


def row(inputs, i):
    return keras.tree.map_structure(lambda array: array[i : i + 1], inputs)


def alone(model, inputs, names):
    """Each example run alone through `model`, with its adapter active."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with keras_lora.disable_adapters(model):
                rows.append(outputs(model, row(inputs, i)))
        else:
            keras_lora.set_adapter(model, name)
            rows.append(outputs(model, row(inputs, i)))
    keras_lora.set_adapter(model, "default")
    return [np.concatenate(parts) for parts in zip(*rows, strict=True)]


def assert_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5)


@kinds
def test_mixed_batch_equals_each_example_alone(kind):
    model, inputs = two_adapter_model(kind)
    expected = alone(model, inputs, NAMES)
    with keras_lora.adapter_per_example(model, NAMES) as routed:
        assert routed is model
        assert_close(outputs(model, inputs), expected)
    with keras_lora.adapter_per_example(model, CANDIDATES, INDEX):
        assert_close(outputs(model, inputs), expected)
    assert not any(map(routing_of, keras_lora.lora_layers(model).values()))
    # Outside the block the active adapter is back, for every example.
    assert_close(outputs(model, inputs), alone(model, inputs, ["default"] * SAMPLES))


@kinds
@symbolic_tracing
def test_traced_function_takes_the_index_as_a_tensor(kind):
    model, inputs = two_adapter_model(kind)

    def serve(x, adapter_index):
        with keras_lora.adapter_per_example(model, CANDIDATES, adapter_index):
            return model(x)

    function = traced(serve)
    for index in (INDEX, INDEX[::-1].copy()):
        names = ["__base__" if i < 0 else CANDIDATES[i] for i in index]
        routed = keras.tree.flatten(
            function(inputs, keras.ops.convert_to_tensor(index))
        )
        routed = [keras.ops.convert_to_numpy(y) for y in routed]
        assert_close(routed, alone(model, inputs, names))


def test_predict_inside_the_block_is_traced_with_the_routing():
    model, inputs = two_adapter_model("sequential")
    plain = model.predict(inputs, verbose=0)  # traced before the block
    with keras_lora.adapter_per_example(model, NAMES):
        routed = model.predict(inputs, batch_size=SAMPLES, verbose=0)
    assert_close([routed], alone(model, inputs, NAMES))
    assert_close([model.predict(inputs, verbose=0)], [plain])


def merged(model):
    keras_lora.merge(model)


def dora(model):
    config = keras_lora.LoraConfig(rank=2, use_dora=True)
    keras_lora.add_adapter(model, "task_dora", config)


def only_some_layers(model):
    config = keras_lora.LoraConfig(rank=2, targets=["head"])
    keras_lora.add_adapter(model, "head_only", config)


@pytest.mark.parametrize(
    "prepare, names, match",
    [
        (merged, NAMES, r"merged adapters .*keras_lora.unmerge\(model\)"),
        (None, ["task_c"] * SAMPLES, r"\['task_c'\] are not"),
        (dora, ["task_dora"] * SAMPLES, r"\['task_dora'\] of layer .* use DoRA"),
        (only_some_layers, ["head_only"] * SAMPLES, r"layer 'dense'.*'head_only'"),
        (None, "task_b", r"list of adapter names"),
    ],
    ids=["merged", "unknown", "dora", "unknown_to_a_layer", "bare_string"],
)
def test_refused_routing_changes_nothing(prepare, names, match):
    model, inputs = two_adapter_model("sequential")
    if prepare is not None:
        prepare(model)
    before, expected = snapshot(model), outputs(model, inputs)
    with pytest.raises((ValueError, TypeError), match=match):
        with keras_lora.adapter_per_example(model, names):
            pytest.fail("the block must not run")
    assert_same_snapshot(before, snapshot(model))
    assert not any(map(routing_of, keras_lora.lora_layers(model).values()))
    assert_close(outputs(model, inputs), expected)


def test_routing_inside_disable_adapters_is_refused():
    model, inputs = two_adapter_model("sequential")
    with keras_lora.disable_adapters(model):
        with pytest.raises(ValueError, match=r"adapters disabled; route examples"):
            with keras_lora.adapter_per_example(model, NAMES):
                pytest.fail("the block must not run")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda model, x: model(x, training=True), r"inference only"),
        (lambda model, x: model(x[:5]), r"batch of 5 examples but 8 were routed"),
        (
            lambda model, x: keras_lora.adapter_per_example(model, NAMES).__enter__(),
            r"already routed",
        ),
    ],
    ids=["training", "batch_size", "nested"],
)
def test_refused_calls_inside_the_block_change_nothing(call, match):
    model, inputs = two_adapter_model("sequential")
    before, expected = snapshot(model), outputs(model, inputs)
    with keras_lora.adapter_per_example(model, NAMES):
        with pytest.raises(ValueError, match=match):
            call(model, inputs)
    assert_same_snapshot(before, snapshot(model))
    assert not any(map(routing_of, keras_lora.lora_layers(model).values()))
    assert_close(outputs(model, inputs), expected)


def test_fit_inside_the_block_is_refused():
    model, inputs = two_adapter_model("sequential")
    model.compile(optimizer="adam", loss="mse")
    targets = np.zeros((SAMPLES, 4), "float32")
    with keras_lora.adapter_per_example(model, NAMES):
        with pytest.raises(ValueError, match=r"inference only"):
            model.fit(inputs, targets, batch_size=SAMPLES, verbose=0)


def test_a_model_without_lora_layers_is_refused():
    model, _ = MODEL_KINDS["sequential"]()
    with pytest.raises(ValueError, match=r"has no LoRA layer"):
        with keras_lora.adapter_per_example(model, NAMES):
            pytest.fail("the block must not run")
