"""Which variables of a LoRA model train: adapters, `train` layers, biases."""

from __future__ import annotations

import keras

from keras_lora.layers.base import LoraLayer
from keras_lora.walk import bias_variable, own_variables, walk


def freeze(model: keras.Model, bias: str, train_layers=()) -> None:
    """Makes only adapters (and `train_layers`, and biases per `bias`) trainable.

    Layers with no adapter inside are frozen whole (`trainable = False`, so a
    BatchNormalization runs in inference mode, the Keras convention); layers
    that hold adapters keep `trainable = True` with their own variables frozen.

    Args:
        model: a LoRA model.
        bias: `"none"`, `"all"` (every bias trains) or `"lora_only"` (the
            biases of adapted layers train).
        train_layers: layers to keep fully trainable.
    """
    sites = walk(model)
    lora_paths = [p for p, s in sites.items() if isinstance(s.layer, LoraLayer)]
    for variable in own_variables(model):
        variable.trainable = False
    for path, site in sites.items():
        if isinstance(site.layer, LoraLayer):
            continue
        if any(lora_path.startswith(f"{path}/") for lora_path in lora_paths):
            for variable in own_variables(site.layer):
                variable.trainable = False
        else:
            site.layer.trainable = False
    for layer in train_layers:
        layer.trainable = True
    for site in sites.values():
        if bias == "all" or (bias == "lora_only" and isinstance(site.layer, LoraLayer)):
            _train_bias(site.layer)


def _train_bias(layer) -> None:
    bias = bias_variable(layer)
    if bias is None:
        return
    base = layer.layer if isinstance(layer, LoraLayer) else layer
    base.trainable = True
    for variable in base.weights:
        variable.trainable = variable is bias
