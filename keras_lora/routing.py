"""adapter_per_example(): each example of a batch through its own adapter.

peft's mixed-batch inference takes `adapter_names=` as an argument of the
model's `forward`; a Keras Functional model takes fixed inputs, so here the
routing is set on every LoraLayer of the model for the duration of a `with`
block (as `keras_lora.disable_adapters` does), which works the same for
Sequential, Functional, nested and subclassed models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_lora.adapters import require_lora_layers, reset_traced_functions
from keras_lora.layers.adapter_routing import adapter_routing, route, routing_of


@contextlib.contextmanager
def adapter_per_example(
    model: keras.Model,
    adapter_names: list[str] | tuple[str, ...],
    adapter_index=None,
) -> Iterator[keras.Model]:
    """Context manager in which each example of a batch uses its own adapter.

    Inside the block, calling `model` on a batch gives each example what the
    model gives it alone with its adapter active (peft's `adapter_names=`
    argument); `"__base__"` (or index `-1`) gives the base model's output. The
    active adapters do not matter meanwhile. Each routed adapter is computed
    on the whole batch and masked to its examples, so a batch costs about one
    adapter pass per adapter it uses.

    Routing is for inference: a call in training is refused. It is Python
    state read when a function is traced, so to trace (`tf.function`,
    `jax.jit`) enter the block inside the traced function with the index as
    one of its arguments, as `keras_lora.export_per_example` does. Keras'
    traced `predict` functions are reset on entry and exit; `predict` only
    matches the routing if its batch is the whole routed batch.

    Args:
        model: an unmerged LoRA model.
        adapter_names: with `adapter_index=None`, one adapter name per example
            (`"__base__"` for none); otherwise the adapter names the index
            refers to, each once.
        adapter_index: `None`, or integers of shape `(batch,)` (a list, NumPy
            array or tensor, symbolic inside a traced function): example `i`
            uses `adapter_names[adapter_index[i]]`, `-1` the base model.

    Yields:
        The model.

    Raises:
        TypeError: if `model` is not a Keras model, `adapter_names` is not a
            list of strings, or `adapter_index` is not integer.
        ValueError: if the model has no LoRA layer or is already routed; if a
            LoRA layer is merged, has its adapters disabled, lacks a named
            adapter or would use DoRA; if `adapter_index` has a value outside
            `[-1, len(adapter_names))`; nothing is changed then. Inside the
            block, a call in training or on a batch of another size raises
            `ValueError`.

    Example:

    >>> with keras_lora.adapter_per_example(
    ...     lora_model, ["task_a", "__base__", "task_b"]
    ... ):
    ...     y = lora_model(x[:3])
    >>> names = ["task_a", "task_b"]
    >>> with keras_lora.adapter_per_example(lora_model, names, [1, -1, 0]):
    ...     y = lora_model(x[:3])
    """
    layers = require_lora_layers(model)
    routing = adapter_routing(adapter_names, adapter_index)
    routed = [path for path, layer in layers.items() if routing_of(layer)]
    if routed:
        raise ValueError(
            f"Layers {routed} of model '{model.name}' are already routed by "
            "an enclosing `keras_lora.adapter_per_example` block; route a "
            "model with one block at a time."
        )
    for layer in layers.values():
        routing.check(layer)
    for layer in layers.values():
        route(layer, routing)
    reset_traced_functions(model)
    try:
        yield model
    finally:
        for layer in layers.values():
            route(layer, None)
        reset_traced_functions(model)
