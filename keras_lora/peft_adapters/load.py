"""load_peft_adapter(): a peft LoRA adapter onto the keras-hub model of the
same Hugging Face checkpoint.

The peft directory becomes a keras_lora adapter (a document and tensors, as
`checkpoint.format` reads them) that `load_adapter`'s own checks and steps
then load: all or nothing, into a plain model or a LoRA model.

A module's factors `A` `(r, in)` and `B` `(out, r)` become
`lora_a = A.T.reshape(*contracted axes, r)` and
`lora_b = B.T.reshape(r, *kept axes)` of its layer (see `families`); a DoRA
magnitude `(out,)` takes the kept axes. A module of several layers (GPT-2's
`c_attn`) gives each layer the shared `A` and its block of `B`'s rows.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np

from keras_lora.adapters import check_model
from keras_lora.checkpoint.describe import config_for_layers
from keras_lora.checkpoint.format import FORMAT_VERSION, adapter_keys, problems_error
from keras_lora.checkpoint.load import check_adapter_name, load_document
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.registry import wrapper_for
from keras_lora.layers.settings import AdapterSettings
from keras_lora.peft_adapters.families import Family, family_of, module_paths
from keras_lora.peft_adapters.files import pattern_value, read_peft_directory
from keras_lora.plan import probe
from keras_lora.tree.walk import walk
from keras_lora.version import __version__


def load_peft_adapter(
    model: keras.Model, directory: str | os.PathLike, adapter_name: str | None = None
) -> keras.Model:
    """Loads a Hugging Face peft LoRA adapter into a keras-hub model.

    `model` is a keras-hub backbone or task model built from the Hugging Face
    checkpoint the adapter was trained on (`from_preset` on its directory or
    `hf://` handle). Into a plain model, the layers of the adapter's modules
    are converted with its settings (`r`, `lora_alpha`, `use_rslora`,
    `use_dora`, `lora_dropout`, `rank_pattern`, `alpha_pattern`), and treat
    the model passed in as consumed, as with `convert`. Into a LoRA model, the
    adapter is added under `adapter_name` (inactive until
    `keras_lora.set_adapter` names it) or replaces the adapter of that name.
    Families: Llama (Llama 2 and 3), Mistral, Qwen2, Gemma (Gemma 1 and 2)
    and GPT-2.

    The outputs equal peft's on the transformers model to float32 rounding,
    unmerged and merged.

    Args:
        model: a keras-hub backbone or task model of a supported family.
        directory: a directory peft's `save_pretrained` wrote
            (`adapter_config.json`, `adapter_model.safetensors`).
        adapter_name: the name to load the adapter under; `None` means
            `"default"`, peft's default name.

    Returns:
        The LoRA model (`model` itself for a keras-hub model).

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: listing every problem: an unsupported family (the message
            names the supported ones), a missing or unreadable file, another
            `peft_type`, `bias` other than `"none"`, `modules_to_save`, a
            residual init (PiSSA, OLoRA, ...), a module without a counterpart
            in the model, a rank the config does not give, other shapes. The
            model is left unchanged.

    Example:

    >>> lm = keras_hub.models.CausalLM.from_preset("./llama-3.2-1b")
    >>> lm = keras_lora.load_peft_adapter(lm, "./llama-3.2-1b-lora")
    """
    check_model(model)
    name = "default" if adapter_name is None else adapter_name
    check_adapter_name(name, adapter_name, "'default'")
    family, backbone = family_of(model)
    config, modules = read_peft_directory(directory)
    sites = walk(model)
    document, tensors, found = _as_keras_lora(
        family, module_paths(family, backbone, sites), sites, config, modules, name
    )
    summary = f"Cannot load the peft adapter in {os.fspath(directory)!r}"
    if found:
        raise problems_error(f"{summary} into model '{model.name}'", found)
    return load_document(model, sites, document, tensors, name, summary)


def _as_keras_lora(family: Family, paths, sites, config, modules, name):
    """`(document, tensors, problems)`: the keras_lora adapter a peft adapter
    is, for a model whose modules are at `paths` (`module_paths`)."""
    records, tensors, settings_by_path, found = [], {}, {}, []
    for module, parts in modules.items():
        table_name = _table_name(module, family, paths)
        if table_name is None:
            found.append(
                f"module {module!r} has no counterpart in a keras-hub "
                f"{family.name} model; its adapted modules are "
                f"{_module_kinds(paths)}"
            )
            continue
        try:
            settings = _settings(config, module, parts)
        except ValueError as error:
            found.append(f"module {module!r}: {error}")
            continue
        layer_paths = paths[table_name]
        try:
            values = _layer_values(sites, layer_paths, parts, settings, name)
        except ValueError as error:
            found.append(f"module {module!r}: {error}")
            continue
        for path, (wrapper, layer_values) in zip(layer_paths, values, strict=True):
            settings_by_path[path] = settings.to_dict()
            records.append({"path": path, "wrapper": wrapper, **settings.to_dict()})
            keys = adapter_keys(path, settings.use_dora)
            tensors.update({keys[part]: layer_values[part] for part in keys})
    if not records and not found:
        found.append("the adapter holds no LoRA factors")
    document = {
        "format_version": FORMAT_VERSION,
        "keras_lora_version": __version__,
        "adapter_name": name,
        "config": config_for_layers(settings_by_path, name).to_dict()
        if settings_by_path
        else {},
        "layers": records,
        "train": [],
        "weights": [],
    }
    return document, tensors, found


def _table_name(module, family, paths):
    """The table's name of a module peft named on the causal-LM model or on
    its base model (without `family.prefix`); `None` if there is none."""
    for candidate in (module, family.prefix + module):
        if candidate in paths:
            return candidate
    return None


def _module_kinds(paths) -> list[str]:
    # "model.layers.0.self_attn.q_proj" -> "self_attn.q_proj"
    return sorted({".".join(module.split(".")[-2:]) for module in paths})


def _settings(config, module, parts) -> AdapterSettings:
    """A module's adapter settings, its rank read from its factors."""
    rank = parts["lora_a"].shape[0]
    expected = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if rank != expected:
        raise ValueError(
            f"its factors have rank {rank}; the config gives it r={expected}"
        )
    use_dora = bool(config.get("use_dora", False))
    if use_dora != ("lora_magnitude_vector" in parts):
        raise ValueError(
            f"use_dora is {use_dora} in the config, and the magnitude vector is "
            f"{'in' if not use_dora else 'missing from'} the weights file"
        )
    return AdapterSettings(
        rank=rank,
        alpha=pattern_value(
            config.get("alpha_pattern") or {}, module, config["lora_alpha"]
        ),
        dropout=config.get("lora_dropout", 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=use_dora,
    )


def _layer_values(sites, layer_paths, parts, settings, name):
    """`[(wrapper name, {parameter name: array})]` for each layer of a module:
    the shared `A`, each layer's block of `B`'s rows and of the magnitude."""
    shapes, wrappers = [], []
    for path in layer_paths:
        layer = sites[path].layer
        lora = isinstance(layer, LoraLayer)
        wrapper_class = type(layer) if lora else wrapper_for(layer)
        base = layer.layer if lora else layer
        if wrapper_class is None or not base.built:
            raise ValueError(f"layer '{path}' cannot take an adapter")
        try:
            probed = probe(base, settings, name, wrapper_class)
        except (TypeError, ValueError) as error:
            raise ValueError(f"layer '{path}' cannot take it: {error}") from error
        parameters = probed.adapters[name].parameters
        shapes.append({part: tuple(v.shape) for part, v in parameters.items()})
        wrappers.append(keras.saving.get_registered_name(wrapper_class))
    a, b = parts["lora_a"], parts["lora_b"]
    fan_in = math.prod(shapes[0]["lora_a"][:-1])
    fan_outs = [math.prod(shape["lora_b"][1:]) for shape in shapes]
    if a.shape[1] != fan_in or b.shape[0] != sum(fan_outs):
        raise ValueError(
            f"its factors have shapes {a.shape} and {b.shape}; its layers "
            f"{list(layer_paths)} need (r, {fan_in}) and ({sum(fan_outs)}, r)"
        )
    starts = np.cumsum([0, *fan_outs])
    values = []
    for shape, start, stop in zip(shapes, starts[:-1], starts[1:], strict=True):
        layer_values = {"lora_a": a.T, "lora_b": b[start:stop].T}
        if settings.use_dora:
            magnitude = parts["lora_magnitude_vector"].reshape(-1)
            layer_values["lora_magnitude_vector"] = magnitude[start:stop]
        # Each layer gets its own copy: the layers of a module share `A`.
        values.append(
            {part: np.array(v).reshape(shape[part]) for part, v in layer_values.items()}
        )
    return list(zip(wrappers, values, strict=True))
