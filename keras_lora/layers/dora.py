"""DoRA: weight-decomposed low-rank adaptation, as peft 0.21 computes it.

DoRA (Liu et al. 2024, arXiv 2402.09353) splits the adapted kernel
`V = W + scale * delta` into a direction and a trainable magnitude `m`, one
per output unit: the layer computes with `m * V / ||V||`, where `||V||` is the
norm of each output unit's kernel slice (over the wrapper's `norm_axes`). The
norm is treated as a constant in the gradient (the paper's section 4.3), so
only `A`, `B` and `m` get gradients. Factorised, for an adapter added on top
of outputs `y = x W + b` (plus any adapters before it), this is

    y + (m / ||V|| - 1) * (y - b) + (m / ||V||) * scale * B(A(x))

and when dropout is active the `(y - b)` term is the base layer's output on
the dropped-out input instead, as in peft's `DoraLinearLayer.forward`.

Each wrapper type supplies two hooks: `norm_axes` (the kernel axes the norm
reduces; the other axes are the output units `m` has one entry per) and
`output_layout(values, ndim)` (a per-unit tensor laid out to broadcast against
the outputs). This module holds the math; `LoraLayer` calls it.
"""

from __future__ import annotations

from keras import ops


def check_supported(layer) -> None:
    """Refuses DoRA on a layer that cannot compute it.

    Args:
        layer: a `LoraLayer`.

    Raises:
        ValueError: if the layer type defines no `norm_axes`, or the base is
            quantized (the weight norm needs the float kernel at every step,
            and keras_lora dequantizes only outside the graph).
    """
    if layer.norm_axes is None:
        raise ValueError(
            f"{type(layer).__name__} does not support DoRA: it defines no "
            "`norm_axes` hook. Received: use_dora=True"
        )
    mode = getattr(layer.layer, "quantization_mode", None)
    if mode:
        raise ValueError(
            f"Layer '{layer.name}' wraps an {mode}-quantized base; DoRA needs the "
            "float kernel for its weight norm at every step, which keras_lora "
            "does not dequantize. Adapt the float model, or use use_dora=False. "
            "Received: use_dora=True"
        )


def weight_norm(layer, adapter, kernel=None):
    """Returns `||kernel + scale * delta||` per output unit, in float32.

    Args:
        layer: the `LoraLayer` holding `adapter`.
        adapter: a `LoraAdapter` of `layer`.
        kernel: the kernel to add the update to; `None` means the base kernel.

    Returns:
        A float32 tensor with one entry per output unit (the kernel's shape
        without `layer.norm_axes`).

    Raises:
        ValueError: as `check_supported`.
    """
    check_supported(layer)
    kernel = layer.kernel_variable if kernel is None else kernel
    adapted = ops.cast(kernel, "float32") + layer._scaled_delta(adapter)
    return ops.sqrt(ops.sum(ops.square(adapted), axis=layer.norm_axes))


def output(layer, adapter, outputs, dropped_inputs, update, training=None):
    """Returns `outputs` plus a DoRA adapter's contribution, factorised.

    Args:
        layer: the `LoraLayer` holding `adapter`, unmerged.
        adapter: a DoRA `LoraAdapter` of `layer`.
        outputs: the layer's outputs so far (before the activation): the base
            output plus the adapters before this one.
        dropped_inputs: the inputs after this adapter's dropout.
        update: `scale * B(A(dropped_inputs))`.
        training: whether the call trains (dropout is active).

    Returns:
        The outputs with the adapter applied, in their dtype.
    """
    norm = ops.stop_gradient(weight_norm(layer, adapter))
    factor = _magnitude(adapter) / norm
    factor = ops.cast(layer.output_layout(factor, len(outputs.shape)), outputs.dtype)
    if adapter.dropout_layer is not None and training:
        # As peft: the magnitude rescales the base output of the input the
        # adapter sees, computed again on the dropped-out input.
        base = layer.base_output(dropped_inputs, training=training)
    else:
        base = outputs
    bias = layer.output_bias()
    if bias is not None:
        base = base - ops.cast(bias, base.dtype)
    return outputs + (factor - 1) * base + factor * ops.cast(update, outputs.dtype)


def merged_kernel(layer, adapter, kernel):
    """Folds a DoRA adapter into `kernel`: `m / ||W + dW|| * (kernel + dW)`.

    The norm is that of the base kernel `W` plus this adapter's update `dW`,
    as the factorised output uses, so that a merged layer computes what the
    unmerged one does, also with adapters before this one already in `kernel`.

    Args:
        layer: the `LoraLayer` holding `adapter`, unmerged.
        adapter: a DoRA `LoraAdapter` of `layer`.
        kernel: the float32 kernel so far (the base kernel plus the adapters
            folded in before this one).

    Returns:
        The float32 kernel with the adapter folded in.
    """
    factor = _kernel_factor(layer, adapter, weight_norm(layer, adapter))
    return factor * (kernel + layer._scaled_delta(adapter))


def unmerged_kernel(layer, adapter, kernel):
    """Undoes `merged_kernel`, with the norm `remember_norm` kept.

    Args:
        layer: the `LoraLayer` holding `adapter`, merged.
        adapter: a merged DoRA `LoraAdapter` of `layer`.
        kernel: the float32 kernel with this adapter (and any before it)
            folded in.

    Returns:
        The float32 kernel without this adapter.
    """
    factor = _kernel_factor(layer, adapter, adapter.weight_norm)
    return kernel / factor - layer._scaled_delta(adapter)


def remember_norm(layer, adapter) -> None:
    """Keeps the weight norm a merge divides by, so that unmerging can divide
    it back: once merged, the base kernel it came from is gone.

    Args:
        layer: the `LoraLayer` holding `adapter`, before merging.
        adapter: a DoRA `LoraAdapter` of `layer`.
    """
    adapter.weight_norm.assign(weight_norm(layer, adapter))


def _magnitude(adapter):
    return ops.cast(adapter.lora_magnitude_vector, "float32")


def _kernel_factor(layer, adapter, norm):
    """`m / norm` shaped to broadcast against the kernel (norm axes kept)."""
    shape = list(layer.kernel_variable.shape)
    for axis in layer.norm_axes:
        shape[axis] = 1
    return ops.reshape(_magnitude(adapter) / ops.cast(norm, "float32"), shape)
