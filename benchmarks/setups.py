"""The three ways to fine-tune a workload: full, Keras built-in LoRA, keras_lora.

Each setup gets its own base model (same seed, so the same weights) and is
compiled with Adam, as a user would.
"""

from __future__ import annotations

import math

import keras

import keras_lora
from benchmarks.workloads import RANK, Workload

SETUPS = ("full", "builtin", "keras_lora")


def make_model(workload: Workload, setup: str) -> keras.Model:
    """Returns the workload's model prepared for `setup`, not compiled.

    Args:
        workload: the workload.
        setup: `"full"` (every weight trains), `"builtin"` (Keras'
            `enable_lora(rank)` on the adapted layers, everything else frozen)
            or `"keras_lora"` (`keras_lora.convert(model, rank, targets)`).

    Returns:
        The model.
    """
    model = workload.build()
    if setup == "full":
        return model
    if setup == "builtin":
        base_variables = {id(v) for v in model.weights}
        for layer in workload.adapted(model):
            layer.enable_lora(RANK)
        # keras_lora trains the adapters only (bias="none"): freeze the same.
        for variable in model.weights:
            variable.trainable = id(variable) not in base_variables
        return model
    if setup == "keras_lora":
        return keras_lora.convert(model, rank=RANK, targets=workload.targets)
    raise ValueError(f"`setup` must be one of {SETUPS}. Received: setup={setup!r}")


def compile_model(model: keras.Model, workload: Workload, jit_compile: bool) -> None:
    """Compiles `model` for training with Adam, with or without XLA."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=workload.loss,
        jit_compile=jit_compile,
    )


def trainable_count(model: keras.Model) -> int:
    """The number of trainable parameters."""
    return sum(math.prod(v.shape) for v in model.trainable_weights)
