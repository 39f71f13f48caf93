"""The layer tree: paths, references, steps, own variables and biases."""

import keras
import numpy as np

import keras_lora
from keras_lora.tree.walk import (
    bias_variable,
    children,
    output_layers,
    output_paths,
    own_variables,
    resolve,
    walk,
)


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


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class SelfNamedBlock(keras.layers.Layer):
    """Keeps its sub-layers where keras-hub's transformer blocks do, in
    attributes whose names start like TensorFlow's `_self_` bookkeeping."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._self_attention_layer = keras.layers.MultiHeadAttention(
            2, 4, name="self_attention"
        )
        self._self_attention_layer_norm = keras.layers.LayerNormalization(
            name="self_attention_layer_norm"
        )
        self._feedforward = {"dense": keras.layers.Dense(8, name="feedforward")}

    def build(self, input_shape):
        self._self_attention_layer.build(input_shape, input_shape)
        self._self_attention_layer_norm.build(input_shape)
        self._feedforward["dense"].build(input_shape)

    def call(self, x):
        x = self._self_attention_layer_norm(x + self._self_attention_layer(x, x))
        return self._feedforward["dense"](x)


def keras_tracked_layers(model):
    """Every layer Keras itself tracks under `model`: the ground truth the
    walk must reach. `_flatten_layers` is private Keras API, used here only to
    check the walk against it."""
    return model._flatten_layers(include_self=False, recursive=True)


def self_named_model():
    inputs = keras.Input((3, 8))
    outputs = SelfNamedBlock(name="block")(inputs)
    return keras.Model(inputs, outputs)


def test_walk_reaches_every_layer_keras_tracks_whatever_the_attribute_name():
    model = self_named_model()
    sites = walk(model)
    assert {id(site.layer) for site in sites.values()} == {
        id(layer)
        for layer in keras_tracked_layers(model)
        if not isinstance(layer, keras.layers.InputLayer)
    }
    assert sites["block/self_attention"].steps[-1] == ["_self_attention_layer", None]
    assert "block/self_attention/query" in sites
    assert "block/self_attention_layer_norm" in sites
    assert sites["block/feedforward"].steps[-1] == ["_feedforward", "dense"]


def test_tensorflow_bookkeeping_attributes_are_not_references():
    block = self_named_model().get_layer("block")
    attributes = {ref.attribute for _, ref in children(block)}
    assert attributes == {
        "_self_attention_layer",
        "_self_attention_layer_norm",
        "_feedforward",
    }


def test_a_converted_self_named_block_adapts_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = self_named_model()
    inputs = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    lora_model = keras_lora.convert(model, rank=2, targets=["query", "value"])
    block = lora_model.get_layer("block")
    attention = block._self_attention_layer
    assert isinstance(attention.query_dense, keras_lora.LoraEinsumDense)
    assert isinstance(attention.value_dense, keras_lora.LoraEinsumDense)
    trainable = sorted(v.path for v in lora_model.trainable_weights)
    assert len(trainable) == 4
    path = tmp_path / "model.keras"
    lora_model.save(path)
    loaded = keras.models.load_model(path)
    assert sorted(v.path for v in loaded.trainable_weights) == trainable
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), lora_model.predict(inputs, verbose=0)
    )


def classifier_with_nested_trunk():
    trunk = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="hidden")], name="trunk"
    )
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4, name="head")(trunk(inputs))
    x = keras.layers.Dropout(0.1)(x)
    logits = keras.layers.Activation("softmax", name="probabilities")(x)
    aux = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(2, name="aux_head")], name="aux"
    )(trunk(inputs))
    return keras.Model(inputs, [logits, aux])


def test_output_layers_look_through_weightless_layers_and_nested_graphs():
    model = classifier_with_nested_trunk()
    assert [layer.name for layer in output_layers(model)] == ["aux_head", "head"]
    sites = walk(model)
    assert output_paths(model, sites) == ["aux/aux_head", "head"]


def test_a_model_without_a_graph_has_no_traceable_output_layers():
    model = keras.Model()
    model.dense = keras.layers.Dense(2)
    assert output_layers(model) == []
