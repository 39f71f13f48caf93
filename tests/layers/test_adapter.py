"""LoraAdapter: argument validation (through every entry point) and peft's
initialisation of the factors."""

import math
import re

import keras
import numpy as np
import pytest
from testing.layer_checks import assert_unchanged, layer_state

from keras_lora import LoraConv2D, LoraDense, LoraEinsumDense, LoraEmbedding
from keras_lora.layers import LoraAdapter

layers = keras.layers

BAD_SETTINGS = [
    ("rank", 0, "`rank` must be a positive integer"),
    ("rank", -1, "`rank` must be a positive integer"),
    ("rank", 2.5, "`rank` must be a positive integer"),
    ("rank", True, "`rank` must be a positive integer"),
    ("rank", "4", "`rank` must be a positive integer"),
    ("alpha", 0, "`alpha` must be a positive number, or None"),
    ("alpha", -1, "`alpha` must be a positive number, or None"),
    ("alpha", math.nan, "`alpha` must be a positive number, or None"),
    ("alpha", math.inf, "`alpha` must be a positive number, or None"),
    ("alpha", True, "`alpha` must be a positive number, or None"),
    ("dropout", 1.0, "`dropout` must be a number in \\[0, 1\\)"),
    ("dropout", -0.1, "`dropout` must be a number in \\[0, 1\\)"),
    ("dropout", "0.1", "`dropout` must be a number in \\[0, 1\\)"),
    ("init", "foo", "`init` must be one of \\('default', 'gaussian', 'pissa'"),
    ("init", True, "`init` must be one of \\('default', 'gaussian', 'pissa'"),
    ("init", "pissa_niter_<K>", "`init` must be one of"),
    ("init", "pissa_niter_", "`init` must be one of"),
    ("init", "pissa_niter_-1", "`init` must be one of"),
    ("init", "PiSSA", "`init` must be one of"),
]
bad_settings = pytest.mark.parametrize(
    "argument, value, message",
    BAD_SETTINGS,
    ids=[f"{argument}={value!r}" for argument, value, _ in BAD_SETTINGS],
)


def received(message, argument, value):
    return f"{message}.*Received: {re.escape(f'{argument}={value!r}')}"


@bad_settings
def test_bad_settings_are_refused_by_the_wrapper(argument, value, message):
    with pytest.raises(ValueError, match=received(message, argument, value)):
        LoraDense(layers.Dense(4), **{"rank": 2, argument: value})


@bad_settings
def test_bad_settings_are_refused_by_add_adapter(argument, value, message):
    wrapper = LoraDense(layers.Dense(4), rank=2)
    wrapper.build((None, 3))
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match=received(message, argument, value)):
        wrapper.add_adapter("second", **{"rank": 2, argument: value})
    assert_unchanged(wrapper, state)


@bad_settings
def test_bad_settings_are_refused_by_the_adapter(argument, value, message):
    with pytest.raises(ValueError, match=received(message, argument, value)):
        LoraAdapter(**{"rank": 2, argument: value})


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_use_rslora_must_be_a_bool(value):
    with pytest.raises(
        TypeError, match=received("`use_rslora` must be a bool", "use_rslora", value)
    ):
        LoraDense(layers.Dense(4), rank=2, use_rslora=value)


def test_scale_is_alpha_over_rank_or_over_sqrt_rank():
    assert LoraAdapter(rank=4).alpha == 4.0
    assert LoraAdapter(rank=4).scale == 1.0
    assert LoraAdapter(rank=4, alpha=8).scale == 2.0
    assert LoraAdapter(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoraAdapter(rank=np.int64(4)).rank == 4


def test_adapter_config_round_trips():
    adapter = LoraAdapter(
        rank=3, alpha=5.0, dropout=0.2, use_rslora=True, init=False, use_dora=True
    )
    restored = LoraAdapter.from_config(adapter.get_config())
    assert (
        restored.settings()
        == adapter.settings()
        == {
            "rank": 3,
            "alpha": 5.0,
            "dropout": 0.2,
            "use_rslora": True,
            "init": False,
            "use_dora": True,
        }
    )


# -- Initialisation ------------------------------------------------------------

# Big enough factors for the sample statistics below: (wrapper, input_shape,
# fan_in of A).
LOW_RANK_A_KINDS = {
    "dense": (lambda: layers.Dense(16), (None, 512), 512),
    "einsum": (
        lambda: layers.EinsumDense("abcd,cde->abe", output_shape=(None, 16)),
        (None, 3, 16, 32),
        16 * 32,
    ),
    "conv2d_groups": (lambda: layers.Conv2D(16, 3, groups=2), (None, 8, 8, 64), 288),
}
WRAPPERS = {"dense": LoraDense, "einsum": LoraEinsumDense, "conv2d_groups": LoraConv2D}
RANK = 8


def fresh_factors(kind, init):
    make_base, input_shape, _ = LOW_RANK_A_KINDS[kind]
    base = make_base()
    base.build(input_shape)
    wrapper = WRAPPERS[kind](base, rank=RANK, init=init)
    return np.array(wrapper.lora_a.numpy()), np.array(wrapper.lora_b.numpy())


@pytest.mark.parametrize("kind", list(LOW_RANK_A_KINDS))
def test_default_init_is_kaiming_uniform_a_and_zero_b(kind):
    lora_a, lora_b = fresh_factors(kind, "default")
    bound = 1.0 / math.sqrt(LOW_RANK_A_KINDS[kind][2])
    assert np.all(np.abs(lora_a) <= bound)
    # A uniform sample of a few thousand reaches near both ends of the range
    # and has std bound / sqrt(3) (5% covers sampling noise at >= 2,304 values).
    assert lora_a.max() > 0.95 * bound and lora_a.min() < -0.95 * bound
    assert lora_a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    np.testing.assert_array_equal(lora_b, 0.0)


@pytest.mark.parametrize("kind", list(LOW_RANK_A_KINDS))
def test_gaussian_init_is_normal_a_with_std_one_over_rank_and_zero_b(kind):
    lora_a, lora_b = fresh_factors(kind, "gaussian")
    assert lora_a.std() == pytest.approx(1.0 / RANK, rel=0.05)
    assert abs(lora_a.mean()) < 0.1 / RANK
    np.testing.assert_array_equal(lora_b, 0.0)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_embedding_init_is_zero_a_and_standard_normal_b(init):
    base = layers.Embedding(100, 512)
    base.build()
    wrapper = LoraEmbedding(base, rank=RANK, init=init)
    lora_b = wrapper.lora_b.numpy()
    np.testing.assert_array_equal(wrapper.lora_a.numpy(), 0.0)
    # 4,096 standard normal values: std within 5%, mean within 0.05.
    assert lora_b.std() == pytest.approx(1.0, rel=0.05)
    assert abs(lora_b.mean()) < 0.05


@pytest.mark.parametrize(
    "wrapper_class, base, input_shape",
    [
        (LoraDense, layers.Dense(4), (None, 3)),
        (LoraConv2D, layers.Conv2D(4, 3), (None, 5, 5, 2)),
        (LoraEmbedding, layers.Embedding(10, 4), (None, 3)),
    ],
    ids=["dense", "conv2d", "embedding"],
)
def test_init_false_makes_both_factors_random(wrapper_class, base, input_shape):
    base.build(input_shape)
    wrapper = wrapper_class(base, rank=2, init=False)
    assert np.all(wrapper.lora_a.numpy() != 0.0)
    assert np.all(wrapper.lora_b.numpy() != 0.0)
