"""What one adapter is on a model, in config terms: the `LoraConfig` that
describes its layers, and the weights besides its factors that the config
trains (the layers in `train`, the biases `bias` chose).

`keras_lora.checkpoint` saves and loads these; they are rebuilt from the layers
when the config an adapter was created with is not known (a model loaded from
a `.keras` file).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

import keras

from keras_lora.config import LoraConfig
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import deferred_initialization
from keras_lora.targets import REGEX_PREFIX, select
from keras_lora.walk import Site, bias_variable, own_variables


def exact(path: str) -> str:
    """A target that selects the layer at `path` and no other.

    Args:
        path: a layer path.

    Returns:
        A `"re:"` target matching exactly `path`.
    """
    return REGEX_PREFIX + re.escape(path)


def config_for_layers(
    settings: Mapping[str, Mapping],
    adapter_name: str,
    bias: str = "none",
    train: list[str] | tuple[str, ...] = (),
) -> LoraConfig:
    """A config whose conversion gives each layer path its adapter settings.

    `targets` are the exact paths; `rank` and `alpha` are the most common
    values (`alpha=None` when every alpha equals its rank), and if any layer
    differs, `rank_pattern` / `alpha_pattern` name every layer, deepest paths
    first, so that each path's own key is the first to match it. `dropout`,
    `use_rslora`, `init` and `use_dora` are the most common values (a shared
    dropout or none): a layer that differs needs its adapter replaced after
    conversion.

    Args:
        settings: per path, an adapter's `settings()`.
        adapter_name: the adapter's name.
        bias: the config's `bias`.
        train: the config's `train`.

    Returns:
        A `LoraConfig`.
    """
    values = list(settings.values())
    rank = _most_common(values, "rank")
    ranks = {path: layer["rank"] for path, layer in settings.items()}
    alphas = {path: layer["alpha"] for path, layer in settings.items()}
    alpha = None if alphas == ranks else _most_common(values, "alpha")
    dropouts = {layer["dropout"] for layer in values}
    return LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropouts.pop() if len(dropouts) == 1 else 0.0,
        targets=[exact(path) for path in settings],
        use_rslora=_most_common(values, "use_rslora"),
        init=_most_common(values, "init"),
        use_dora=_most_common(values, "use_dora"),
        bias=bias,
        train=tuple(train),
        rank_pattern=_pattern(ranks, rank),
        alpha_pattern={} if alpha is None else _pattern(alphas, alpha),
        adapter_name=adapter_name,
    )


def describes(config: LoraConfig, settings: Mapping[str, Mapping]) -> bool:
    """Whether converting with `config` gives each path its settings.

    Args:
        config: a config.
        settings: per path, an adapter's `settings()`.

    Returns:
        True if every layer's rank, alpha, dropout, rsLoRA, init and DoRA are
        the config's.
    """
    for path, layer in settings.items():
        shared = (config.dropout, config.use_rslora, config.init, config.use_dora)
        if config.resolved(path) != (layer["rank"], layer["alpha"]) or shared != (
            layer["dropout"],
            layer["use_rslora"],
            layer["init"],
            layer["use_dora"],
        ):
            return False
    return True


def trained_weights(
    sites: Mapping[str, Site], config: LoraConfig
) -> tuple[list[str], dict[str, keras.Variable]]:
    """The layers `config.train` names, and the variables the config trains
    besides adapter factors, keyed `"{path}/{variable name}"`.

    Args:
        sites: the model's `walk()`.
        config: the adapter's config.

    Returns:
        `(train_paths, weights)`.

    Raises:
        ValueError: if a `train` entry matches no layer, or two variables get
            the same key.
    """
    train_paths = []
    if config.train:
        candidates = {path: site.layer for path, site in sites.items()}
        train_paths = select(
            candidates, config.train, require_wrapper=False, argument="train"
        )
    weights = {}
    for path, site in sites.items():
        inside = any(path == top or path.startswith(f"{top}/") for top in train_paths)
        lora = isinstance(site.layer, LoraLayer)
        if inside and not lora:
            for variable in own_variables(site.layer):
                _add(weights, f"{path}/{variable.name}", variable)
        if config.bias == "all" or (config.bias == "lora_only" and lora):
            bias = bias_variable(site.layer)
            if bias is not None:
                _add(weights, f"{path}/{bias.name}", bias)
    return train_paths, weights


def inferred_training(
    model: keras.Model, sites: Mapping[str, Site]
) -> tuple[str, list[str]]:
    """The `bias` and `train` a config would need to train what trains now.

    A layer with no adapter inside that trains a variable of its own other
    than its bias is a `train` layer (its exact path); a training bias
    elsewhere means `bias="all"`, or `"lora_only"` if only adapted layers'
    biases train.

    Args:
        model: a LoRA model.
        sites: its `walk()`.

    Returns:
        `(bias, train)`.
    """
    training = {id(variable) for variable in model.trainable_variables}
    lora_paths = [p for p, s in sites.items() if isinstance(s.layer, LoraLayer)]
    train, plain_bias, lora_bias = [], False, False
    for path, site in sites.items():
        layer = site.layer
        if isinstance(layer, LoraLayer):
            bias = bias_variable(layer)
            lora_bias |= bias is not None and id(bias) in training
            continue
        holds_adapter = any(p.startswith(f"{path}/") for p in lora_paths)
        inside_train = any(path.startswith(f"{top}/") for top in train)
        if holds_adapter or inside_train:
            continue
        bias = bias_variable(layer)
        trains = [v for v in own_variables(layer) if id(v) in training]
        if any(variable is not bias for variable in trains):
            train.append(path)
        elif trains:
            plain_bias = True
    bias_mode = "all" if plain_bias else ("lora_only" if lora_bias else "none")
    return bias_mode, [exact(path) for path in train]


def _add(weights, key, variable) -> None:
    if key in weights and weights[key] is not variable:
        raise ValueError(
            f"Two variables of the model have the checkpoint key {key!r}; rename "
            "one of them to save this adapter."
        )
    weights[key] = variable


def _most_common(values, key):
    return Counter(value[key] for value in values).most_common(1)[0][0]


def _pattern(values: dict, default) -> dict:
    if all(value == default for value in values.values()):
        return {}
    deepest_first = sorted(values, key=lambda path: -path.count("/"))
    return {re.escape(path): values[path] for path in deepest_first}


def adapter_snapshot(layer: LoraLayer, adapter_name: str) -> tuple:
    """What `restore_adapter` needs to recreate an adapter of `layer`.

    Args:
        layer: a LoRA layer.
        adapter_name: one of its adapters.

    Returns:
        `(settings, values, active adapter names)`, `values` holding the
        arrays of the adapter's `parameters` by name.
    """
    adapter = layer.adapters[adapter_name]
    values = {
        name: keras.ops.convert_to_numpy(variable)
        for name, variable in adapter.parameters.items()
    }
    return adapter.settings(), values, list(layer.active_adapters)


def replace_adapter(
    layer: LoraLayer, adapter_name: str, settings: Mapping, values=None, active=None
) -> None:
    """Replaces an adapter of `layer` by a new one of the same name with
    `settings` (and parameter `values`), keeping which adapters are active.

    Args:
        layer: an unmerged LoRA layer.
        adapter_name: one of its adapters.
        settings: keyword arguments of `LoraLayer.add_adapter`.
        values: arrays by `parameters` name, or `None` for fresh ones.
        active: the adapters to activate after; `None` means those active now.
    """
    active = list(layer.active_adapters) if active is None else active
    placeholder = None
    if layer.adapter_names == (adapter_name,):
        # A layer cannot lose its last adapter, even for a moment.
        placeholder = f"{adapter_name}_replaced"
        with deferred_initialization():
            layer.add_adapter(placeholder, **layer.adapters[adapter_name].settings())
    layer.delete_adapter(adapter_name)
    restore_adapter(layer, adapter_name, settings, values, active)
    if placeholder is not None:
        layer.delete_adapter(placeholder)


def restore_adapter(
    layer: LoraLayer, adapter_name: str, settings: Mapping, values, active
) -> None:
    """Adds an adapter with `settings` and parameter `values` to `layer`, then
    activates `active` (the inverse of `delete_adapter`, given a snapshot).

    Args:
        layer: an unmerged LoRA layer without that adapter.
        adapter_name: the adapter's name.
        settings: keyword arguments of `LoraLayer.add_adapter`.
        values: arrays by `parameters` name, or `None` for fresh ones.
        active: the adapter names to activate.
    """
    # The values (or the file loaded next) are the factors; a computed init
    # must not run again on a kernel it already rewrote.
    with deferred_initialization():
        layer.add_adapter(adapter_name, **settings)
    if values is not None:
        parameters = layer.adapters[adapter_name].parameters
        for name, value in values.items():
            parameters[name].assign(value)
    layer.set_adapter(active)
