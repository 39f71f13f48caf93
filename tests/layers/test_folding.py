"""In an inference call (`training` false or `None`), a wrapper adds its
adapters to the kernel for the call when that is cheaper than the factorised path
(`LoraLayer._folding_is_cheaper`). Both paths must compute the same function;
only the cost differs."""

import keras
import numpy as np
import pytest
from testing.cases import CASES, case_id
from testing.layer_checks import randomize_adapter

from keras_lora.layers import LoraDense, wrapper_for

layers = keras.layers

# Enough rows that every case's output outgrows its kernel.
ROWS = 64


def tiled_inputs(case):
    inputs = case.inputs()
    return np.concatenate([inputs] * (ROWS // len(inputs)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_folded_inference_equals_the_factorised_path(case):
    keras.utils.set_random_seed(0)
    layer = case.wrap()
    randomize_adapter(layer)
    layer.add_adapter("second", rank=2, alpha=3.0)
    randomize_adapter(layer, "second", seed=1)
    layer.set_adapter(["default", "second"])
    inputs = tiled_inputs(case)
    assert layer._folding_is_cheaper(keras.ops.convert_to_tensor(inputs))

    folded = keras.ops.convert_to_numpy(layer(inputs, training=False))
    # No dropout is configured, so training=True only selects the factorised path.
    factorised = keras.ops.convert_to_numpy(layer(inputs, training=True))

    np.testing.assert_allclose(folded, factorised, atol=1e-5)
    assert not np.allclose(folded, layer.layer(inputs), atol=1e-3)


@pytest.mark.parametrize(
    ("layer", "input_shape", "folds"),
    [
        (layers.Dense(64), (4, 32), False),
        (layers.Dense(64), (64, 32), True),
        (layers.Dense(64), (None, 32), False),
        (layers.Embedding(1000, 8), (8, 16), False),
        (layers.Embedding(1000, 8), (40, 25), True),
        (layers.Conv2D(16, 3), (1, 4, 4, 8), False),
        (layers.Conv2D(16, 3), (2, 16, 16, 8), True),
    ],
    ids=lambda value: str(value) if isinstance(value, (tuple, bool)) else "",
)
def test_folding_is_chosen_when_the_output_is_at_least_the_kernel(
    layer, input_shape, folds
):
    layer.build((None, *input_shape[1:]))
    wrapper = wrapper_for(layer)(layer, rank=4)
    symbolic = keras.KerasTensor(input_shape)
    assert wrapper._folding_is_cheaper(symbolic) is folds


def test_a_quantized_base_is_never_folded():
    base = layers.Dense(8)
    base.build((None, 4))
    base.quantize("int8")
    wrapper = LoraDense(base, rank=2)
    assert not wrapper._folding_is_cheaper(keras.KerasTensor((256, 4)))


@pytest.mark.parametrize("training", [False, None, True])
def test_only_training_calls_keep_the_factorised_path(training, monkeypatch):
    layer = LoraDense(layers.Dense(4), rank=2)
    inputs = np.ones((64, 3), "float32")
    layer(inputs)
    folds = []
    kernel_plus = layer._kernel_plus
    monkeypatch.setattr(
        layer, "_kernel_plus", lambda names: folds.append(names) or kernel_plus(names)
    )
    layer(inputs, training=training)
    assert folds == ([] if training else [["default"]])
