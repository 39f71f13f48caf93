"""add_weighted_adapter: `cat` is exact, `svd` is the truncated weighted update,
`linear` is peft's factor mix (checked against NumPy), the new adapter saves and
loads like any other, and every refusal leaves the model unchanged."""

import keras
import numpy as np
import pytest
from testing.cases import CASES, TYPE_CASES, case_id
from testing.layer_checks import assert_unchanged, layer_state, randomize_adapter
from testing.model_checks import model_around
from testing.references import float64

import keras_lora

layers = keras.layers
WEIGHTS = [0.7, -0.3]
type_cases = pytest.mark.parametrize("case", TYPE_CASES, ids=case_id)


def two_adapter_model(case):
    """A model around one wrapper with adapters "default" (rank 4, alpha 8)
    and "b" (rank 2, alpha 3), both random."""
    # Named, so that adapter files find it in another model.
    wrapper = case.wrap(rank=4, alpha=8.0, name="site")
    wrapper.add_adapter("b", rank=2, alpha=3.0)
    randomize_adapter(wrapper, "default", seed=1)
    randomize_adapter(wrapper, "b", seed=2)
    return model_around(wrapper, case), wrapper


def weighted_delta(wrapper, names, weights):
    return sum(
        w * float64(wrapper.get_delta_weight(n))
        for n, w in zip(names, weights, strict=True)
    )


def matrices(wrapper, name):
    adapter = wrapper.adapters[name]
    a, b = float64(adapter.lora_a), float64(adapter.lora_b)
    return a.reshape(-1, adapter.rank), b.reshape(adapter.rank, -1)


@type_cases
def test_cat_equals_both_adapters_active_at_once(case):
    model, wrapper = two_adapter_model(case)
    x = case.inputs()
    keras_lora.set_adapter(model, ["default", "b"])
    expected = float64(model(x))
    keras_lora.add_weighted_adapter(
        model, ["default", "b"], [1.0, 1.0], "both", combination="cat"
    )
    keras_lora.set_adapter(model, "both")
    np.testing.assert_allclose(float64(model(x)), expected, rtol=0, atol=1e-5)
    adapter = wrapper.adapters["both"]
    assert (adapter.rank, adapter.scale, adapter.use_rslora) == (6, 1.0, False)


@type_cases
def test_cat_update_is_the_weighted_sum_of_updates(case):
    model, wrapper = two_adapter_model(case)
    keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "mix", "cat")
    np.testing.assert_allclose(
        float64(wrapper.get_delta_weight("mix")),
        weighted_delta(wrapper, ["default", "b"], WEIGHTS),
        rtol=0,
        atol=1e-5,
    )
    # As peft: each adapter's weight and scale are folded into its A.
    a, b = matrices(wrapper, "mix")
    a_0, b_0 = matrices(wrapper, "default")
    np.testing.assert_allclose(a[:, :4], WEIGHTS[0] * 2.0 * a_0, atol=1e-6)
    np.testing.assert_allclose(b[:4], b_0, atol=1e-6)


@type_cases
def test_svd_at_full_rank_equals_the_weighted_sum_of_updates(case):
    model, wrapper = two_adapter_model(case)
    keras_lora.add_weighted_adapter(
        model, ["default", "b"], WEIGHTS, "full", combination="svd", rank=6
    )
    np.testing.assert_allclose(
        float64(wrapper.get_delta_weight("full")),
        weighted_delta(wrapper, ["default", "b"], WEIGHTS),
        rtol=0,
        atol=1e-5,
    )


def test_svd_keeps_the_top_singular_part_at_the_largest_rank_by_default():
    case = TYPE_CASES[0]
    model, wrapper = two_adapter_model(case)
    keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "top")
    adapter = wrapper.adapters["top"]
    assert (adapter.rank, adapter.alpha) == (4, 4.0)
    target = weighted_delta(wrapper, ["default", "b"], WEIGHTS)
    u, s, vh = np.linalg.svd(target, full_matrices=False)
    expected = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_allclose(
        float64(wrapper.get_delta_weight("top")), expected, rtol=0, atol=1e-5
    )
    # A holds orthonormal columns (peft's Vh rows), B the singular values.
    a, _ = matrices(wrapper, "top")
    np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)


