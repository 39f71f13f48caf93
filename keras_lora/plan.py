"""A conversion in two steps: `plan` decides which layers get which adapter
settings and what else trains; `apply` wraps those layers, rebuilds the model
around the wrappers and freezes it.

`keras_lora.convert` plans from a `LoraConfig`; `keras_lora.load_adapter`
applies the plan an adapter file holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import keras

from keras_lora.config import LoraConfig
from keras_lora.freezing import freeze, snapshot_flags, train_paths
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import deferred_initialization, initialize
from keras_lora.layers.registry import wrapper_for
from keras_lora.layers.settings import AdapterSettings
from keras_lora.targets import is_broad, select, unwrapped
from keras_lora.tree.rebuild import rebuild
from keras_lora.tree.walk import Site, output_paths, walk

logger = logging.getLogger("keras_lora")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a conversion does to a model.

    Args:
        adapter_name: the name of the adapter every adapted layer gets.
        settings: the adapter settings of each adapted layer, by path.
        bias: which biases train (`LoraConfig.bias`).
        train: the paths of the layers that train whole.
    """

    adapter_name: str
    settings: Mapping[str, AdapterSettings]
    bias: str = "none"
    train: Sequence[str] = ()


def plan(model: keras.Model, config: LoraConfig, sites: Mapping[str, Site]) -> Plan:
    """The plan that converting `model` with `config` carries out.

    With broad targets (`keras_lora.targets.is_broad`), a selected layer that
    the wrapper refuses, or that has no wrapper for its call signature, keeps
    no adapter, and all of them are named in one warning; a named target that
    cannot take the adapter raises (from `apply`).

    Args:
        model: a built model without LoRA layers.
        config: the conversion's config.
        sites: the model's `walk()`.

    Returns:
        A `Plan`.

    Raises:
        ValueError: if the model has LoRA layers, a target or `train` entry
            matches nothing, a layer is both adapted and trained (or holds an
            adapted one), or broad targets find no layer that can take the
            adapter.
    """
    wrapped = [
        path for path, site in sites.items() if isinstance(site.layer, LoraLayer)
    ]
    if wrapped:
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers ({_preview(wrapped)}). "
            "Add another adapter with `keras_lora.add_adapter(model, name, config)`."
        )
    candidates = {path: site.layer for path, site in sites.items()}
    selected = select(
        candidates,
        config.targets,
        config.exclude,
        output_paths=output_paths(model, sites),
    )
    train = train_paths(sites, config.train)
    # A `train` layer holding an adapted one would train its frozen base too
    # (or not, depending on the backend), so that is refused as well.
    overlap = sorted(
        path
        for path in train
        if any(f"{adapted}/".startswith(f"{path}/") for adapted in selected)
    )
    if overlap:
        raise ValueError(
            "A layer cannot be both adapted and fully trained, and a fully "
            "trained layer cannot hold adapted ones; remove it from `targets` "
            f"or from `train`. Received: `train` selects {overlap}, adapted or "
            "holding adapted layers"
        )
    if is_broad(config.targets):
        settings = _what_can_take_it(candidates, selected, config)
    else:
        settings = {path: config.adapter_settings(path) for path in selected}
    return Plan(config.adapter_name, settings, config.bias, tuple(train))


