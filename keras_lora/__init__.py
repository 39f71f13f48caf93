"""keras_lora: LoRA (low-rank adaptation) for Keras 3 models."""

from keras_lora.layers import (
    LoraConv1D,
    LoraConv2D,
    LoraConv3D,
    LoraDense,
    LoraEinsumDense,
    LoraEmbedding,
    LoraLayer,
    register_wrapper,
)
from keras_lora.version import __version__

__all__ = [
    "LoraConv1D",
    "LoraConv2D",
    "LoraConv3D",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "LoraLayer",
    "__version__",
    "register_wrapper",
]
