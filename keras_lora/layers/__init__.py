"""The LoRA wrapper layers."""

from keras_lora.layers.adapter import LoraAdapter
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.conv import LoraConv, LoraConv1D, LoraConv2D, LoraConv3D
from keras_lora.layers.dense import LoraDense
from keras_lora.layers.einsum_dense import LoraEinsumDense
from keras_lora.layers.embedding import LoraEmbedding
from keras_lora.layers.registry import register_wrapper, supported_classes, wrapper_for
from keras_lora.layers.reversible_embedding import LoraReversibleEmbedding
from keras_lora.layers.settings import AdapterSettings

__all__ = [
    "AdapterSettings",
    "LoraAdapter",
    "LoraConv",
    "LoraConv1D",
    "LoraConv2D",
    "LoraConv3D",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "LoraLayer",
    "LoraReversibleEmbedding",
    "register_wrapper",
    "supported_classes",
    "wrapper_for",
]
