"""Trainable-parameter counts and the printed report."""

from __future__ import annotations

import math

import keras

from keras_lora.adapters import lora_layers
from keras_lora.tree.walk import walk


def trainable_parameters(model: keras.Model) -> tuple[int, int]:
    """Counts the trainable and all parameters of `model`.

    Args:
        model: any Keras model.

    Returns:
        `(trainable, total)`, each variable counted once.

    Example:

    >>> trainable, total = keras_lora.trainable_parameters(lora_model)
    """
    trainable = sum(_size(v) for v in _unique(model.trainable_weights))
    total = sum(_size(v) for v in _unique(model.weights))
    return trainable, total


def print_trainable_parameters(model: keras.Model, per_layer: bool = False) -> None:
    """Prints peft's one-line report, and optionally a table per LoRA layer.

    `trainable params: 1,536 || all params: 101,386 || trainable%: 1.5150`

    Args:
        model: any Keras model.
        per_layer: also print each LoRA layer's path, active adapters, rank,
            scale and adapter parameters, then each layer that trains other
            variables (`train` layers, biases), so that the rows add up to the
            trainable total.

    Example:

    >>> keras_lora.print_trainable_parameters(lora_model, per_layer=True)
    """
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {percent:.4f}"
    )
    if not per_layer:
        return
    rows = [("path", "type", "adapters", "rank", "scale", "params")]
    for path, layer in lora_layers(model).items():
        adapters = [layer.adapters[name] for name in layer.active_adapters]
        rows.append(
            (
                path,
                type(layer).__name__,
                ",".join(layer.active_adapters),
                ",".join(str(a.rank) for a in adapters),
                ",".join(f"{a.scale:g}" for a in adapters),
                f"{sum(_size(v) for a in adapters for v in a.parameters.values()):,d}",
            )
        )
    for path, (layer, size) in _trained_in_full(model).items():
        rows.append((path, type(layer).__name__, "(trained)", "", "", f"{size:,d}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            )
        )


def _trained_in_full(model) -> dict[str, tuple[keras.layers.Layer, int]]:
    """Path to `(layer, trainable parameters)` for the trainable variables
    outside adapters, each counted at the deepest layer holding it."""
    adapters = {
        id(variable)
        for layer in lora_layers(model).values()
        for adapter in layer.adapters.values()
        for variable in adapter.weights
    }
    owners = {}
    for path, site in walk(model).items():
        for variable in site.layer.weights:
            owners[id(variable)] = (path, site.layer)
    found = {}
    for variable in _unique(model.trainable_weights):
        if id(variable) in adapters:
            continue
        path, layer = owners.get(id(variable), ("(model)", model))
        found[path] = (layer, found.get(path, (layer, 0))[1] + _size(variable))
    return found


def _unique(variables):
    seen = {}
    for variable in variables:
        seen.setdefault(id(variable), variable)
    return seen.values()


def _size(variable) -> int:
    return math.prod(variable.shape)
