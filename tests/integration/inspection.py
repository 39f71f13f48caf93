"""What a LoRA model holds: its adapter and base variables, and a snapshot of
its whole state to show an operation changed nothing."""

import numpy as np

import keras_lora
from integration.models import every_layer
from keras_lora.layers import LoraLayer
from keras_lora.tree.rebuild import LoraRoot
from keras_lora.tree.walk import walk


def adapter_variables(model, active_only=False) -> dict[int, object]:
    """`id -> variable` for every `lora_a`/`lora_b` of the model's LoRA layers."""
    found = {}
    for layer in keras_lora.lora_layers(model).values():
        names = layer.active_adapters if active_only else layer.adapter_names
        for name in names:
            adapter = layer.adapters[name]
            found[id(adapter.lora_a)] = adapter.lora_a
            found[id(adapter.lora_b)] = adapter.lora_b
    return found


def base_variables(model) -> list:
    """The model's variables that are not adapter factors."""
    adapters = adapter_variables(model)
    return [v for v in model.weights if id(v) not in adapters]


def trainable_by_layer(model) -> list[tuple[str, str]]:
    """`(layer path, variable path under its base layer)` of every trainable
    variable, sorted. Unlike Keras' variable paths, this survives a `.keras`
    reload: a reloaded Sequential or subclassed model builds its layers
    outside the model's name scope, so their variable paths lose its name."""
    owners = {}
    for path, site in walk(model).items():
        layer = site.layer
        base = layer.layer if isinstance(layer, LoraLayer) else layer
        # Parents come first: the innermost layer holding a variable wins.
        for variable in layer.trainable_weights:
            owners[id(variable)] = (path, variable.path.removeprefix(f"{base.path}/"))
    return sorted(owners[id(variable)] for variable in model.trainable_weights)


def values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


def assert_bit_identical(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert np.array_equal(old, new)


def snapshot(model) -> dict:
    """Every layer (id and class), every trainable flag of layers and
    variables, and every weight value under `model`."""
    layers = every_layer(model)
    variables = {}
    for layer in layers:
        for variable in layer.weights:
            variables.setdefault(id(variable), variable)
    return {
        "layers": [(id(layer), type(layer)) for layer in layers],
        "layer_trainable": [(id(layer), layer.trainable) for layer in layers],
        "variable_trainable": {key: v.trainable for key, v in variables.items()},
        "values": {key: np.array(v.numpy(), copy=True) for key, v in variables.items()},
        "model_weights": [id(v) for v in model.weights],
    }


def assert_same_snapshot(before, after):
    assert sorted(before["layers"], key=str) == sorted(after["layers"], key=str)
    assert before["layer_trainable"] == after["layer_trainable"]
    assert before["variable_trainable"] == after["variable_trainable"]
    assert before["model_weights"] == after["model_weights"]
    assert before["values"].keys() == after["values"].keys()
    for key, value in before["values"].items():
        assert np.array_equal(value, after["values"][key])


def assert_no_keras_lora_class(model):
    for layer in every_layer(model):
        cls = type(layer)
        assert not cls.__module__.startswith("keras_lora"), (layer.name, cls)
        assert LoraRoot not in cls.__mro__, (layer.name, cls)
