"""Behaviour every wrapper shares, written once and run over the case table in
`tests/testing/cases.py` (every wrapper class, with strides, dilation, padding modes,
groups, channels_first, two EinsumDense equations and mask_zero)."""

import keras
import numpy as np
import pytest
from testing.cases import CASES, DROPOUT_CASES, RANK, TYPE_CASES, case_id
from testing.layer_checks import (
    assert_listed_once,
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
    same_variables,
)
from testing.model_checks import assert_fit_changes_only, model_around, save_and_load
from testing.references import numpy

cases = pytest.mark.parametrize("case", CASES, ids=case_id)
type_cases = pytest.mark.parametrize("case", TYPE_CASES, ids=case_id)
dropout_cases = pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)


def adapter_variables(wrapper, *names):
    return [
        variable
        for name in names
        for variable in (wrapper.adapters[name].lora_a, wrapper.adapters[name].lora_b)
    ]


# -- A fresh adapter leaves the output unchanged -------------------------------


@cases
@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_fresh_adapter_on_built_base_gives_base_output(case, init):
    base = case.base()
    x = case.inputs()
    expected = numpy(base(x))
    wrapper = case.wrapper(base, rank=RANK, init=init)
    assert wrapper.built
    np.testing.assert_allclose(run_layer_test(wrapper, x), expected, rtol=0, atol=1e-6)


@cases
def test_fresh_adapter_on_unbuilt_base_gives_base_output(case):
    wrapper = case.wrap(built=False)
    assert not wrapper.built and not wrapper.layer.built
    x = case.inputs()
    outputs = run_layer_test(wrapper, x)
    np.testing.assert_allclose(outputs, numpy(wrapper.layer(x)), rtol=0, atol=1e-6)


@cases
@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
def test_factor_shapes_follow_the_keras_layout(case, built):
    wrapper = case.wrap(built=built)
    if not built:
        wrapper(case.inputs())
    assert tuple(wrapper.lora_a.shape) == case.a_shape
    assert tuple(wrapper.lora_b.shape) == case.b_shape
    assert wrapper.lora_a.dtype == wrapper.lora_b.dtype == "float32"


@cases
def test_weights_list_each_variable_once_and_only_active_adapters_train(case):
    wrapper = case.wrap()
    wrapper.add_adapter("second", rank=2)
    assert_listed_once(wrapper.weights)
    assert len(wrapper.weights) == len(wrapper.layer.weights) + 4
    assert same_variables(
        wrapper.trainable_weights, adapter_variables(wrapper, "default")
    )
    assert not wrapper.adapters["second"].trainable

    wrapper.set_adapter("second")
    assert same_variables(
        wrapper.trainable_weights, adapter_variables(wrapper, "second")
    )
    assert wrapper.lora_a is wrapper.adapters["second"].lora_a
    assert not wrapper.adapters["default"].trainable


# -- Merging -------------------------------------------------------------------


@cases
@pytest.mark.parametrize("safe", [False, True], ids=["unsafe", "safe"])
def test_merge_matches_unmerged_output_and_unmerge_restores_the_kernel(case, safe):
    wrapper = case.wrap()
    randomize_adapter(wrapper)
    x = case.inputs()
    kernel = numpy(wrapper.kernel_variable)
    unmerged = numpy(wrapper(x))

    wrapper.merge(safe=safe)
    assert wrapper.merged and wrapper.merged_adapters == ("default",)
    merged = numpy(wrapper(x))
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(merged, numpy(wrapper.layer(x)))
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable),
        kernel + numpy(wrapper.get_delta_weight("default")),
        rtol=0,
        atol=1e-6,
    )

    wrapper.unmerge()
    assert not wrapper.merged and wrapper.merged_adapters == ()
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable), kernel, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(numpy(wrapper(x)), unmerged, rtol=0, atol=1e-5)


@type_cases
def test_merged_kernel_is_kernel_plus_deltas_and_writes_nothing(case):
    wrapper = case.wrap()
    randomize_adapter(wrapper)
    wrapper.add_adapter("second", rank=RANK, init=False)
    kernel = numpy(wrapper.kernel_variable)
    expected = (
        kernel
        + numpy(wrapper.get_delta_weight("default"))
        + numpy(wrapper.get_delta_weight("second"))
    )
    merged = numpy(wrapper.merged_kernel(["default", "second"], safe=True))
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(numpy(wrapper.kernel_variable), kernel)
    assert not wrapper.merged


