"""export(): a LoRA model as a TensorFlow SavedModel for serving.

TensorFlow-specific: the artifact is Keras' `model.export(...,
format="tf_saved_model")`, which keeps the model's input names and dtypes in
its serving signature and loads with `tf.saved_model.load` or
`keras.layers.TFSMLayer` without keras_lora installed.
"""

from __future__ import annotations

import os

import keras

from keras_lora import adapters
from keras_lora.clone import rebuild


def export(
    model: keras.Model, directory: str | os.PathLike, merge: bool = True, **kwargs
) -> None:
    """Exports a LoRA model as a TensorFlow SavedModel.

    With `merge=True` (the default) the adapters are folded into the base
    weights and the plain model (no keras_lora layer, no adapter variable) is
    exported, so serving runs at the base model's speed; then the LoRA model
    is put back as it was, unmerged if it was, ready to train on. With
    `merge=False` the model is exported as it is, adapters computed
    factorised.

    `model.export(directory, format="tf_saved_model")` works on a LoRA model
    too; this function only adds the merged path in one call.

    Args:
        model: a LoRA model.
        directory: where to write the SavedModel.
        merge: export the merged plain model rather than the LoRA one.
        **kwargs: passed to `keras.Model.export` (`verbose`,
            `input_signature`, ...).

    Raises:
        ValueError: if the model has no LoRA layer, only some of its layers
            are merged, or a merge fails (a quantized base: export with
            `merge=False`, or export
            `keras_lora.merge_and_unload(model, dequantize=True)`).

    Example:

    >>> keras_lora.export(lora_model, "serving/task-a")
    >>> reloaded = tf.saved_model.load("serving/task-a")
    """
    layers = adapters.lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer; export it with "
            "`model.export(directory, format='tf_saved_model')`."
        )
    if not merge:
        model.export(directory, format="tf_saved_model", **kwargs)
        return
    merged = [layer.merged for layer in layers.values()]
    if any(merged) and not all(merged):
        raise ValueError(
            f"Model '{model.name}' is partly merged; call "
            "`keras_lora.unmerge(model)` or `keras_lora.merge(model)` first."
        )
    merged_here = not any(merged)
    if merged_here:
        adapters.merge(model)
    try:
        wrappers = list(layers.values())
        plain = rebuild(model, {id(layer): layer.layer for layer in wrappers})
        try:
            plain.export(directory, format="tf_saved_model", **kwargs)
        finally:
            # Layers owned by other layers were rewired in place to the base
            # layers; point them back at the wrappers.
            rebuild(plain, {id(layer.layer): layer for layer in wrappers})
            adapters.reset_traced_functions(model)
    finally:
        if merged_here:
            adapters.unmerge(model)
