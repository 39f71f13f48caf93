"""NumPy conversions, and NumPy references for the LoRA formulas of DESIGN.md."""

from __future__ import annotations

import keras
import numpy as np

from keras_lora.layers import LoraLayer


def numpy(tensor) -> np.ndarray:
    """A tensor or variable of any backend as a NumPy array, in its dtype."""
    return keras.ops.convert_to_numpy(tensor)


def float64(tensor) -> np.ndarray:
    """A tensor or variable of any backend as a float64 NumPy array."""
    return numpy(tensor).astype("float64")


def numpy_weights(layer: LoraLayer, adapter_name=None):
    """`(kernel, bias, A, B, scale)` of the base layer and one adapter, float64."""
    adapter = layer.adapters[adapter_name or layer.active_adapter]
    base = layer.layer
    embedding = isinstance(base, keras.layers.Embedding)
    kernel = base.embeddings if embedding else base.kernel
    bias = getattr(base, "bias", None)
    return (
        float64(kernel),
        None if bias is None else float64(bias),
        float64(adapter.lora_a),
        float64(adapter.lora_b),
        adapter.scale,
    )


def relu(x):
    return np.maximum(x, 0.0)


def numpy_conv(x, kernel, strides, padding, dilation_rate, groups=1):
    """A direct N-d convolution, channels_last, as Keras defines it.

    Args:
        x: `(batch, *spatial, in)`.
        kernel: `(*kernel_size, in / groups, out)`.
        padding: `"valid"`, `"same"` (TensorFlow's split: extra pad at the end)
            or `"causal"` (1-D: left pad only).
    """
    kernel_size = kernel.shape[:-2]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation_rate, strict=True)]
    if padding == "same":
        pads = []
        for size, span, stride in zip(x.shape[1:-1], spans, strides, strict=True):
            total = max((-(-size // stride) - 1) * stride + span - size, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "causal":
        pads = [(spans[0] - 1, 0)]
    else:
        pads = [(0, 0)] * len(kernel_size)
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_sizes = [
        (size - span) // stride + 1
        for size, span, stride in zip(x.shape[1:-1], spans, strides, strict=True)
    ]
    in_per_group = kernel.shape[-2]
    out_per_group = kernel.shape[-1] // groups
    outputs = np.zeros((x.shape[0], *out_sizes, kernel.shape[-1]))
    for offset in np.ndindex(*kernel_size):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(
                offset, dilation_rate, out_sizes, strides, strict=True
            )
        )
        patch = x[(slice(None), *window)]
        for g in range(groups):
            cols = slice(g * out_per_group, (g + 1) * out_per_group)
            rows = slice(g * in_per_group, (g + 1) * in_per_group)
            outputs[..., cols] += patch[..., rows] @ kernel[offset][:, cols]
    return outputs


def numpy_conv_delta(lora_a, lora_b, groups=1):
    """`einsum('...ir,ro->...io', A, B)` per group, as DESIGN.md states it."""
    rank, filters = lora_a.shape[-1], lora_b.shape[-1]
    rank_per_group, filters_per_group = rank // groups, filters // groups
    b = lora_b.reshape(rank_per_group, filters)
    delta = np.zeros((*lora_a.shape[:-1], filters))
    for g in range(groups):
        ranks = slice(g * rank_per_group, (g + 1) * rank_per_group)
        cols = slice(g * filters_per_group, (g + 1) * filters_per_group)
        delta[..., cols] = np.einsum("...ir,ro->...io", lora_a[..., ranks], b[:, cols])
    return delta
