"""convert(): turn a Keras model into a LoRA model; unload(): turn it back."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import keras

from keras_lora.adapters import (
    check_model,
    lora_layers,
    merge,
    record_config,
    refresh_optimizer,
    reset_traced_functions,
    trainable_ids,
)
from keras_lora.clone import rebuild
from keras_lora.config import LoraConfig
from keras_lora.freezing import freeze
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.initialization import deferred_initialization, initialize
from keras_lora.layers.registry import wrapper_for
from keras_lora.quantization import dequantize_and_unload
from keras_lora.targets import Target, is_broad, select, unwrapped
from keras_lora.walk import output_paths, walk

logger = logging.getLogger("keras_lora")


def convert(
    model: keras.Model,
    config: LoraConfig | None = None,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Target | Sequence[Target] | None = None,
    exclude: Target | Sequence[Target] | None = None,
    use_rslora: bool = False,
    init: str | bool = "default",
    use_dora: bool = False,
    bias: str = "none",
    train: Sequence[str] = (),
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    adapter_name: str = "default",
) -> keras.Model:
    """Returns `model` with LoRA adapters on the selected layers.

    Sequential and Functional models (and those nested in them) are cloned
    graph-wise; layers owned by other layers (a subclassed model, a transformer
    block's attention projections) are rewired in place. Either way the base
    weights are shared with `model`, never copied. As with peft's
    `get_peft_model`, treat `model` as consumed: its selected layers are frozen
    and its custom layers now hold the adapters. A subclassed model is returned
    as the same object; a Functional subclass keeps its class and methods.

    After conversion only the adapters train, plus the layers named in
    `config.train` and the biases chosen by `config.bias`.

    Args:
        model: a built Keras model.
        config: a `keras_lora.LoraConfig`. Alternatively pass its fields as
            keyword arguments (`convert(model, rank=4, targets=["query"])`).
        rank, alpha, dropout, targets, exclude, use_rslora, init: the
            `LoraConfig` fields, when `config` is not given; see
            `keras_lora.LoraConfig`, which defines and checks them.
        use_dora, bias, train, rank_pattern, alpha_pattern, adapter_name: the
            other `LoraConfig` fields, likewise.

    Returns:
        The LoRA model.

    Raises:
        TypeError: if `model` is not a Keras model or `config` not a LoraConfig.
        ValueError: if both `config` and fields are given, the model is not
            built or already has adapters, or a target matches nothing. The
            model is left unchanged.

    Example:

    >>> lora_model = keras_lora.convert(model, rank=8, targets=["query", "value"])
    >>> lora_model.compile(optimizer="adam", loss="mse")
    """
    fields = {
        name: value
        for name, value in locals().items()
        if name in _FIELD_DEFAULTS and value != _FIELD_DEFAULTS[name]
    }
    config = _resolve_config(config, fields)
    _check_built(model)
    sites = walk(model)
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
    train = (
        select(candidates, config.train, require_wrapper=False, argument="train")
        if config.train
        else []
    )
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
    flags = _trainable_flags(model)
    trainable = trainable_ids(model)
    try:
        # A computed init (PiSSA, OLoRA rewrite the kernel) runs once every
        # layer is wrapped, so that a refused layer leaves the others as they were.
        with deferred_initialization():
            replacements, skipped = _wrap_selected(candidates, selected, config)
        new_model = rebuild(model, replacements)
    except Exception:
        _restore_flags(flags)
        raise
    if skipped:
        logger.warning(
            "`targets=%r` adapts every layer that can take this adapter; %d "
            "cannot and keep no adapter: %s",
            config.targets,
            len(skipped),
            _listing(candidates, skipped),
        )
    _warn_of_unreachable_ranks(
        {
            path: replacements[id(layer)]
            for path, layer in candidates.items()
            if id(layer) in replacements
        },
        config.adapter_name,
    )
    for wrapper in replacements.values():
        initialize(wrapper, wrapper.adapters[config.adapter_name])
    freeze(new_model, config.bias, [candidates[path] for path in train])
    record_config(new_model, config)
    # A subclassed model is rewired in place: what Keras traced or built for
    # it before (predict, fit, the optimizer) still holds the old layers.
    reset_traced_functions(new_model)
    refresh_optimizer(new_model, trainable)
    return new_model


def _wrap_selected(candidates, selected, config):
    """`(replacements, skipped)`: a wrapper for each selected layer, keyed by
    the id of the layer. With broad targets (`is_broad`), a layer the wrapper
    refuses (a grouped conv whose groups do not divide the rank, ...) is left
    as it is and listed in `skipped` (path to reason) with the layers that
    have no wrapper; with explicit targets the refusal propagates."""
    broad = is_broad(config.targets)
    skipped = unwrapped(candidates, config.targets, config.exclude) if broad else {}
    replacements = {}
    for path in selected:
        layer = candidates[path]
        trainable = layer.trainable
        try:
            replacements[id(layer)] = _wrap(layer, path, config)
        except (ValueError, TypeError) as error:
            if not broad:
                raise
            # The wrapper froze the layer before refusing it.
            layer.trainable = trainable
            skipped[path] = str(error)
    if not replacements:
        raise ValueError(
            f"No selected layer can take this adapter: "
            f"{_listing(candidates, skipped)}. Received: targets={config.targets!r}"
        )
    skipped = {path: skipped[path] for path in candidates if path in skipped}
    return replacements, skipped


def _warn_of_unreachable_ranks(wrappers, adapter_name) -> None:
    """One warning naming the layers (`wrappers`: path to wrapper) whose
    adapter rank exceeds what their update can have (`min(fan_in, fan_out)`):
    the extra rank only adds parameters."""
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


def _wrap(layer, path, config) -> LoraLayer:
    settings = config.adapter_settings(path)
    return wrapper_for(layer)(
        layer, **settings.to_dict(), adapter_name=config.adapter_name, name=layer.name
    )


# `convert`'s keyword arguments are LoraConfig's fields; a pattern's `None`
# stands for LoraConfig's empty dict. tests/test_convert.py keeps them equal.
_FIELD_DEFAULTS = {
    **{
        field.name: field.default
        for field in dataclasses.fields(LoraConfig)
        if field.default is not dataclasses.MISSING
    },
    "rank_pattern": None,
    "alpha_pattern": None,
}


def _resolve_config(config, fields) -> LoraConfig:
    if config is not None and fields:
        raise ValueError(
            "Pass either `config` or LoraConfig fields, not both. "
            f"Received: config={config!r} and fields {sorted(fields)}"
        )
    if config is None:
        return LoraConfig(**fields)
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"`config` must be a keras_lora.LoraConfig. Received: config={config!r}"
        )
    return config


def _check_built(model) -> None:
    check_model(model)
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built; call it on a batch or "
            "`model.build(input_shape)` before converting, so that every layer "
            "has its weights."
        )


def _trainable_flags(model):
    layers = [site.layer for site in walk(model).values()]
    return [(layer, layer.trainable) for layer in layers], [
        (variable, variable.trainable) for variable in model.weights
    ]


def _restore_flags(flags) -> None:
    layer_flags, variable_flags = flags
    for layer, trainable in layer_flags:
        layer.trainable = trainable
    for variable, trainable in variable_flags:
        variable.trainable = trainable


def _preview(paths, limit=5) -> str:
    shown = ", ".join(paths[:limit])
    return shown if len(paths) <= limit else f"{shown}, ... {len(paths) - limit} more"


def merge_and_unload(
    model: keras.Model, safe: bool = False, dequantize: bool = False
) -> keras.Model:
    """Merges the active adapters and returns the model without LoRA layers.

    The result holds plain Keras layers only (no keras_lora class anywhere), so
    it saves, exports and serves without keras_lora installed. Its base layers
    are the LoRA model's, now holding the merged weights: use the returned
    model, not the LoRA one, afterwards.

    A base quantized by Keras (`model.quantize("int8")` or `"int4"`) cannot
    take a float update without lossy re-quantization, so merging it is
    refused unless `dequantize=True`: each adapted quantized layer is then
    replaced by a float layer of the same class whose kernel is the
    dequantized base kernel plus the update (see
    `keras_lora.quantization.dequantize_and_unload`).

    Args:
        model: a LoRA model (merged or not).
        safe: check every merged kernel is finite before writing it.
        dequantize: replace adapted quantized layers by merged float layers.

    Returns:
        The plain model, with the same outputs as the LoRA model (with
        `dequantize=True`, up to the base's activation quantization, if any).

    Raises:
        ValueError: if the model has no LoRA layer or a merge fails (the model is
            left unchanged), e.g. on a quantized base without `dequantize`.

    Example:

    >>> served = keras_lora.merge_and_unload(lora_model)
    >>> served.export("serving/task-a", format="tf_saved_model")
    """
    if dequantize:
        return dequantize_and_unload(model, safe=safe)
    layers = lora_layers(model)
    if layers and not any(layer.merged for layer in layers.values()):
        merge(model, safe=safe)
    return _unwrap(model)


def unload(model: keras.Model) -> keras.Model:
    """Returns the model without LoRA layers and without their updates: the
    base model's outputs. Merged layers are unmerged first. As in peft, a
    kernel that a PiSSA or OLoRA init replaced by a residual stays the
    residual.

    Args:
        model: a LoRA model.

    Returns:
        The plain model.

    Raises:
        ValueError: if the model has no LoRA layer.

    Example:

    >>> base = keras_lora.unload(lora_model)
    """
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return _unwrap(model)


def _unwrap(model):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer; there is nothing to unload."
        )
    trainable = trainable_ids(model)
    new_model = rebuild(model, {id(layer): layer.layer for layer in layers.values()})
    reset_traced_functions(new_model)
    refresh_optimizer(new_model, trainable)
    return new_model
