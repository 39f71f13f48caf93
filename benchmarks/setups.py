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
            `enable_lora(rank)` on the adapted layers, everything else frozen;
            for a keras-hub model, the backbone's own `enable_lora(rank)`) or
            `"keras_lora"` (`keras_lora.convert(model, rank, targets)`).

    Returns:
        The model.

    Raises:
        RuntimeError: if a LoRA setup does not adapt (or, built-in, train)
            exactly the layers `workload.adapted` names.
    """
    if setup not in SETUPS:
        raise ValueError(f"`setup` must be one of {SETUPS}. Received: setup={setup!r}")
    model = workload.build()
    if setup == "full":
        return model
    adapted = workload.adapted(model)
    if setup == "builtin":
        if workload.enable_builtin is not None:
            workload.enable_builtin(model)
        else:
            base_variables = {id(v) for v in model.weights}
            for layer in adapted:
                layer.enable_lora(RANK)
            # keras_lora trains the adapters only (bias="none"): freeze the same.
            for variable in model.weights:
                variable.trainable = id(variable) not in base_variables
        enabled = [layer for layer in adapted if layer.lora_enabled]
        _check_same(workload, setup, enabled, adapted)
        factors = [v for layer in adapted for v in layer.trainable_weights]
        _check_same(workload, setup, model.trainable_weights, factors)
        return model
    lora_model = keras_lora.convert(model, rank=RANK, targets=workload.targets)
    wrappers = keras_lora.lora_layers(lora_model).values()
    _check_same(workload, setup, [w.layer for w in wrappers], adapted)
    return lora_model


def compile_model(model: keras.Model, workload: Workload, jit_compile: bool) -> None:
    """Compiles `model` for training with Adam, with or without XLA."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=workload.loss,
        # keras-hub's CausalLM.compile would add an accuracy metric; every
        # workload times the loss alone.
        weighted_metrics=None,
        jit_compile=jit_compile,
    )


def trainable_count(model: keras.Model) -> int:
    """The number of trainable parameters."""
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def _check_same(workload, setup, found, expected):
    """Both LoRA setups must adapt (and train) exactly the `adapted` layers:
    `found` and `expected` are the same layers, or the same variables."""
    if {id(item) for item in found} != {id(item) for item in expected}:
        raise RuntimeError(
            f"The {setup} setup of workload '{workload.name}' does not adapt "
            "(or train) exactly the layers the workload names. Expected: "
            f"{sorted(item.path for item in expected)}. Received: "
            f"{sorted(item.path for item in found)}"
        )
