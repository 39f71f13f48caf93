"""The `LoraConfig` that describes an adapter of a model: the config it was
created with while that still describes its layers, or one inferred from the
layers (a model loaded from a `.keras` file, an adapter changed layer by layer).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import keras

from keras_lora.adapters import check_model, recorded_config
from keras_lora.config import LoraConfig
from keras_lora.freezing import inferred_training
from keras_lora.layers.base import LoraLayer
from keras_lora.targets import REGEX_PREFIX
from keras_lora.tree.walk import Site, walk


def adapter_config(model: keras.Model, adapter_name: str = "default") -> LoraConfig:
    """Returns the `LoraConfig` that describes an adapter of a LoRA model.

    That is the config `convert` or `add_adapter` created it with, while it
    still matches the layers. Otherwise (a model loaded from a `.keras` file,
    or an adapter changed layer by layer) it is rebuilt from the layers:
    `targets` lists their exact paths, `rank_pattern` and `alpha_pattern` hold
    per-layer deviations, and `bias` and `train` are read from which
    variables are trainable (best effort: a `.keras` file keeps which layers
    train, not which of their variables do, so `bias` is then at least
    `"lora_only"`, and `save_adapter` keeps the adapted layers' biases).

    Args:
        model: a LoRA model.
        adapter_name: the adapter.

    Returns:
        A `LoraConfig`.

    Raises:
        ValueError: if no layer of the model has the adapter.

    Example:

    >>> keras_lora.adapter_config(lora_model).rank
    8
    """
    check_model(model)
    sites = walk(model)
    return config_of(model, sites, holders(model, sites, adapter_name), adapter_name)


def config_of(
    model: keras.Model,
    sites: Mapping[str, Site],
    layers: Mapping[str, LoraLayer],
    adapter_name: str,
) -> LoraConfig:
    """`adapter_config` of a walked model (`sites`), given the LoRA layers
    holding the adapter (`holders`)."""
    settings = {
        path: layer.adapters[adapter_name].settings() for path, layer in layers.items()
    }
    recorded = recorded_config(model, adapter_name)
    if recorded is not None and describes(recorded, settings):
        return recorded
    bias, train = inferred_training(model, sites)
    # A `.keras` file keeps which layers train, not which of their variables
    # do, so whether adapted layers' biases trained is unknown: keep them.
    bias = "lora_only" if bias == "none" else bias
    return config_for_layers(
        settings, adapter_name, bias=bias, train=[exact(path) for path in train]
    )


def holders(
    model: keras.Model,
    sites: Mapping[str, Site],
    adapter_name: str,
    argument: str = "adapter_name",
) -> dict[str, LoraLayer]:
    """The LoRA layers of `model` that hold the adapter, by path.

    Args:
        model: a Keras model.
        sites: its `walk()`.
        adapter_name: the adapter.
        argument: the caller's name for the adapter argument, for the message.

    Returns:
        A dict of path to `LoraLayer`, never empty.

    Raises:
        ValueError: if no LoRA layer holds the adapter.
    """
    layers = {p: s.layer for p, s in sites.items() if isinstance(s.layer, LoraLayer)}
    found = {
        path: layer for path, layer in layers.items() if adapter_name in layer.adapters
    }
    if not found:
        known = sorted(
            {name for layer in layers.values() for name in layer.adapter_names}
        )
        raise ValueError(
            f"No LoRA layer of model '{model.name}' has an adapter named "
            f"{adapter_name!r}. Adapters of the model: {known}. "
            f"Received: {argument}={adapter_name!r}"
        )
    return found


def config_for_layers(
    settings: Mapping[str, Mapping],
    adapter_name: str,
    bias: str = "none",
    train: Sequence[str] = (),
) -> LoraConfig:
    """A config whose conversion gives each layer path its adapter settings.

    `targets` are the exact paths; `rank` and `alpha` are the most common
    values (`alpha=None` when every alpha equals its rank), and if any layer
    differs, `rank_pattern` / `alpha_pattern` name every layer, deepest paths
    first, so that each path's own key is the first to match it. `dropout`,
    `use_rslora`, `init` and `use_dora` are the most common values (a shared
    dropout or none), so the config describes the layers (`describes`) only
    if those are shared.

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
        True if every layer's settings are `config.adapter_settings(path)`.
    """
    try:
        return all(
            config.adapter_settings(path).to_dict() == layer
            for path, layer in settings.items()
        )
    except ValueError:
        # The config's init refuses a layer's rank: not this adapter's config.
        return False


def exact(path: str) -> str:
    """A target that selects the layer at `path` and no other.

    Args:
        path: a layer path.

    Returns:
        A `"re:"` target matching exactly `path`.
    """
    return REGEX_PREFIX + re.escape(path)


def _most_common(values, key):
    return Counter(value[key] for value in values).most_common(1)[0][0]


def _pattern(values: dict, default) -> dict:
    if all(value == default for value in values.values()):
        return {}
    deepest_first = sorted(values, key=lambda path: -path.count("/"))
    return {re.escape(path): values[path] for path in deepest_first}
