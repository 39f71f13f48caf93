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
import functools
from collections.abc import Mapping

import keras

from keras_lora.hub_lookup import imported_keras_hub
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
        block: the transformers name of decoder block `index`
            (`"model.layers.{index}"`); its first part is the prefix the
            causal-LM model puts before its base model's module names.
        modules: each adapted module of a block, by its name in the block, as
            the attribute paths of its layers in the keras-hub decoder block.
        fan_in_fan_out: whether the modules are `Conv1D`, whose weight is
            `(in, out)` (peft's `fan_in_fan_out`).
    """

    name: str
    backbone: str
    block: str
    modules: Mapping[str, tuple[str, ...]]
    fan_in_fan_out: bool = False

    @property
    def prefix(self) -> str:
        """`"model."` or `"transformer."`: see `block`."""
        return self.block.split(".")[0] + "."

    def module_layers(self, backbone: keras.Model) -> dict[str, Layers]:
        """Every adapted module of `backbone`, `{module name: layers}`."""
        return {
            f"{self.block.format(index=index)}.{module}": tuple(
                functools.reduce(getattr, path.split("."), decoder) for path in paths
            )
            for index, decoder in enumerate(backbone.transformer_layers)
            for module, paths in self.modules.items()
        }


# Llama, Llama 3, Mistral and Qwen2 decoders name their layers alike.
_LLAMA = {
    "self_attn.q_proj": ("_self_attention_layer._query_dense",),
    "self_attn.k_proj": ("_self_attention_layer._key_dense",),
    "self_attn.v_proj": ("_self_attention_layer._value_dense",),
    "self_attn.o_proj": ("_self_attention_layer._output_dense",),
    "mlp.gate_proj": ("_feedforward_gate_dense",),
    "mlp.up_proj": ("_feedforward_intermediate_dense",),
    "mlp.down_proj": ("_feedforward_output_dense",),
}
_GEMMA = {
    "self_attn.q_proj": ("attention.query_dense",),
    "self_attn.k_proj": ("attention.key_dense",),
    "self_attn.v_proj": ("attention.value_dense",),
    "self_attn.o_proj": ("attention.output_dense",),
    "mlp.gate_proj": ("gating_ffw",),
    "mlp.up_proj": ("gating_ffw_2",),
    "mlp.down_proj": ("ffw_linear",),
}
_GPT2 = {
    "attn.c_attn": tuple(
        f"_self_attention_layer.{name}_dense" for name in ("query", "key", "value")
    ),
    "attn.c_proj": ("_self_attention_layer.output_dense",),
    "mlp.c_fc": ("_feedforward_intermediate_dense",),
    "mlp.c_proj": ("_feedforward_output_dense",),
}
FAMILIES = (
    Family("Llama (2, 3)", "LlamaBackbone", "model.layers.{index}", _LLAMA),
    Family("Mistral", "MistralBackbone", "model.layers.{index}", _LLAMA),
    Family("Qwen2", "QwenBackbone", "model.layers.{index}", _LLAMA),
    Family("Gemma (1, 2)", "GemmaBackbone", "model.layers.{index}", _GEMMA),
    Family("GPT-2", "GPT2Backbone", "transformer.h.{index}", _GPT2, True),
)


def family_of(model: keras.Model) -> tuple[Family, keras.Model]:
    """The family of a keras-hub backbone or task model, and its backbone.

    Args:
        model: a keras-hub backbone, or a task model (with `.backbone`).

    Returns:
        `(family, backbone)`.

    Raises:
        ValueError: if keras-hub is not imported (so `model` cannot be a
            keras-hub model), or `model` is not a model of a supported family
            (the message names them).
    """
    models = imported_keras_hub("models")
    if models is None:
        raise ValueError(
            "peft adapters map onto keras-hub models, and keras-hub is not "
            "imported: build `model` with keras-hub (`pip install "
            f"keras-lora[hub]`). Received: model of type {type(model).__name__}"
        )
    backbone = getattr(model, "backbone", model)
    for family in FAMILIES:
        if isinstance(backbone, getattr(models, family.backbone)):
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
        for module, layers in family.module_layers(backbone).items()
    }
