"""peft's own numbers: the fixtures of tests/fixtures/peft/, read without torch,
in Keras layouts, and the keras_lora wrappers they describe.

tests/fixtures/make_peft_fixtures.py writes them (torch layouts);
tests/layers/test_peft_fixtures.py's docstring gives each layout conversion.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import keras
import numpy as np

from keras_lora.layers import (
    LoraConv1D,
    LoraConv2D,
    LoraConv3D,
    LoraDense,
    LoraEmbedding,
    LoraLayer,
)

DIRECTORY = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "peft"
NAMES = sorted(path.stem for path in DIRECTORY.glob("*.npz"))

WRAPPERS = {
    "Linear": LoraDense,
    "Conv1d": LoraConv1D,
    "Conv2d": LoraConv2D,
    "Conv3d": LoraConv3D,
    "Embedding": LoraEmbedding,
}


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One fixture: `config` (the torch layer and adapter settings) and the
    arrays peft was given and computed, as stored (torch layouts)."""

    name: str
    config: dict
    arrays: dict

    @property
    def layer(self) -> str:
        """The torch layer class: "Linear", "Conv2d", "Embedding", ..."""
        return self.config["layer"]

    @property
    def is_conv(self) -> bool:
        return self.layer.startswith("Conv")

    @property
    def groups(self) -> int:
        return self.config["kwargs"].get("groups", 1)

    def tensor(self, key: str) -> np.ndarray:
        """An input or output (`inputs`, `base_outputs`, `outputs`,
        `merged_outputs`) in Keras layout: channels last."""
        value = self.arrays[key]
        return np.moveaxis(value, 1, -1) if self.is_conv else value

    def kernel(self, key: str) -> np.ndarray:
        """`weight`, `merged_weight`, `lora_A` or `lora_B` in Keras layout."""
        value = self.arrays[key]
        if self.is_conv:
            # (out, in, *k) -> (*k, in, out).
            value = value.transpose(*range(2, value.ndim), 1, 0)
            if key == "lora_A" and self.groups > 1:
                value = _grouped(value, self.groups)
            return value
        if self.layer == "Embedding" and key in ("weight", "merged_weight"):
            return value
        return value.T

    def magnitude(self) -> np.ndarray:
        """DoRA's magnitude, one entry per output unit."""
        return self.arrays["lora_magnitude"].reshape(-1)

    def base_layer(self) -> keras.layers.Layer:
        """The Keras layer the torch layer is, built, with its weights."""
        kwargs = self.config["kwargs"]
        if self.layer == "Linear":
            layer = keras.layers.Dense(kwargs["out_features"])
            layer.build((None, kwargs["in_features"]))
        elif self.layer == "Embedding":
            layer = keras.layers.Embedding(
                kwargs["num_embeddings"], kwargs["embedding_dim"]
            )
            layer.build()
        else:
            layer = WRAPPERS[self.layer].base_class(
                kwargs["out_channels"],
                kwargs["kernel_size"],
                strides=kwargs["stride"],
                padding=_keras_padding(kwargs["padding"]),
                dilation_rate=kwargs["dilation"],
                groups=kwargs["groups"],
            )
            layer.build((None, *self.tensor("inputs").shape[1:]))
        biases = [self.arrays["bias"]] if "bias" in self.arrays else []
        layer.set_weights([self.kernel("weight"), *biases])
        return layer

    def wrapper(self) -> LoraLayer:
        """The keras_lora wrapper around `base_layer()` holding peft's adapter
        (factors, DoRA magnitude) as "default", unmerged."""
        config = self.config
        wrapper = WRAPPERS[self.layer](
            self.base_layer(),
            rank=config["r"],
            alpha=config["lora_alpha"],
            use_rslora=config["use_rslora"],
            use_dora=config["use_dora"],
        )
        adapter = wrapper.adapters["default"]
        adapter.set_factors(self.kernel("lora_A"), self.kernel("lora_B"))
        if config["use_dora"]:
            adapter.lora_magnitude_vector.assign(self.magnitude())
        return wrapper


def load(name: str) -> Fixture:
    """Reads tests/fixtures/peft/<name>.npz."""
    with np.load(DIRECTORY / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    config = json.loads(str(arrays.pop("config")))
    arrays.pop("versions")
    return Fixture(name, config, arrays)


def _keras_padding(padding) -> str:
    # torch's "same" pads as Keras' (the extra one at the end). The integer
    # paddings of the fixtures are those of "same" on their sizes (kernel
    # 2p + 1; stride 2 on an odd size), which the base-output test confirms.
    if padding == "same" or any(padding):
        return "same"
    return "valid"


def _grouped(lora_a: np.ndarray, groups: int) -> np.ndarray:
    """peft's ungrouped `lora_A` (*k, in, r) as a grouped one (*k, in/groups, r).

    peft 0.21 groups only `lora_B`; its rank channel j may read every input
    channel. keras_lora's rank channel j reads those of its group,
    j // (r / groups), as a grouped convolution does: the fixture's other
    entries are zero, and must be.
    """
    *_, in_channels, rank = lora_a.shape
    inputs, ranks = in_channels // groups, rank // groups
    blocks = []
    for g in range(groups):
        columns = slice(g * ranks, (g + 1) * ranks)
        rows = np.arange(in_channels) // inputs == g
        if np.any(lora_a[..., ~rows, columns]):
            raise ValueError(
                "A fixture's grouped `lora_A` reads inputs outside its group, "
                "which a grouped convolution cannot: regenerate it with "
                "tests/fixtures/make_peft_fixtures.py."
            )
        blocks.append(lora_a[..., rows, columns])
    return np.concatenate(blocks, axis=-1)