@type_cases
def test_safe_merge_refuses_a_non_finite_kernel_and_changes_nothing(case):
    wrapper = case.wrap()
    randomize_adapter(wrapper)
    lora_a = numpy(wrapper.lora_a)
    lora_a.flat[0] = np.inf
    wrapper.lora_a.assign(lora_a)
    state = layer_state(wrapper)
    with pytest.raises(
        ValueError, match="gives non-finite weights; nothing was merged"
    ):
        wrapper.merge(safe=True)
    assert_unchanged(wrapper, state)


# -- Training ------------------------------------------------------------------


@cases
def test_fit_changes_only_the_active_adapter(case):
    wrapper = case.wrap()
    wrapper.add_adapter("inactive", rank=2, init=False)
    model = model_around(wrapper, case)
    frozen = [*wrapper.layer.weights, *adapter_variables(wrapper, "inactive")]
    trained = adapter_variables(wrapper, "default")
    assert_fit_changes_only(model, case.inputs(), trained, frozen)


@dropout_cases
def test_dropout_runs_only_in_training(case):
    wrapper = case.wrap(dropout=0.5)
    randomize_adapter(wrapper)
    wrapper.add_adapter("no_dropout", rank=RANK)
    for source, target in zip(
        adapter_variables(wrapper, "default"),
        adapter_variables(wrapper, "no_dropout"),
        strict=True,
    ):
        target.assign(source)
    x = case.inputs()
    wrapper.set_adapter("no_dropout")
    without_dropout = numpy(wrapper(x))
    wrapper.set_adapter("default")

    inference = numpy(wrapper(x, training=False))
    np.testing.assert_array_equal(inference, numpy(wrapper(x, training=False)))
    np.testing.assert_array_equal(inference, numpy(wrapper(x)))
    np.testing.assert_allclose(inference, without_dropout, rtol=0, atol=1e-6)
    training = numpy(wrapper(x, training=True))
    assert not np.allclose(training, inference, rtol=0, atol=1e-3)


@dropout_cases
def test_dropout_leaves_the_base_path_alone(case):
    wrapper = case.wrap(dropout=0.5)
    x = case.inputs()
    np.testing.assert_allclose(
        numpy(wrapper(x, training=True)), numpy(wrapper.layer(x)), rtol=0, atol=1e-6
    )


# -- Named adapters ------------------------------------------------------------


