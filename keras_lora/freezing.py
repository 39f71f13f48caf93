"""Which variables of a LoRA model train: adapters, `train` layers, biases.

`freeze` applies a conversion's `bias` and `train`, `trained_weights` lists
what they train besides the adapters (what an adapter file holds), and
`inferred_training` reads them back from a model. `snapshot_flags` and
`trainable_change` keep a change of what trains all or nothing, and what Keras
compiled for the model in step with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import keras

from keras_lora.compiled_state import (
    active_state,
    refresh_optimizer,
    reset_traced_functions,
    switch_predict_function,
    trainable_ids,
)
from keras_lora.layers.base import LoraLayer
from keras_lora.targets import select
from keras_lora.tree.walk import Site, bias_variable, own_variables, walk


def freeze(
    model: keras.Model,
    sites: Mapping[str, Site],
    bias: str,
    train_layers: Sequence[keras.layers.Layer] = (),
) -> None:
    """Makes only adapters (and `train_layers`, and biases per `bias`) trainable.

    Layers with no adapter inside are frozen whole (`trainable = False`, so a
    BatchNormalization runs in inference mode, the Keras convention); layers
    that hold adapters keep `trainable = True` with their own variables frozen.

    Args:
        model: a LoRA model.
        sites: its `walk()`.
        bias: `"none"`, `"all"` (every bias trains) or `"lora_only"` (the
            biases of adapted layers train).
        train_layers: layers to keep fully trainable.
    """
    lora_paths = _lora_paths(sites)
    for variable in own_variables(model):
        variable.trainable = False
    for path, site in sites.items():
        if isinstance(site.layer, LoraLayer):
            continue
        if _holds_any(path, lora_paths):
            for variable in own_variables(site.layer):
                variable.trainable = False
        else:
            site.layer.trainable = False
    for layer in train_layers:
        layer.trainable = True
    for site in sites.values():
        if _trains_bias(bias, site.layer):
            _train_bias(site.layer)


def train_paths(sites: Mapping[str, Site], train: Sequence[str]) -> list[str]:
    """The paths of the layers a config's `train` entries select.

    Args:
        sites: the model's `walk()`.
        train: `LoraConfig.train`.

    Returns:
        Layer paths, in walk order.

    Raises:
        ValueError: if an entry matches no layer.
    """
    if not train:
        return []
    candidates = {path: site.layer for path, site in sites.items()}
    return select(candidates, train, require_wrapper=False, argument="train")


def trained_weights(
    sites: Mapping[str, Site], config
) -> tuple[list[str], dict[str, keras.Variable]]:
    """The layers `config.train` names, and the variables the config trains
    besides adapter factors, keyed `"{path}/{variable name}"`.

    Args:
        sites: the model's `walk()`.
        config: the adapter's `LoraConfig`.

    Returns:
        `(train_paths, weights)`.

    Raises:
        ValueError: if a `train` entry matches no layer, or two variables get
            the same key.
    """
    paths = train_paths(sites, config.train)
    weights = {}
    for path, site in sites.items():
        lora = isinstance(site.layer, LoraLayer)
        if not lora and any(_within(path, top) for top in paths):
            for variable in own_variables(site.layer):
                _add(weights, f"{path}/{variable.name}", variable)
        bias = bias_variable(site.layer)
        if bias is not None and _trains_bias(config.bias, site.layer):
            _add(weights, f"{path}/{bias.name}", bias)
    return paths, weights


def inferred_training(
    model: keras.Model, sites: Mapping[str, Site]
) -> tuple[str, list[str]]:
    """The `bias` and the `train` paths a config would need to train what
    trains now.

    A layer with no adapter inside that trains a variable of its own other
    than its bias is a `train` layer; a training bias elsewhere means
    `bias="all"`, or `"lora_only"` if only adapted layers' biases train.

    Args:
        model: a LoRA model.
        sites: its `walk()`.

    Returns:
        `(bias, train_paths)`.
    """
    training = {id(variable) for variable in model.trainable_variables}
    lora_paths = _lora_paths(sites)
    train, plain_bias, lora_bias = [], False, False
    for path, site in sites.items():
        layer = site.layer
        bias = bias_variable(layer)
        if isinstance(layer, LoraLayer):
            lora_bias |= bias is not None and id(bias) in training
            continue
        inside_train = any(_within(path, top) for top in train)
        if _holds_any(path, lora_paths) or inside_train:
            continue
        trains = [v for v in own_variables(layer) if id(v) in training]
        if any(variable is not bias for variable in trains):
            train.append(path)
        elif trains:
            plain_bias = True
    bias_mode = "all" if plain_bias else ("lora_only" if lora_bias else "none")
    return bias_mode, train


def snapshot_flags(
    layer: keras.layers.Layer, sites: Mapping[str, Site] | None = None
) -> Callable[[], None]:
    """Records the trainable flags of `layer`, its sub-layers and variables.

    Args:
        layer: a layer or model.
        sites: its `walk()`, if known.

    Returns:
        A function that puts the flags back.
    """
    sites = walk(layer) if sites is None else sites
    layers = [layer, *(site.layer for site in sites.values())]
    layer_flags = [(item, item.trainable) for item in layers]
    variable_flags = [(variable, variable.trainable) for variable in layer.weights]

    def restore():
        for item, trainable in layer_flags:
            item.trainable = trainable
        for variable, trainable in variable_flags:
            variable.trainable = trainable

    return restore


@dataclasses.dataclass
class TrainableChange:
    """The model a `trainable_change` block changes."""

    model: keras.Model


@contextlib.contextmanager
def trainable_change(
    model: keras.Model, switched: Mapping[str, LoraLayer] | None = None
) -> Iterator[TrainableChange]:
    """Keeps what Keras compiled for `model` in step with the block's change.

    When the block succeeds, the functions Keras traced are dropped and a
    built optimizer is rebuilt if the trainable variables are no longer those
    before the block (see `keras_lora.compiled_state`). When it raises,
    nothing is dropped: a failed change leaves the model as it was.

    Args:
        model: the model the block changes.
        switched: for a switch of active adapters only, the model's LoRA
            layers by path: the predict function traced for the adapters
            active before is kept for a switch back.

    Yields:
        A `TrainableChange`; set its `model` to the model the change returns
        when that is a new one (a converted Functional model).
    """
    before = trainable_ids(model)
    state = None if switched is None else active_state(model, switched)
    change = TrainableChange(model)
    yield change
    if switched is None:
        reset_traced_functions(change.model)
    else:
        after = active_state(change.model, switched)
        switch_predict_function(change.model, state, after)
    refresh_optimizer(change.model, before)


def _lora_paths(sites) -> list[str]:
    return [path for path, site in sites.items() if isinstance(site.layer, LoraLayer)]


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(f"{top}/")


def _holds_any(path: str, inner_paths) -> bool:
    """Whether a layer strictly below `path` is at one of `inner_paths`."""
    return any(inner.startswith(f"{path}/") for inner in inner_paths)


def _trains_bias(bias: str, layer) -> bool:
    return bias == "all" or (bias == "lora_only" and isinstance(layer, LoraLayer))


def _train_bias(layer) -> None:
    bias = bias_variable(layer)
    if bias is None:
        return
    base = layer.layer if isinstance(layer, LoraLayer) else layer
    base.trainable = True
    for variable in base.weights:
        variable.trainable = variable is bias


def _add(weights, key, variable) -> None:
    if key in weights and weights[key] is not variable:
        raise ValueError(
            f"Two variables of the model have the checkpoint key {key!r}; rename "
            "one of them to save this adapter."
        )
    weights[key] = variable
