"""Per-example adapters on one layer (`keras_lora.layers.adapter_routing` and the
`adapter_names` / `adapter_index` call arguments), over every wrapper case: a
mixed batch equals each example run alone with its adapter, eagerly and
traced, and every refusal names its argument and changes nothing."""

import keras
import numpy as np
import pytest
from backends import symbolic_tracing
from testing.cases import CASES, case_id
from testing.layer_checks import assert_unchanged, layer_state, randomize_adapter
from testing.model_checks import traced
from testing.references import numpy

from keras_lora.layers.adapter_routing import (
    AdapterRouting,
    adapter_routing,
    route,
    routing_for_call,
)

cases = pytest.mark.parametrize("case", CASES, ids=case_id)
NAMES = ["second", "__base__", "default", "second", "default", "__base__"]
INDEX = np.array([1, -1, 0, 1, 0, 2], "int32")  # into ["default", "second", BASE]


def two_adapter_layer(case):
    """A wrapper with two random adapters, `"default"` and `"second"`."""
    layer = case.wrap()
    layer.add_adapter("second", rank=2)
    randomize_adapter(layer, "default", seed=1)
    randomize_adapter(layer, "second", seed=2)
    return layer


def batch_of_six(case):
    return np.concatenate([case.inputs(seed) for seed in range(3)])


def alone(layer, x, names):
    """Each example run alone, with its adapter active (or disabled)."""
    rows = []
    for row, name in zip(x, names, strict=True):
        if name == "__base__":
            layer.disable_adapters()
        else:
            layer.set_adapter(name)
        rows.append(numpy(layer(row[None]))[0])
        layer.enable_adapters()
    layer.set_adapter("default")
    return np.stack(rows)


@cases
def test_mixed_batch_equals_each_example_alone(case):
    layer = two_adapter_layer(case)
    x = batch_of_six(case)
    expected = alone(layer, x, NAMES)
    by_name = numpy(layer(x, adapter_names=NAMES))
    np.testing.assert_allclose(by_name, expected, rtol=0, atol=1e-5)
    by_index = layer(
        x,
        adapter_names=["default", "second", "__base__"],
        adapter_index=keras.ops.convert_to_tensor(INDEX),
    )
    np.testing.assert_allclose(numpy(by_index), expected, rtol=0, atol=1e-5)
    # The rows really differ by adapter, so the check above is not vacuous.
    assert np.abs(expected[0] - expected[1]).max() > 1e-3


@cases
@symbolic_tracing
def test_traced_call_with_an_index_tensor(case):
    layer = two_adapter_layer(case)
    x = batch_of_six(case)
    expected = alone(layer, x, NAMES)

    def call(inputs, adapter_index):
        return layer(
            inputs,
            adapter_names=["default", "second", "__base__"],
            adapter_index=adapter_index,
        )

    function = traced(call)
    np.testing.assert_allclose(numpy(function(x, INDEX)), expected, rtol=0, atol=1e-5)
    # The same traced function, another routing: the index is an input.
    flipped = np.array([0, 1, 1, -1, 2, 0], "int32")
    names = ["default", "second", "second", "__base__", "__base__", "default"]
    expected = alone(layer, x, names)
    np.testing.assert_allclose(numpy(function(x, flipped)), expected, rtol=0, atol=1e-5)


@cases
def test_routing_set_by_route_applies_to_plain_calls(case):
    layer = two_adapter_layer(case)
    x = batch_of_six(case)
    expected = alone(layer, x, NAMES)
    route(layer, adapter_routing(NAMES))
    try:
        routed = numpy(layer(x))
    finally:
        route(layer, None)
    np.testing.assert_allclose(routed, expected, rtol=0, atol=1e-5)
    active = numpy(layer(x))
    np.testing.assert_allclose(active, alone(layer, x, ["default"] * 6), atol=1e-5)


def dora(layer):
    layer.delete_adapter("second")
    layer.add_adapter("second", rank=2, use_dora=True)


def merge(layer):
    layer.merge()


def disable(layer):
    layer.disable_adapters()


@pytest.mark.parametrize(
    "prepare, kwargs, match",
    [
        (None, {"training": True}, r"inference only .* Received: training=True"),
        (merge, {}, r"merged adapters \['default'\].*unmerge"),
        (disable, {}, r"adapters disabled; route examples"),
        (dora, {}, r"\['second'\] .* use DoRA"),
        (None, {"adapter_names": ["third"] * 6}, r"\['third'\] are not"),
        (None, {"adapter_names": NAMES[:4]}, r"batch of 6 examples but 4 were routed"),
    ],
    ids=["training", "merged", "disabled", "dora", "unknown", "batch"],
)
@cases
def test_refusals_name_the_problem_and_change_nothing(case, prepare, kwargs, match):
    layer = two_adapter_layer(case)
    x = batch_of_six(case)
    if prepare is not None:
        prepare(layer)
    state = layer_state(layer)
    kwargs = {"adapter_names": NAMES, **kwargs}
    with pytest.raises(ValueError, match=match):
        layer(x, **kwargs)
    assert_unchanged(layer, state)


@pytest.mark.parametrize(
    "adapter_names, adapter_index, error, match",
    [
        ("default", None, TypeError, r"list of adapter names.*names='default'"),
        (["default", ""], None, TypeError, r"adapter_names=\['default', ''\]"),
        ([], None, ValueError, r"at least one adapter"),
        (["a", "a"], [0, 1], ValueError, r"each adapter once"),
        (["a"], [0.0, 1.0], TypeError, r"must hold integers.*float"),
        (["a"], [[0]], ValueError, r"shape \(batch,\).*\(1, 1\)"),
        (["a", "b"], [0, 2, -2], ValueError, r"in \[-1, 2\).*values \[-2, 2\]"),
    ],
)
def test_bad_routing_arguments_are_refused(adapter_names, adapter_index, error, match):
    with pytest.raises(error, match=match):
        adapter_routing(adapter_names, adapter_index)


def test_index_without_names_is_refused():
    layer = CASES[0].wrap()
    with pytest.raises(ValueError, match=r"`adapter_index` needs `adapter_names`"):
        routing_for_call(layer, adapter_index=[0])
    assert routing_for_call(layer) is None


def test_names_per_example_become_an_index_into_unique_names():
    routing = adapter_routing(["b", "__base__", "a", "b"])
    assert isinstance(routing, AdapterRouting)
    assert routing.adapter_names == ("b", "__base__", "a")
    np.testing.assert_array_equal(numpy(routing.adapter_index), [0, 1, 2, 0])
    assert routing.batch_size == 4
    assert routing.adapters() == [(0, "b"), (2, "a")]
