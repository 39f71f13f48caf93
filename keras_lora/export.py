"""export(), export_per_example(): a LoRA model as a TensorFlow SavedModel for
serving.

The artifact is Keras' `model.export(..., format="tf_saved_model")` (or, per
example, a `keras.export.ExportArchive` endpoint), which keeps the model's
input names and dtypes in its serving signature and loads with
`tf.saved_model.load` or `keras.layers.TFSMLayer` without keras_lora installed.

Keras writes a SavedModel from the TensorFlow and JAX backends (JAX through
jax2tf, with TensorFlow installed); its torch backend needs torch_xla. A
model trained on torch is exported from TensorFlow: its adapter or merged
`.keras` file loads there.
"""

from __future__ import annotations

import os

import keras

from keras_lora import adapters, compiled_state, merging
from keras_lora.adapters import adapter_per_example
from keras_lora.tree.rebuild import rebuild


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
        merging.merge(model)
    try:
        wrappers = list(layers.values())
        plain = rebuild(model, {id(layer): layer.layer for layer in wrappers})
        try:
            plain.export(directory, format="tf_saved_model", **kwargs)
        finally:
            # Layers owned by other layers were rewired in place to the base
            # layers; point them back at the wrappers.
            rebuild(plain, {id(layer.layer): layer for layer in wrappers})
            compiled_state.reset_traced_functions(model)
    finally:
        if merged_here:
            merging.unmerge(model)


def export_per_example(
    model: keras.Model,
    directory: str | os.PathLike,
    adapter_names: list[str] | tuple[str, ...],
    input_signature: list | None = None,
    verbose: bool = True,
) -> None:
    """Exports a LoRA model whose serving function picks an adapter per
    example, so that one SavedModel serves several fine-tunes.

    The endpoint `serve` (also the `serving_default` signature) takes the
    model's inputs plus `adapter_index`, int32 of shape `(batch,)`: example
    `i` goes through `adapter_names[adapter_index[i]]`, and `-1` (or the
    position of `"__base__"` in `adapter_names`) through the base model, as
    inside `keras_lora.adapter_per_example`. The adapters stay unmerged and
    are computed factorised, each on the whole batch. An index outside
    `[-1, len(adapter_names))` cannot be checked in the served graph; such
    an example gets the base output.

    Args:
        model: an unmerged LoRA model.
        directory: where to write the SavedModel.
        adapter_names: the adapters the index refers to, each once.
        input_signature: the model's input signature as `model.export` takes
            it (a list with one spec per positional argument); `None` takes
            it from a Sequential or Functional model's inputs. Required for
            a subclassed model.
        verbose: print a summary of the endpoint.

    Raises:
        ValueError: if the model has no LoRA layer, is merged, lacks a named
            adapter in some LoRA layer or uses DoRA there (as
            `keras_lora.adapter_per_example`), or is subclassed and
            `input_signature` is `None`. Nothing is written then.

    Example:

    >>> keras_lora.export_per_example(lora_model, "serving", ["task_a", "task_b"])
    >>> reloaded = tf.saved_model.load("serving")
    >>> y = reloaded.serve(x, adapter_index=np.array([0, 1, -1], "int32"))
    """
    adapters.check_model(model)
    if input_signature is None:
        input_signature = [_input_structure(model)]
    index_spec = keras.InputSpec(shape=(None,), dtype="int32", name="adapter_index")

    def serve(*args):
        *inputs, adapter_index = args
        with adapter_per_example(model, adapter_names, adapter_index):
            return model(*inputs, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[*input_signature, index_spec])
    archive.write_out(directory, verbose=verbose)


def _input_structure(model: keras.Model):
    """The symbolic inputs of a Sequential or Functional model, in the
    structure its `call` takes (a tensor, a list or a dict)."""
    try:
        if isinstance(model, keras.Sequential):
            return model.inputs[0]
        return model.input
    except AttributeError:
        raise ValueError(
            f"Model '{model.name}' has no symbolic inputs to take the serving "
            "signature from (a subclassed or unbuilt model); pass "
            "`input_signature`, "
            "e.g. [keras.InputSpec(shape=(None, 16), dtype='float32')]. "
            "Received: input_signature=None"
        ) from None
