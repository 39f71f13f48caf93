"""convert(): turn a Keras model into a LoRA model; unload(): turn it back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras

from keras_lora.adapters import check_model, lora_layers, record_config
from keras_lora.config import LoraConfig
from keras_lora.freezing import trainable_change
from keras_lora.merging import merge
from keras_lora.plan import apply, plan
from keras_lora.quantization import dequantize_and_unload
from keras_lora.targets import Target
from keras_lora.tree.rebuild import rebuild
from keras_lora.tree.walk import walk


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
    planned = plan(model, config, sites)
    with trainable_change(model) as change:
        change.model = apply(model, planned, sites)
        record_config(change.model, config)
    return change.model


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
    with trainable_change(model) as change:
        change.model = rebuild(
            model, {id(layer): layer.layer for layer in layers.values()}
        )
    return change.model