@cases
def test_several_active_adapters_are_summed(case):
    wrapper = case.wrap()
    wrapper.add_adapter("second", rank=2, alpha=5.0)
    randomize_adapter(wrapper, "default", seed=1)
    randomize_adapter(wrapper, "second", seed=2)
    x = case.inputs()
    base = numpy(wrapper.layer(x))
    wrapper.set_adapter("default")
    first = numpy(wrapper(x))
    wrapper.set_adapter("second")
    second = numpy(wrapper(x))

    wrapper.set_adapter(["default", "second"])
    assert wrapper.active_adapters == ("default", "second")
    assert wrapper.active_adapter == "default"
    assert same_variables(
        wrapper.trainable_weights, adapter_variables(wrapper, "default", "second")
    )
    both = numpy(wrapper(x))
    activation = getattr(wrapper.layer, "activation", None)
    if activation in (None, keras.activations.linear):
        np.testing.assert_allclose(
            both - base, (first - base) + (second - base), rtol=0, atol=1e-5
        )

    kernel = numpy(wrapper.kernel_variable)
    deltas = numpy(wrapper.get_delta_weight("default")) + numpy(
        wrapper.get_delta_weight("second")
    )
    wrapper.merge()
    assert wrapper.merged_adapters == ("default", "second")
    np.testing.assert_allclose(
        numpy(wrapper.kernel_variable), kernel + deltas, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(numpy(wrapper(x)), both, rtol=0, atol=1e-5)


@cases
def test_each_adapter_keeps_its_own_settings(case):
    wrapper = case.wrap(alpha=8.0)
    wrapper.add_adapter("rs", rank=2, alpha=4.0, use_rslora=True, init="gaussian")
    default, rs = wrapper.adapters["default"], wrapper.adapters["rs"]
    assert (default.rank, default.alpha, default.use_rslora) == (RANK, 8.0, False)
    assert default.scale == 8.0 / RANK
    assert (rs.rank, rs.alpha, rs.use_rslora, rs.init) == (2, 4.0, True, "gaussian")
    assert rs.scale == pytest.approx(4.0 / np.sqrt(2))
    assert tuple(rs.lora_a.shape) == (*case.a_shape[:-1], 2)
    assert np.prod(rs.lora_b.shape) * RANK == np.prod(case.b_shape) * 2
    assert wrapper.get_config()["adapters"] == {
        "default": default.settings(),
        "rs": rs.settings(),
    }


@type_cases
def test_set_and_delete_adapters(case):
    wrapper = case.wrap()
    wrapper.add_adapter("b", rank=2)
    wrapper.add_adapter("c", rank=2)
    assert wrapper.adapter_names == ("default", "b", "c")
    assert wrapper.active_adapters == ("default",)

    wrapper.set_adapter("c")
    assert wrapper.active_adapter == "c"
    assert wrapper.lora_b is wrapper.adapters["c"].lora_b
    deleted = adapter_variables(wrapper, "c")
    wrapper.delete_adapter("c")
    # Deleting the active adapter activates the first remaining one.
    assert wrapper.adapter_names == ("default", "b")
    assert wrapper.active_adapters == ("default",)
    assert not any(v is d for v in wrapper.weights for d in deleted)
    assert_listed_once(wrapper.weights)
    assert same_variables(
        wrapper.trainable_weights, adapter_variables(wrapper, "default")
    )

    wrapper.set_adapter(["default", "b"])
    wrapper.delete_adapter("default")
    assert wrapper.adapter_names == ("b",)
    assert wrapper.active_adapters == ("b",)
    assert same_variables(wrapper.trainable_weights, adapter_variables(wrapper, "b"))
    x = case.inputs()
    np.testing.assert_allclose(
        run_layer_test(wrapper, x), numpy(wrapper.layer(x)), rtol=0, atol=1e-6
    )


@cases
def test_disabled_adapters_give_the_base_output(case):
    wrapper = case.wrap()
    randomize_adapter(wrapper)
    x = case.inputs()
    adapted = numpy(wrapper(x))
    base = numpy(wrapper.layer(x))
    assert not np.allclose(adapted, base, rtol=0, atol=1e-3)

    wrapper.disable_adapters()
    assert not wrapper.adapters_enabled
    np.testing.assert_array_equal(numpy(wrapper(x)), base)
    wrapper.enable_adapters()
    assert wrapper.adapters_enabled
    np.testing.assert_array_equal(numpy(wrapper(x)), adapted)


@cases
@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
def test_adapter_variables_sit_next_to_the_base_kernel(case, built):
    wrapper = case.wrap(built=built)
    if not built:
        with keras.name_scope("outer"):
            wrapper(case.inputs())
    wrapper.add_adapter("second", rank=2)
    scope = wrapper.layer.path
    assert wrapper.kernel_variable.path.rpartition("/")[0] == scope
    assert [v.path for v in adapter_variables(wrapper, "default", "second")] == [
        f"{scope}/default/lora_a",
        f"{scope}/default/lora_b",
        f"{scope}/second/lora_a",
        f"{scope}/second/lora_b",
    ]


# -- Saving --------------------------------------------------------------------


def put_in_state(wrapper, state, case):
    randomize_adapter(wrapper)
    if state == "merged":
        wrapper.merge()
    elif state == "second_adapter_active":
        dropout = 0.25 if case.supports_dropout else 0.0
        wrapper.add_adapter(
            "second", rank=2, alpha=3.0, dropout=dropout, use_rslora=True, init=False
        )
        wrapper.set_adapter("second")
    elif state == "disabled":
        wrapper.disable_adapters()


def undo_state(wrapper, state):
    if state == "merged":
        wrapper.unmerge()
    elif state == "second_adapter_active":
        wrapper.set_adapter("default")
    elif state == "disabled":
        wrapper.enable_adapters()


@cases
@pytest.mark.parametrize(
    "state", ["unmerged", "merged", "second_adapter_active", "disabled"]
)
def test_keras_file_round_trip_keeps_outputs_and_adapter_state(case, state, tmp_path):
    dropout = 0.1 if case.supports_dropout else 0.0
    wrapper = case.wrap(alpha=6.0, dropout=dropout)
    model = model_around(wrapper, case)
    put_in_state(wrapper, state, case)
    x = case.inputs()

    loaded = save_and_load(model, tmp_path)
    restored = loaded.layers[-1]

    assert type(restored) is type(wrapper)
    expected, actual = layer_state(wrapper), layer_state(restored)
    for key in ("adapter_names", "active_adapters", "merged_adapters", "settings"):
        assert actual[key] == expected[key], key
    assert actual["adapters_enabled"] == expected["adapters_enabled"]
    for (_, value), (_, restored_value) in zip(
        expected["weights"], actual["weights"], strict=True
    ):
        np.testing.assert_array_equal(restored_value, value)
    active = restored.active_adapters
    assert same_variables(
        restored.trainable_weights, adapter_variables(restored, *active)
    )
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))

    undo_state(wrapper, state)
    undo_state(restored, state)
    np.testing.assert_array_equal(
        numpy(restored.kernel_variable), numpy(wrapper.kernel_variable)
    )
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))


