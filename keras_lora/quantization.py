"""Quantized bases: Keras' int8/int4 kernels read back as floats, and the
dequantizing merge behind `merge_and_unload(model, dequantize=True)`.

A LoRA layer trains over a base that `model.quantize("int8")` (or `"int4"`)
quantized as it does over a float one: the base stays quantized and frozen,
the adapters are float32. Merging cannot fold a float update into int8 weights
without re-quantizing (lossy), so the merge is refused; dequantizing instead
gives a float layer whose kernel is the base kernel as Keras itself computes
it in `call`, plus the adapters' update.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_lora.adapters import lora_layers
from keras_lora.compiled_state import reset_traced_functions
from keras_lora.layers.base import LoraLayer
from keras_lora.tree.keras_private import einsum_kernel_scale
from keras_lora.tree.rebuild import rebuild

SUPPORTED_MODES = ("int8", "int4")

# The variable each quantized layer class stores its (quantized) kernel in.
_KERNEL_NAMES = {
    keras.layers.Dense: "kernel",
    keras.layers.EinsumDense: "kernel",
    keras.layers.Embedding: "embeddings",
}


def dequantized_kernel(layer: keras.layers.Layer) -> np.ndarray:
    """Returns the float32 kernel a quantized layer computes with.

    The same dequantization as the layer's own `call`: `q / scale` per output
    channel for int8 and per-channel int4, `(q - zero) * scale` per group for
    sub-channel int4 (Embedding: per row, per group of columns).

    Args:
        layer: a `keras.layers.Dense`, `EinsumDense` or `Embedding` quantized by
            Keras in mode `"int8"` or `"int4"`.

    Returns:
        A float32 array shaped like the layer's float kernel (`embeddings`).

    Raises:
        ValueError: if the layer is not quantized, or in another mode, or of
            another class.

    Example:

    >>> dense.quantize("int8")
    >>> keras_lora.quantization.dequantized_kernel(dense).shape
    (8, 4)
    """
    kernel_name = _kernel_name(layer)
    mode = layer.quantization_mode
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"Layer '{layer.name}' is not quantized in a mode keras_lora can "
            f"dequantize ({', '.join(SUPPORTED_MODES)}). "
            f"Received: quantization_mode={mode!r}"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras' built-in LoRA enabled; its kernel "
            "property adds that update, so it cannot be dequantized here."
        )
    # The public property unpacks int4 values to the kernel's own layout.
    quantized = _numpy(getattr(layer, kernel_name)).astype("float32")
    scale_name = f"{kernel_name}_scale"
    scale = _numpy(getattr(layer, scale_name))
    zero = getattr(layer, f"{kernel_name}_zero", None)
    zero = None if zero is None else _numpy(zero)
    groups = None if zero is None else _numpy(layer.g_idx).astype("int64")
    if isinstance(layer, keras.layers.Embedding):
        # One scale per row (per group of columns in sub-channel int4).
        if zero is None:
            return quantized / scale[:, None]
        return _dequantize_groups(quantized, scale, zero, groups, axis=1)
    if isinstance(layer, keras.layers.EinsumDense) and mode == "int8":
        return quantized / _numpy(einsum_kernel_scale(layer, scale))
    # Dense, and int4 EinsumDense: a (reduced axes) x (columns) matrix whose
    # columns each have a scale (per group of rows in sub-channel int4).
    columns = scale.shape[-1]
    matrix = quantized.reshape(-1, columns)
    if zero is None:
        matrix = matrix / scale
    else:
        matrix = _dequantize_groups(matrix, scale, zero, groups, axis=0)
    return matrix.reshape(quantized.shape)


def dequantize_and_unload(model: keras.Model, safe: bool = False) -> keras.Model:
    """Returns `model` as a plain float model with the adapters merged; layers
    with a quantized base become float layers of the same class.

    What `keras_lora.merge_and_unload(model, dequantize=True)` runs. Each
    adapted quantized layer is replaced by a new float layer (same class and
    config, the base's unquantized dtype policy) whose kernel is
    `dequantized_kernel(base) + sum(scale * delta)` over the active adapters
    and whose other weights (the bias) are the base's. Adapted float layers
    are merged as `merge_and_unload` does. Layers without adapters are kept as
    they are, quantized or not.

    Args:
        model: a LoRA model.
        safe: check every merged kernel is finite before using it.

    Returns:
        The plain model.

    Raises:
        ValueError: if the model has no LoRA layer, a quantized base is in a
            mode or of a class that cannot be dequantized, adapters are
            disabled, or (`safe=True`) a merged kernel is not finite. The model
            is left unchanged.

    Example:

    >>> served = keras_lora.merge_and_unload(lora_model, dequantize=True)
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer; there is nothing to unload."
        )
    quantized = {
        path: layer
        for path, layer in layers.items()
        if getattr(layer.layer, "quantization_mode", None)
    }
    replacements = {
        id(layer): _float_layer(layer, safe) for layer in quantized.values()
    }
    merged = []
    try:
        for path, layer in layers.items():
            if path not in quantized and not layer.merged:
                layer.merge(safe=safe)
                merged.append(layer)
            if path not in quantized:
                replacements[id(layer)] = layer.layer
        new_model = rebuild(model, replacements)
    except Exception:
        for layer in reversed(merged):
            layer.unmerge()
        raise
    reset_traced_functions(new_model)
    return new_model