def test_svd_beyond_the_update_rank_pads_with_zeros():
    case = TYPE_CASES[0]  # a 5 x 6 kernel: the update has rank 5 at most
    model, wrapper = two_adapter_model(case)
    keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "wide", rank=8)
    a, b = matrices(wrapper, "wide")
    np.testing.assert_array_equal(a[:, 5:], 0.0)
    np.testing.assert_allclose(
        float64(wrapper.get_delta_weight("wide")),
        weighted_delta(wrapper, ["default", "b"], WEIGHTS),
        atol=1e-5,
    )


@type_cases
def test_linear_mixes_the_factors_as_peft(case):
    wrapper = case.wrap(rank=4, alpha=8.0)
    wrapper.add_adapter("c", rank=4, alpha=2.0)
    randomize_adapter(wrapper, "default", seed=1)
    randomize_adapter(wrapper, "c", seed=2)
    model = model_around(wrapper, case)
    keras_lora.add_weighted_adapter(
        model, ["default", "c"], WEIGHTS, "lin", combination="linear"
    )
    # weight * scale: 0.7 * 2 and -0.3 * 0.5; the sign goes to A only.
    factors = [0.7 * 2.0, -0.3 * 0.5]
    expected_a = sum(
        np.sign(f) * np.sqrt(abs(f)) * float64(wrapper.adapters[n].lora_a)
        for f, n in zip(factors, ["default", "c"], strict=True)
    )
    expected_b = sum(
        np.sqrt(abs(f)) * float64(wrapper.adapters[n].lora_b)
        for f, n in zip(factors, ["default", "c"], strict=True)
    )
    adapter = wrapper.adapters["lin"]
    np.testing.assert_allclose(float64(adapter.lora_a), expected_a, atol=1e-6)
    np.testing.assert_allclose(float64(adapter.lora_b), expected_b, atol=1e-6)
    assert (adapter.rank, adapter.scale) == (4, 1.0)


def test_new_adapter_is_inactive_and_saves_like_any_other(tmp_path):
    case = TYPE_CASES[0]
    keras.utils.set_random_seed(7)
    model, wrapper = two_adapter_model(case)
    x = case.inputs()
    before = float64(model(x))
    keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "mix", "cat")
    assert wrapper.active_adapters == ("default",)
    assert not any(v.trainable for v in wrapper.adapters["mix"].weights)
    np.testing.assert_array_equal(float64(model(x)), before)
    keras_lora.set_adapter(model, "mix")
    expected = float64(model(x))

    keras_lora.save_adapter(model, tmp_path / "mix", adapter="mix")
    keras.utils.set_random_seed(7)  # the same base weights
    fresh, _ = two_adapter_model(case)
    keras_lora.load_adapter(fresh, tmp_path / "mix")
    keras_lora.set_adapter(fresh, "mix")
    np.testing.assert_allclose(float64(fresh(x)), expected, rtol=0, atol=1e-6)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(float64(loaded(x)), expected, rtol=0, atol=1e-6)
    assert keras_lora.adapter_config(model, "mix").rank == 6


def test_layers_without_the_adapters_are_left_alone():
    inputs = keras.Input((5,))
    hidden = layers.Dense(6, name="first")(inputs)
    outputs = layers.Dense(3, name="second")(hidden)
    model = keras_lora.convert(keras.Model(inputs, outputs), rank=2)
    config = keras_lora.LoraConfig(rank=2, targets=["first"])
    keras_lora.add_adapter(model, "only_first", config)
    keras_lora.add_weighted_adapter(model, ["only_first"], [2.0], "double", "cat")
    lora = keras_lora.lora_layers(model)
    assert "double" in lora["first"].adapters
    assert "double" not in lora["second"].adapters


# -- Refusals leave the model unchanged ---------------------------------------------