# -- Bad input -----------------------------------------------------------------


def merge(wrapper):
    wrapper.merge()


def disable(wrapper):
    wrapper.disable_adapters()


def add_second_and_merge(wrapper):
    wrapper.add_adapter("second", rank=2)
    wrapper.merge()


MERGED_MESSAGE = "while adapters \\['default'\\] are merged. Call `unmerge\\(\\)` first"
BAD_CALLS = {
    "merge_twice": (merge, lambda w, x: w.merge(), "is already merged"),
    "unmerge_unmerged": (None, lambda w, x: w.unmerge(), "is not merged"),
    "merge_unknown": (None, lambda w, x: w.merge(["nope"]), "`adapter_names` must"),
    "merge_no_names": (None, lambda w, x: w.merge([]), "`adapter_names` must name"),
    "merge_disabled": (disable, lambda w, x: w.merge(), "`enable_adapters\\(\\)`"),
    "set_unknown": (None, lambda w, x: w.set_adapter("nope"), "Received: adapter_n"),
    "set_no_names": (None, lambda w, x: w.set_adapter([]), "`adapter_names` must"),
    "delete_unknown": (None, lambda w, x: w.delete_adapter("x"), "`adapter_name` must"),
    "delete_last": (None, lambda w, x: w.delete_adapter("default"), "last adapter"),
    "add_existing": (
        None,
        lambda w, x: w.add_adapter("default", rank=2),
        "already has an adapter named 'default'",
    ),
    "add_empty_name": (None, lambda w, x: w.add_adapter(""), "non-empty string"),
    "add_non_string_name": (None, lambda w, x: w.add_adapter(3), "non-empty string"),
    "add_bad_rank": (None, lambda w, x: w.add_adapter("b", rank=0), "`rank` must"),
    "delta_unknown": (None, lambda w, x: w.get_delta_weight("x"), "`adapter_name` m"),
    "set_while_merged": (
        add_second_and_merge,
        lambda w, x: w.set_adapter("second"),
        "Cannot set_adapter on layer .* " + MERGED_MESSAGE,
    ),
    "delete_while_merged": (
        add_second_and_merge,
        lambda w, x: w.delete_adapter("second"),
        "Cannot delete_adapter on layer .* " + MERGED_MESSAGE,
    ),
    "disable_while_merged": (
        merge,
        lambda w, x: w.disable_adapters(),
        "Cannot disable_adapters on layer .* " + MERGED_MESSAGE,
    ),
    "train_while_merged": (
        merge,
        lambda w, x: w(x, training=True),
        "cannot be trained: the adapters would get no gradient. Call `unmerge",
    ),
}


@type_cases
@pytest.mark.parametrize("bad_call", list(BAD_CALLS))
def test_bad_calls_raise_and_change_nothing(case, bad_call):
    setup, call, message = BAD_CALLS[bad_call]
    wrapper = case.wrap()
    randomize_adapter(wrapper)
    if setup is not None:
        setup(wrapper)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match=message):
        call(wrapper, case.inputs())
    assert_unchanged(wrapper, state)


def another_layer(case):
    if case.wrapper.base_class is keras.layers.Dense:
        return keras.layers.Embedding(4, 2)
    return keras.layers.Dense(2)


@type_cases
def test_wrapping_a_non_layer_is_refused(case):
    with pytest.raises(TypeError, match="`layer` must be a keras.layers."):
        case.wrapper("dense", rank=RANK)


@type_cases
def test_wrapping_another_layer_type_is_refused(case):
    name = case.wrapper.base_class.__name__
    for layer in (another_layer(case), keras.layers.Dropout(0.5)):
        with pytest.raises(TypeError, match=f"wraps keras.layers.{name} layers"):
            case.wrapper(layer, rank=RANK)


@type_cases
def test_wrapping_a_wrapper_is_refused(case):
    wrapper = case.wrap()
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="is already a Lora.*add_adapter"):
        case.wrapper(wrapper, rank=RANK)
    assert_unchanged(wrapper, state)


@type_cases
def test_wrapping_a_layer_with_keras_builtin_lora_is_refused(case):
    base = case.base()
    base.build(case.input_shape)
    base.enable_lora(2)
    with pytest.raises(ValueError, match="has Keras' built-in LoRA enabled"):
        case.wrapper(base, rank=RANK)
