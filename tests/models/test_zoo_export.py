"""SavedModel export of zoo models: a keras-hub LM backbone, a vision
transformer and a CNN (keras-hub ResNet), exported merged (by
`keras_lora.export` and by `model.export` after `merge_and_unload`), reloaded
with `tf.saved_model.load` and served with the LoRA model's outputs."""

import keras
import numpy as np
import pytest
from backends import saved_model_export
from integration.models import assert_outputs_close, assert_outputs_differ, outputs

import keras_lora
from models.zoo import ZOO

pytestmark = saved_model_export

EXPORTED = ["gpt2", "vit", "resnet"]
RANK = 4


def served(directory, inputs) -> list[np.ndarray]:
    """The outputs of the SavedModel's `serve` endpoint, reloaded by
    TensorFlow alone, on `inputs` (the model's inputs in their structure:
    a dict of named inputs or one array)."""
    import tensorflow as tf

    reloaded = tf.saved_model.load(str(directory))
    result = reloaded.serve(keras.tree.map_structure(tf.constant, inputs))
    return [np.asarray(output) for output in keras.tree.flatten(result)]


def signature(inputs) -> list:
    """The serving signature: `inputs`' structure, names and dtypes, with a
    free batch axis and every other axis fixed. A free sequence axis fails
    JAX's export (jax2tf cannot decide keras-hub's PositionEmbedding's
    comparison of the symbolic length with its maximum), upstream."""

    def spec(array, name=None):
        shape = (None, *array.shape[1:])
        return keras.InputSpec(shape=shape, dtype=str(array.dtype), name=name)

    if isinstance(inputs, dict):
        return [{key: spec(array, key) for key, array in inputs.items()}]
    return [spec(inputs)]


def lora(name):
    """`(lora_model, inputs, base_outputs)`: a zoo model with random
    (non-zero) adapters on every layer that can take one."""
    model, inputs, _ = ZOO[name]()
    base = outputs(model, inputs)
    lora_model = keras_lora.convert(model, rank=RANK, targets=None, init=False)
    return lora_model, inputs, base


@pytest.mark.parametrize("name", EXPORTED)
def test_keras_lora_export_serves_the_lora_outputs(name, tmp_path):
    lora_model, inputs, base = lora(name)
    expected = outputs(lora_model, inputs)
    assert_outputs_differ(expected, base)

    keras_lora.export(
        lora_model,
        tmp_path / "served",
        input_signature=signature(inputs),
        verbose=False,
    )

    # Merged kernels sum in another order than the factorised path: 1e-5.
    assert_outputs_close(served(tmp_path / "served", inputs), expected, atol=1e-5)
    # The LoRA model is put back as it was: unmerged, its outputs up to the
    # rounding of subtracting the merged update from the kernels again.
    layers = keras_lora.lora_layers(lora_model).values()
    assert not any(layer.merged for layer in layers)
    assert_outputs_close(outputs(lora_model, inputs), expected, atol=1e-6)


@pytest.mark.parametrize("name", EXPORTED)
def test_merged_plain_model_exports_with_the_lora_outputs(name, tmp_path):
    lora_model, inputs, base = lora(name)
    expected = outputs(lora_model, inputs)
    assert_outputs_differ(expected, base)

    plain = keras_lora.merge_and_unload(lora_model)
    plain.export(
        tmp_path / "served",
        format="tf_saved_model",
        input_signature=signature(inputs),
        verbose=False,
    )

    assert_outputs_close(served(tmp_path / "served", inputs), expected, atol=1e-5)