REFUSALS = [
    (
        {"adapters": ["default", "nope"]},
        ValueError,
        "`adapters` must name adapters of model",
    ),
    ({"adapters": []}, ValueError, "`adapters` must name adapters of model"),
    ({"adapters": "default"}, TypeError, "`adapters` must be a list"),
    ({"weights": [1.0]}, ValueError, "one number per adapter \\(2\\)"),
    ({"weights": 1.0}, TypeError, "`weights` must be a list of numbers"),
    ({"weights": [1.0, "2"]}, ValueError, "`weights` must be finite real numbers"),
    ({"weights": [1.0, True]}, ValueError, "`weights` must be finite real numbers"),
    ({"weights": [1.0, np.nan]}, ValueError, "`weights` must be finite real"),
    ({"adapter_name": "b"}, ValueError, "already has an adapter named 'b'"),
    ({"adapter_name": ""}, ValueError, "`adapter_name` must be a non-empty"),
    ({"combination": "ties"}, ValueError, "`combination` must be one of"),
    ({"rank": 0}, ValueError, "`rank` must be a positive integer or None"),
    ({"rank": 2, "combination": "cat"}, ValueError, "`rank` applies to"),
    ({"combination": "linear"}, ValueError, "must have one rank.*\\[4, 2\\]"),
]


@pytest.mark.parametrize(
    "arguments, error, match", REFUSALS, ids=[str(r[0]) for r in REFUSALS]
)
def test_bad_arguments_are_refused(arguments, error, match):
    model, wrapper = two_adapter_model(TYPE_CASES[0])
    state = layer_state(wrapper)
    call = {
        "adapters": ["default", "b"],
        "weights": WEIGHTS,
        "adapter_name": "mix",
        **arguments,
    }
    with pytest.raises(error, match=match):
        keras_lora.add_weighted_adapter(model, **call)
    assert_unchanged(wrapper, state)


def test_layers_holding_some_of_the_adapters_are_refused():
    inputs = keras.Input((5,))
    hidden = layers.Dense(6, name="first")(inputs)
    outputs = layers.Dense(3, name="second")(hidden)
    model = keras_lora.convert(keras.Model(inputs, outputs), rank=2)
    keras_lora.add_adapter(model, "x", keras_lora.LoraConfig(rank=2, targets=["first"]))
    lora = keras_lora.lora_layers(model)
    states = {path: layer_state(layer) for path, layer in lora.items()}
    with pytest.raises(ValueError, match="\\['second'\\] hold only some"):
        keras_lora.add_weighted_adapter(model, ["default", "x"], [1, 1], "mix")
    for path, layer in keras_lora.lora_layers(model).items():
        assert_unchanged(layer, states[path])


def test_merged_layers_are_refused():
    model, wrapper = two_adapter_model(TYPE_CASES[0])
    keras_lora.merge(model)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="are merged"):
        keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "mix")
    assert_unchanged(wrapper, state)


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_grouped_convolution_is_refused_by_name(combination):
    case = next(case for case in CASES if case.id == "conv2d_groups")
    model, wrapper = two_adapter_model(case)
    state = layer_state(wrapper)
    match = f"has groups=2.*combination={combination!r}"
    with pytest.raises(ValueError, match=match):
        keras_lora.add_weighted_adapter(
            model, ["default", "b"], WEIGHTS, "mix", combination
        )
    assert_unchanged(wrapper, state)


def test_adapters_that_rewrote_the_kernel_are_refused():
    case = TYPE_CASES[0]
    base = case.base()
    base.build(case.input_shape)
    wrapper = case.wrapper(base, rank=2, init="pissa")
    wrapper.add_adapter("b", rank=2)
    model = model_around(wrapper, case)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="'default' of layer .* has init='pissa'"):
        keras_lora.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "mix")
    assert_unchanged(wrapper, state)


def test_dora_adapters_are_refused():
    model, wrapper = two_adapter_model(TYPE_CASES[0])
    wrapper.add_adapter("dora", rank=2, use_dora=True)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="'dora' of layer .* is DoRA"):
        keras_lora.add_weighted_adapter(model, ["default", "dora"], WEIGHTS, "mix")
    assert_unchanged(wrapper, state)
