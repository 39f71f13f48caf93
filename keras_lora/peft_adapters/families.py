"""The keras-hub model families whose Hugging Face checkpoints keras-hub
loads, and which Keras layer holds each `torch.nn.Linear` peft adapts.

Each table is read from the family's converter in keras-hub
(`keras_hub/src/utils/transformers/convert_*.py`): the layer a converter
ports `<module>.weight` into is the layer that module's adapter belongs to.
Module names are those of the transformers causal-LM model
(`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`), the names
peft keys its tensors with. Layers are Keras layer objects, so a model matches
by identity, whatever its layers are named.

Every converter stores a kernel as the transformers weight, transposed for a
`Linear` (GPT-2's `Conv1D` is already `(in, out)`) and reshaped: flattening
the kernel's contracted axes, then its kept axes, each in kernel order, gives
the `(in, out)` matrix, the layout of keras_lora's factors too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras

from keras_lora.layers.base import LoraLayer
from keras_lora.tree.walk import Site

# A module's layers: one, or several whose outputs the module's output
# concatenates (GPT-2's `c_attn` is query | key | value).
Layers = tuple[keras.layers.Layer, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    """One keras-hub model family.

    Args:
        name: the family's name in messages.
        backbone: the keras-hub backbone class name (subclasses count).
        prefix: what the transformers causal-LM model puts before its base
            model's module names (`"model."`, `"transformer."`).
        fan_in_fan_out: whether the family's modules are `Conv1D`, whose
            weight is `(in, out)` (peft's `fan_in_fan_out`).
        modules: gives the backbone's adapted modules, `{module name: layers}`.
    """

    name: str
    backbone: str
    prefix: str
    fan_in_fan_out: bool
    modules: Callable[[keras.Model], dict[str, Layers]]


def _llama_modules(backbone: keras.Model) -> dict[str, Layers]:
    # Llama, Llama 3, Mistral and Qwen2 decoders name their layers alike.
    modules = {}
    for index, decoder in enumerate(backbone.transformer_layers):
        attention = decoder._self_attention_layer
        layer = f"model.layers.{index}"
        modules |= {
            f"{layer}.self_attn.q_proj": (attention._query_dense,),
            f"{layer}.self_attn.k_proj": (attention._key_dense,),
            f"{layer}.self_attn.v_proj": (attention._value_dense,),
            f"{layer}.self_attn.o_proj": (attention._output_dense,),
            f"{layer}.mlp.gate_proj": (decoder._feedforward_gate_dense,),
            f"{layer}.mlp.up_proj": (decoder._feedforward_intermediate_dense,),
            f"{layer}.mlp.down_proj": (decoder._feedforward_output_dense,),
        }
    return modules


def _gemma_modules(backbone: keras.Model) -> dict[str, Layers]:
    modules = {}
    for index, decoder in enumerate(backbone.transformer_layers):
        attention = decoder.attention
        layer = f"model.layers.{index}"
        modules |= {
            f"{layer}.self_attn.q_proj": (attention.query_dense,),
            f"{layer}.self_attn.k_proj": (attention.key_dense,),
            f"{layer}.self_attn.v_proj": (attention.value_dense,),
            f"{layer}.self_attn.o_proj": (attention.output_dense,),
            f"{layer}.mlp.gate_proj": (decoder.gating_ffw,),
            f"{layer}.mlp.up_proj": (decoder.gating_ffw_2,),
            f"{layer}.mlp.down_proj": (decoder.ffw_linear,),
        }
    return modules


def _gpt2_modules(backbone: keras.Model) -> dict[str, Layers]:
    modules = {}
    for index, decoder in enumerate(backbone.transformer_layers):
        attention = decoder._self_attention_layer
        layer = f"transformer.h.{index}"
        modules |= {
            f"{layer}.attn.c_attn": (
                attention.query_dense,
                attention.key_dense,
                attention.value_dense,
            ),
            f"{layer}.attn.c_proj": (attention.output_dense,),
            f"{layer}.mlp.c_fc": (decoder._feedforward_intermediate_dense,),
            f"{layer}.mlp.c_proj": (decoder._feedforward_output_dense,),
        }
    return modules


FAMILIES = (
    Family("Llama (2, 3)", "LlamaBackbone", "model.", False, _llama_modules),
    Family("Mistral", "MistralBackbone", "model.", False, _llama_modules),
    Family("Qwen2", "QwenBackbone", "model.", False, _llama_modules),
    Family("Gemma (1, 2)", "GemmaBackbone", "model.", False, _gemma_modules),
    Family("GPT-2", "GPT2Backbone", "transformer.", True, _gpt2_modules),
)


def family_of(model: keras.Model) -> tuple[Family, keras.Model]:
    """The family of a keras-hub backbone or task model, and its backbone.

    Args:
        model: a keras-hub backbone, or a task model (with `.backbone`).

    Returns:
        `(family, backbone)`.

    Raises:
        ValueError: if keras-hub is not installed, or `model` is not a model
            of a supported family (the message names them).
    """
    try:
        import keras_hub
    except ImportError as error:
        raise ValueError(
            "peft adapters map onto keras-hub models; install keras-hub "
            "(`pip install keras-lora[hub]`)"
        ) from error
    backbone = getattr(model, "backbone", model)
    for family in FAMILIES:
        if isinstance(backbone, getattr(keras_hub.models, family.backbone)):
            return family, backbone
    supported = ", ".join(family.name for family in FAMILIES)
    raise ValueError(
        "`model` must be a keras-hub backbone or task model of a family whose "
        f"Hugging Face modules keras_lora maps: {supported}. Received: model "
        f"'{model.name}' of type {type(model).__name__} (backbone "
        f"{type(backbone).__name__})"
    )


def module_paths(
    family: Family, backbone: keras.Model, sites: Mapping[str, Site]
) -> dict[str, tuple[str, ...]]:
    """Each module of the family's table as the paths of its layers.

    Args:
        family: the model's family.
        backbone: its backbone.
        sites: the model's `walk()`.

    Returns:
        `{module name: paths}`; a LoRA layer stands for the layer it wraps.
    """
    paths = {}
    for path, site in sites.items():
        paths[id(site.layer)] = path
        if isinstance(site.layer, LoraLayer):
            paths[id(site.layer.layer)] = path
    return {
        module: tuple(paths[id(layer)] for layer in layers)
        for module, layers in family.modules(backbone).items()
    }
