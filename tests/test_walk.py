"""The layer tree: paths, references, steps, own variables and biases."""

import keras
import numpy as np

import keras_lora
from keras_lora.walk import bias_variable, own_variables, resolve, walk


class Block(keras.layers.Layer):
    """A layer that owns layers (in an attribute and a list) and a weight."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
        self.heads = [keras.layers.Dense(3, name="head_0")]

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), name="gain")

    def call(self, x):
        return self.heads[0](self.attention(x, x) * self.gain)


def block_model():
    inputs = keras.Input((5, 8))
    shared = keras.layers.Dense(8, name="shared")
    x = shared(shared(inputs))
    outputs = Block(name="block")(x)
    return keras.Model(inputs, outputs)


def test_walk_lists_each_layer_once_by_path_with_its_steps():
    model = block_model()
    sites = walk(model)
    paths = list(sites)
    assert paths[:6] == [
        "shared",
        "block",
        "block/attention",
        "block/attention/query",
        "block/attention/key",
        "block/attention/value",
    ]
    # Keras names the attention's softmax and dropout with a process-wide
    # counter (softmax, softmax_1, ...).
    assert paths[6].startswith("block/attention/softmax")
    assert paths[7].startswith("block/attention/dropout")
    assert paths[8:] == ["block/attention/attention_output", "block/head_0"]
    assert sites["block/head_0"].steps[-1] == ["heads", 0]
    for site in sites.values():
        assert resolve(model, site.steps) is site.layer
        assert all(reference.get() is site.layer for reference in site.references)


def test_own_variables_exclude_the_sub_layers_variables():
    model = block_model()
    block = model.get_layer("block")
    assert [v.name for v in own_variables(block)] == ["gain"]
    # gain, a kernel and bias per attention projection (4), the head's two.
    assert len(block.weights) == 1 + 8 + 2
    dense = model.get_layer("shared")
    assert own_variables(dense) == dense.weights


def test_bias_variable_sees_through_a_wrapper_and_is_none_without_bias():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    wrapper = keras_lora.LoraDense(dense, rank=2)
    assert bias_variable(dense) is dense.bias
    assert bias_variable(wrapper) is dense.bias
    np.testing.assert_array_equal(bias_variable(wrapper).numpy(), np.zeros(3))
    no_bias = keras.layers.Dense(3, use_bias=False)
    no_bias.build((None, 4))
    assert bias_variable(no_bias) is None
