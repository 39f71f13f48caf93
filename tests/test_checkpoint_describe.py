"""Configs rebuilt from an adapter's layers select each layer with its own
rank and alpha."""

import keras
import pytest

import keras_lora
from keras_lora.checkpoint.describe import config_for_layers, describes
from keras_lora.freezing import trained_weights
from keras_lora.tree.walk import walk

SETTINGS = {
    "rank": 4,
    "alpha": 4.0,
    "dropout": 0.0,
    "use_rslora": False,
    "init": "default",
    "use_dora": False,
}


def test_a_uniform_adapter_needs_no_patterns():
    config = config_for_layers({"a": SETTINGS, "b/a": SETTINGS}, "task")
    assert (config.rank, config.alpha, config.adapter_name) == (4, None, "task")
    assert config.targets == ("re:a", "re:b/a")
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_patterns_resolve_each_path_to_its_own_values():
    settings = {
        "dense": {**SETTINGS, "rank": 2, "alpha": 8.0},
        "block/dense": SETTINGS,
        "block/x.y": SETTINGS,
        "other": {**SETTINGS, "alpha": 3.0},
    }
    config = config_for_layers(settings, "default", bias="all", train=["re:head"])
    for path, layer in settings.items():
        assert config.resolved(path) == (layer["rank"], layer["alpha"])
    assert describes(config, settings)
    assert (config.bias, config.train) == ("all", ("re:head",))
    assert keras_lora.LoraConfig.from_dict(config.to_dict()) == config


def test_describes_checks_every_setting():
    config = keras_lora.LoraConfig(rank=4)
    assert describes(config, {"a": SETTINGS})
    assert not describes(config, {"a": {**SETTINGS, "dropout": 0.1}})
    assert not describes(config, {"a": {**SETTINGS, "rank": 2}})
    assert not describes(config, {"a": {**SETTINGS, "use_dora": True}})


class TwoNamesakes(keras.layers.Layer):
    def build(self, input_shape):
        self.first = self.add_weight(name="w", shape=(2,))
        self.second = self.add_weight(name="w", shape=(2,))

    def call(self, inputs):
        return inputs * self.first * self.second


def test_two_variables_with_one_key_are_refused():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, TwoNamesakes(name="twins")(inputs))
    config = keras_lora.LoraConfig(train=["twins"])
    with pytest.raises(ValueError, match="have the checkpoint key 'twins/w'"):
        trained_weights(walk(model), config)