def apply(model: keras.Model, plan: Plan, sites: Mapping[str, Site]) -> keras.Model:
    """Wraps the layers `plan` adapts, rebuilds `model` around the wrappers
    (`keras_lora.tree.rebuild`) and freezes it (`keras_lora.freezing.freeze`).

    Args:
        model: a built model without LoRA layers.
        plan: what to do; its paths are paths of `sites`.
        sites: the model's `walk()`.

    Returns:
        The LoRA model: a new model for a Sequential or Functional model,
        `model` itself otherwise.

    Raises:
        TypeError, ValueError: if a layer refuses its adapter. Every trainable
            flag is then put back and in-place rewiring undone.
    """
    restore_flags = snapshot_flags(model, sites)
    wrappers = {}
    try:
        # A computed init (PiSSA, OLoRA rewrite the kernel) runs once every
        # layer is wrapped, so that a refused layer leaves the others as they were.
        with deferred_initialization():
            for path, settings in plan.settings.items():
                wrappers[path] = wrap(sites[path].layer, settings, plan.adapter_name)
        replacements = {id(sites[path].layer): w for path, w in wrappers.items()}
        new_model = rebuild(model, replacements)
    except Exception:
        restore_flags()
        raise
    _warn_of_unreachable_ranks(wrappers, plan.adapter_name)
    for wrapper in wrappers.values():
        initialize(wrapper, wrapper.adapters[plan.adapter_name])
    train_layers = [sites[path].layer for path in plan.train]
    freeze(new_model, walk(new_model), plan.bias, train_layers)
    return new_model


def wrap(
    layer: keras.layers.Layer,
    settings: AdapterSettings,
    adapter_name: str,
    wrapper_class: type[LoraLayer] | None = None,
) -> LoraLayer:
    """`layer` wrapped (under its own name) with one adapter; `wrapper_class`
    defaults to `wrapper_for(layer)`. Raises the wrapper's refusal."""
    wrapper_class = wrapper_for(layer) if wrapper_class is None else wrapper_class
    return wrapper_class(
        layer, **settings.to_dict(), adapter_name=adapter_name, name=layer.name
    )


def probe(
    layer: keras.layers.Layer,
    settings: AdapterSettings,
    adapter_name: str,
    wrapper_class: type[LoraLayer] | None = None,
) -> LoraLayer:
    """A throw-away `wrap(...)`: every check the wrapper makes runs, the
    trainable flags of `layer` are put back, and no computed init runs."""
    restore_flags = snapshot_flags(layer)
    try:
        with deferred_initialization():
            return wrap(layer, settings, adapter_name, wrapper_class)
    finally:
        restore_flags()


def _what_can_take_it(candidates, selected, config) -> dict[str, AdapterSettings]:
    """Settings for each selected layer the wrapper accepts; one warning
    names the others, and those broad targets match with no wrapper."""
    skipped = unwrapped(candidates, config.targets, config.exclude)
    settings = {}
    for path in selected:
        try:
            layer_settings = config.adapter_settings(path)
            probe(candidates[path], layer_settings, config.adapter_name)
        except (ValueError, TypeError) as error:
            skipped[path] = str(error)
        else:
            settings[path] = layer_settings
    skipped = {path: skipped[path] for path in candidates if path in skipped}
    if not settings:
        raise ValueError(
            f"No selected layer can take this adapter: "
            f"{_listing(candidates, skipped)}. Received: targets={config.targets!r}"
        )
    if skipped:
        logger.warning(
            "`targets=%r` adapts every layer that can take this adapter; %d "
            "cannot and keep no adapter: %s",
            config.targets,
            len(skipped),
            _listing(candidates, skipped),
        )
    return settings


def _warn_of_unreachable_ranks(wrappers, adapter_name) -> None:
    """One warning naming the layers whose rank exceeds `max_rank()`."""
    high = [
        f"{path} (rank {wrapper.adapters[adapter_name].rank} > {wrapper.max_rank()})"
        for path, wrapper in wrappers.items()
        if wrapper.adapters[adapter_name].rank > wrapper.max_rank()
    ]
    if high:
        logger.warning(
            "The update of %d layers cannot have the rank asked, only "
            "min(fan_in, fan_out); lower their rank with `rank_pattern`: %s",
            len(high),
            ", ".join(high),
        )


def _listing(candidates, reasons) -> str:
    return "; ".join(
        f"{path} ({type(candidates[path]).__name__}): {reason}"
        for path, reason in reasons.items()
    )


def _preview(paths, limit=5) -> str:
    shown = ", ".join(paths[:limit])
    return shown if len(paths) <= limit else f"{shown}, ... {len(paths) - limit} more"