def _float_layer(wrapper: LoraLayer, safe: bool) -> keras.layers.Layer:
    """A float copy of `wrapper`'s quantized base with the active adapters
    merged into its kernel."""
    base = wrapper.layer
    if not wrapper.adapters_enabled:
        raise ValueError(
            f"Layer '{wrapper.name}' has its adapters disabled; enable them "
            "before merging."
        )
    kernel = dequantized_kernel(base)
    for name in wrapper.active_adapters:
        kernel = kernel + _numpy(wrapper.get_delta_weight(name))
    if safe and not np.all(np.isfinite(kernel)):
        raise ValueError(
            f"Merging adapters {list(wrapper.active_adapters)} into layer "
            f"'{wrapper.name}' gives non-finite weights; nothing was merged."
        )
    config = base.get_config()
    config.pop("quantization_config", None)
    # The wrapper computes in the base's dtypes without quantization.
    config["dtype"] = wrapper.dtype_policy
    layer = type(base).from_config(config)
    # Embedding may be built without an input shape (and needs none).
    layer.build((base.get_build_config() or {}).get("input_shape"))
    kernel_name = _kernel_name(base)
    base_weights = {variable.name: variable for variable in base.weights}
    for variable in layer.weights:
        if variable.name == kernel_name:
            value = kernel
        elif variable.name in base_weights:
            value = base_weights[variable.name]
        else:
            raise ValueError(
                f"Cannot dequantize layer '{base.name}': its float form has a "
                f"variable '{variable.name}' the quantized layer does not hold."
            )
        variable.assign(ops.cast(value, variable.dtype))
    return layer


def _kernel_name(layer) -> str:
    for cls, name in _KERNEL_NAMES.items():
        if isinstance(layer, cls):
            return name
    supported = ", ".join(cls.__name__ for cls in _KERNEL_NAMES)
    raise ValueError(
        f"keras_lora can dequantize {supported} layers only. "
        f"Received: layer '{layer.name}' of type {type(layer).__name__}"
    )


def _dequantize_groups(quantized, scale, zero, groups, axis):
    """`(q - zero) * scale` with the per-group `scale` and `zero` spread along
    `axis` by the group index of each position (Keras' sub-channel int4)."""
    scale = np.take(scale, groups, axis=axis)
    zero = np.take(zero, groups, axis=axis).astype(scale.dtype)
    return (quantized - zero) * scale


def _numpy(value) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(value))
