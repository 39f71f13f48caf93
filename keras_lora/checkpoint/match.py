"""Whether an adapter directory fits a model: every problem, found without
changing the model.

`load_adapter` runs these checks on what `format.read_directory` returned,
and loads only if they find nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from keras_lora.checkpoint.format import adapter_keys, layer_settings
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.registry import wrapper_for
from keras_lora.layers.settings import AdapterSettings, rewrites_kernel
from keras_lora.plan import probe
from keras_lora.tree.walk import Site, own_variables


def problems(
    model: keras.Model,
    sites: Mapping[str, Site],
    document: dict,
    tensors: Mapping,
    adapter_name: str,
) -> list[str]:
    """Every reason the adapter cannot load into `model`.

    Into a plain model: each saved path must be a layer of the model with the
    saved wrapper type, whose factors have the saved shapes. Into a LoRA
    model: each saved path must be an unmerged LoRA layer of that type, and
    an adapter of the same name elsewhere must be removable. Either way each
    trained weight must be a model variable of the saved shape.

    Args:
        model: the model to load into.
        sites: its `walk()`.
        document: the checked `adapter_config.json` document.
        tensors: the checked tensors.
        adapter_name: the name the adapter loads under.

    Returns:
        A list of problem descriptions; empty if the adapter fits.
    """
    lora = {p: s.layer for p, s in sites.items() if isinstance(s.layer, LoraLayer)}
    if not lora and not model.built:
        return [f"model '{model.name}' is not built; build it before loading"]
    saved = {record["path"] for record in document["layers"]}
    found = []
    for record in document["layers"]:
        site = sites.get(record["path"])
        if site is None:
            found.append(f"layer '{record['path']}' is not in the model")
            continue
        found.extend(_layer_problems(site.layer, record, tensors, adapter_name, lora))
    if any(record["path"] not in sites for record in document["layers"]):
        found.append(
            "layers are matched by path (layer names); Keras numbers unnamed "
            "layers per process (dense, dense_1, ...), so name the layers, or "
            "load the base model from its .keras file. Model paths: "
            + ", ".join(list(sites)[:20])
            + (f", ... and {len(sites) - 20} more" if len(sites) > 20 else "")
        )
    for path, layer in lora.items():
        if path in saved or adapter_name not in layer.adapters:
            continue
        if layer.merged or layer.adapter_names == (adapter_name,):
            found.append(
                f"layer '{path}' has an adapter '{adapter_name}' that the loaded "
                "adapter does not cover, and it cannot be removed there (it is "
                "merged, or the layer's only adapter)"
            )
    for path in document["train"]:
        holds = any(f"{adapted}/".startswith(f"{path}/") for adapted in [*saved, *lora])
        if path not in sites or holds:
            found.append(
                f"trained layer '{path}' is not a layer of the model without "
                "adapters inside"
            )
    for key in document["weights"]:
        variable = variable_at(sites, key)
        if variable is None:
            found.append(f"weight '{key}' has no variable in the model")
        elif tuple(variable.shape) != tensors[key].shape:
            found.append(
                f"weight '{key}' has shape {tensors[key].shape} in the file and "
                f"{tuple(variable.shape)} in the model"
            )
    return found


def variable_at(sites: Mapping[str, Site], key: str) -> keras.Variable | None:
    """The variable a `"{path}/{variable name}"` key names, or `None`.

    Args:
        sites: the model's `walk()`.
        key: a file key of a trained weight.

    Returns:
        The variable of that name the layer at `path` (a wrapper's base
        layer) holds itself, or `None`.
    """
    path, _, variable_name = key.rpartition("/")
    site = sites.get(path)
    if site is None:
        return None
    layer = site.layer.layer if isinstance(site.layer, LoraLayer) else site.layer
    return next((v for v in own_variables(layer) if v.name == variable_name), None)


def _layer_problems(layer, record, tensors, adapter_name, lora) -> list[str]:
    path = record["path"]
    if lora:
        if not isinstance(layer, LoraLayer):
            return [
                f"layer '{path}' is a {type(layer).__name__} without adapters; "
                "into a LoRA model, adapters load onto its LoRA layers only"
            ]
        if layer.merged:
            return [f"layer '{path}' is merged; call `keras_lora.unmerge` first"]
        wrapper_class, base = type(layer), layer.layer
    else:
        wrapper_class, base = wrapper_for(layer), layer
        if wrapper_class is None:
            return [f"layer '{path}' is a {type(layer).__name__}, which has no wrapper"]
    wrapper = keras.saving.get_registered_name(wrapper_class)
    if wrapper != record["wrapper"]:
        return [
            f"layer '{path}' takes a {wrapper}; the adapter was saved for a "
            f"{record['wrapper']}"
        ]
    settings = layer_settings(record)
    if lora and rewrites_kernel(settings["init"]):
        existing = layer.adapters.get(adapter_name)
        if existing is None or existing.settings() != settings:
            return [
                f"layer '{path}': init={settings['init']!r} made the adapter for "
                "a residual kernel; into a LoRA model it loads only over the "
                f"adapter '{adapter_name}' it was trained as (same settings). "
                "Save it with `for_original_base=True` to load it elsewhere"
            ]
    if not base.built:
        return [
            f"layer '{path}' cannot take the adapter: layer '{base.name}' is not built"
        ]
    try:
        # A throw-away wrapper gives the shapes and runs every check it makes.
        probed = probe(
            base, AdapterSettings.from_dict(settings), adapter_name, wrapper_class
        )
    except (TypeError, ValueError) as error:
        return [f"layer '{path}' cannot take the adapter: {error}"]
    parameters = probed.adapters[adapter_name].parameters
    shapes = {name: tuple(variable.shape) for name, variable in parameters.items()}
    return [
        f"tensor '{key}' has shape {tensors[key].shape}; layer '{path}' needs "
        f"{shapes[name]}"
        for name, key in adapter_keys(path, settings["use_dora"]).items()
        if tensors[key].shape != shapes[name]
    ]
