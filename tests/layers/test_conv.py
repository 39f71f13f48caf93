"""LoraConv1D/2D/3D: conv_B(conv_A(x)) against a direct NumPy convolution with
the merged kernel, grouped factors against peft's own numbers, channels_first,
and merge invariants over random configurations."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import peft_fixtures
from testing.layer_checks import (
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
)
from testing.references import numpy, numpy_conv, numpy_conv_delta, numpy_weights, relu

from keras_lora import LoraConv1D, LoraConv2D, LoraConv3D

layers = keras.layers

CONFIGS = {
    "conv1d_strided": (
        LoraConv1D,
        dict(filters=6, kernel_size=3, strides=2, activation="relu"),
        (2, 9, 3),
    ),
    "conv1d_causal_dilated": (
        LoraConv1D,
        dict(filters=6, kernel_size=3, padding="causal", dilation_rate=2),
        (2, 9, 3),
    ),
    "conv1d_causal_channels_first": (
        LoraConv1D,
        dict(filters=6, kernel_size=3, padding="causal", data_format="channels_first"),
        (2, 3, 9),
    ),
    "conv2d_strided_same": (
        LoraConv2D,
        dict(filters=6, kernel_size=3, strides=2, padding="same"),
        (2, 7, 7, 3),
    ),
    "conv2d_dilated_valid": (
        LoraConv2D,
        dict(filters=6, kernel_size=(3, 2), dilation_rate=2),
        (2, 8, 8, 3),
    ),
    "conv2d_groups_same": (
        LoraConv2D,
        dict(filters=6, kernel_size=3, groups=2, padding="same"),
        (2, 6, 6, 4),
    ),
    "conv2d_groups_strided_valid": (
        LoraConv2D,
        dict(filters=6, kernel_size=2, groups=3, strides=2),
        (2, 7, 7, 6),
    ),
    "conv2d_channels_first": (
        LoraConv2D,
        dict(filters=6, kernel_size=3, strides=(1, 2), data_format="channels_first"),
        (2, 3, 7, 7),
    ),
    "conv3d_strided_same": (
        LoraConv3D,
        dict(filters=4, kernel_size=2, strides=(1, 2, 1), padding="same"),
        (2, 4, 4, 4, 2),
    ),
}


def channels_last(x, data_format):
    return x if data_format == "channels_last" else np.moveaxis(x, 1, -1)


def channels_back(x, data_format):
    return x if data_format == "channels_last" else np.moveaxis(x, -1, 1)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_matches_numpy_conv_with_the_merged_kernel(name, use_rslora):
    wrapper_class, config, input_shape = CONFIGS[name]
    base = wrapper_class.base_class(**config)
    wrapper = wrapper_class(base, rank=6, alpha=3.0, use_rslora=use_rslora)
    wrapper.build(input_shape)
    randomize_adapter(wrapper)
    x = np.random.default_rng(0).uniform(-1, 1, input_shape).astype("float32")
    outputs = run_layer_test(wrapper, x)

    kernel, bias, lora_a, lora_b, scale = numpy_weights(wrapper)
    assert scale == (3.0 / np.sqrt(6) if use_rslora else 3.0 / 6)
    delta = numpy_conv_delta(lora_a, lora_b, base.groups)
    expected = numpy_conv(
        channels_last(x, base.data_format),
        kernel + scale * delta,
        strides=base.strides,
        padding=base.padding,
        dilation_rate=base.dilation_rate,
        groups=base.groups,
    )
    expected = channels_back(expected + bias, base.data_format)
    if config.get("activation") == "relu":
        expected = relu(expected)
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        numpy(wrapper.get_delta_weight()), scale * delta, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_reference_matches_the_keras_base_conv(name):
    # The reference is only as good as its agreement with Keras itself.
    wrapper_class, config, input_shape = CONFIGS[name]
    base = wrapper_class.base_class(**{**config, "activation": None})
    x = np.random.default_rng(1).uniform(-1, 1, input_shape).astype("float32")
    outputs = numpy(base(x))
    expected = numpy_conv(
        channels_last(x, base.data_format),
        numpy(base.kernel).astype("float64"),
        strides=base.strides,
        padding=base.padding,
        dilation_rate=base.dilation_rate,
        groups=base.groups,
    )
    np.testing.assert_allclose(
        outputs,
        channels_back(expected + numpy(base.bias), base.data_format),
        rtol=0,
        atol=1e-5,
    )


def test_grouped_factors_follow_peft():
    # B is a grouped 1x1 conv (rank/groups -> filters/groups per group), as in
    # peft. A is a grouped conv to the rank (in/groups -> rank/groups per
    # group); peft 0.21's A is ungrouped (its rank channel j may read every
    # input), so the fixture's A reads only group j // (rank/groups), which
    # this A holds. peft does not merge grouped convolutions: the merged layer
    # must still compute peft's unmerged output.
    fixture = peft_fixtures.load("conv2d_groups")
    wrapper = fixture.wrapper()
    assert wrapper.layer.groups == 2
    assert tuple(wrapper.lora_a.shape) == (3, 3, 2, 4)
    assert tuple(wrapper.lora_b.shape) == (1, 1, 2, 6)
    # Rank channel 3 (group 1) holds peft's A[3] on input channels 2 and 3.
    peft_a = fixture.arrays["lora_A"]
    np.testing.assert_array_equal(
        numpy(wrapper.lora_a)[..., 3], peft_a[3, 2:].transpose(1, 2, 0)
    )
    assert not peft_a[3, :2].any()

    x, expected = fixture.tensor("inputs"), fixture.tensor("outputs")
    outputs = numpy(wrapper(x, training=True))
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-5)
    wrapper.merge()
    np.testing.assert_allclose(numpy(wrapper(x)), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("rank", [3, np.int64(3)], ids=["int", "numpy_int"])
def test_rank_not_divisible_by_groups_is_refused(rank):
    base = layers.Conv2D(4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2; `rank` must be divisible by it"):
        LoraConv2D(base, rank=rank)

    wrapper = LoraConv2D(base, rank=2)
    wrapper.build((None, 5, 5, 4))
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="`rank` must be divisible by it"):
        wrapper.add_adapter("odd", rank=rank)
    assert_unchanged(wrapper, state)


def test_numpy_integer_rank_is_accepted():
    wrapper = LoraConv2D(layers.Conv2D(4, 3, groups=2), rank=np.int64(4))
    wrapper.build((None, 5, 5, 4))
    assert type(wrapper.adapters["default"].rank) is int
    assert tuple(wrapper.lora_b.shape) == (1, 1, 2, 4)


@pytest.mark.parametrize(
    "wrapper_class, layer",
    [
        (LoraConv2D, layers.Conv2DTranspose(4, 3)),
        (LoraConv2D, layers.DepthwiseConv2D(3)),
        (LoraConv2D, layers.SeparableConv2D(4, 3)),
        (LoraConv1D, layers.Conv2D(4, 3)),
        (LoraConv3D, layers.Conv2D(4, 3)),
    ],
    ids=["transpose", "depthwise", "separable", "conv2d_in_1d", "conv2d_in_3d"],
)
def test_other_convolutions_are_refused(wrapper_class, layer):
    name = wrapper_class.base_class.__name__
    with pytest.raises(TypeError, match=f"wraps keras.layers.{name} layers"):
        wrapper_class(layer, rank=2)


@st.composite
def conv2d_configs(draw):
    groups = draw(st.sampled_from([1, 2]))
    dilation = draw(st.integers(1, 2))
    return {
        "groups": groups,
        "in_channels": groups * draw(st.integers(1, 3)),
        "filters": groups * draw(st.integers(1, 3)),
        "rank": groups * draw(st.integers(1, 3)),
        "kernel_size": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        # Keras refuses strides > 1 together with dilation > 1.
        "strides": 1 if dilation > 1 else draw(st.integers(1, 2)),
        "dilation_rate": dilation,
        "padding": draw(st.sampled_from(["valid", "same"])),
        "alpha": draw(st.floats(0.5, 16.0)),
        "use_rslora": draw(st.booleans()),
    }


@settings(max_examples=15, deadline=None, derandomize=True)
@given(config=conv2d_configs())
def test_merge_invariants_hold_for_random_conv2d(config):
    base = layers.Conv2D(
        config["filters"],
        config["kernel_size"],
        strides=config["strides"],
        padding=config["padding"],
        dilation_rate=config["dilation_rate"],
        groups=config["groups"],
    )
    wrapper = LoraConv2D(
        base,
        rank=config["rank"],
        alpha=config["alpha"],
        use_rslora=config["use_rslora"],
    )
    x = np.random.default_rng(config["rank"]).uniform(
        -1, 1, (2, 7, 7, config["in_channels"])
    )
    x = x.astype("float32")
    wrapper.build(x.shape)
    randomize_adapter(wrapper, seed=config["filters"])
    kernel = numpy(base.kernel)
    unmerged = numpy(wrapper(x))

    wrapper.merge()
    np.testing.assert_allclose(numpy(wrapper(x)), unmerged, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(numpy(wrapper(x)), numpy(base(x)))
    wrapper.unmerge()
    np.testing.assert_allclose(numpy(base.kernel), kernel, rtol=0, atol=1e-6)
