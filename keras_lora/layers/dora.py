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
the outputs). This module holds the math, as the variant `DoraVariant` that
a DoRA adapter picks (see `keras_lora.layers.variant`).
"""

from __future__ import annotations

from keras import ops

from keras_lora.layers.variant import LoraVariant


class DoraVariant(LoraVariant):
    """DoRA: the adapted kernel's direction, rescaled by a trainable magnitude
    `m` per output unit (`lora_magnitude_vector`)."""

    @staticmethod
    def check(layer) -> None:
        """Refuses DoRA on a layer that cannot compute it.

        Args:
            layer: a `LoraLayer`.

        Raises:
            ValueError: if the layer type defines no `norm_axes`, or the base
                is quantized (the weight norm needs the float kernel at every
                step, and keras_lora dequantizes only outside the graph).
        """
        if layer.norm_axes is None:
            raise ValueError(
                f"{type(layer).__name__} does not support DoRA: it defines no "
                "`norm_axes` hook. Received: use_dora=True"
            )
        mode = getattr(layer.layer, "quantization_mode", None)
        if mode:
            raise ValueError(
                f"Layer '{layer.name}' wraps an {mode}-quantized base; DoRA needs "
                "the float kernel for its weight norm at every step, which "
                "keras_lora does not dequantize. Adapt the float model, or use "
                "use_dora=False. Received: use_dora=True"
            )

    @staticmethod
    def create(layer, adapter) -> None:
        """Creates the magnitude, from the factors as initialised, over the
        base kernel as the adapter sees it (see `LoraAdapter.create_magnitude`).
        """
        adapter.create_magnitude(weight_norm(layer, adapter))

    @staticmethod
    def output(layer, adapter, outputs, dropped_inputs, training=None):
        """`outputs + (m / ||V|| - 1) * (y - b) + (m / ||V||) * scale * B(A(x))`,
        the norm a constant in the gradient; see `LoraVariant.output`."""
        update = layer.scaled_output(adapter, dropped_inputs)
        norm = ops.stop_gradient(weight_norm(layer, adapter))
        factor = _magnitude(adapter) / norm
        factor = layer.output_layout(factor, len(outputs.shape))
        factor = ops.cast(factor, outputs.dtype)
        if adapter.dropout_layer is not None and training:
            # As peft: the magnitude rescales the base output of the input the
            # adapter sees, computed again on the dropped-out input.
            base = layer.base_output(dropped_inputs, training=training)
        else:
            base = outputs
        bias = layer.output_bias()
        if bias is not None:
            base = base - ops.cast(bias, base.dtype)
        update = ops.cast(update, outputs.dtype)
        return outputs + (factor - 1) * base + factor * update

    @staticmethod
    def merge(layer, adapter, kernel):
        """`m / ||W + dW|| * (kernel + dW)`: the norm is that of the base
        kernel `W` plus this adapter's update `dW`, as the factorised output
        uses, also with adapters before this one already in `kernel`."""
        factor = _kernel_factor(layer, adapter, weight_norm(layer, adapter))
        return factor * (kernel + layer.scaled_delta(adapter))

    @staticmethod
    def prepare_unmerge(layer, adapter) -> None:
        """Keeps the weight norm `merge` divides by in `adapter.weight_norm`."""
        adapter.weight_norm.assign(weight_norm(layer, adapter))

    @staticmethod
    def unmerge(layer, adapter, kernel):
        """Undoes `merge`, with the norm `prepare_unmerge` kept."""
        factor = _kernel_factor(layer, adapter, adapter.weight_norm)
        return kernel / factor - layer.scaled_delta(adapter)


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
        ValueError: as `DoraVariant.check`.
    """
    DoraVariant.check(layer)
    kernel = layer.kernel_variable if kernel is None else kernel
    adapted = ops.cast(kernel, "float32") + layer.scaled_delta(adapter)
    return ops.sqrt(ops.sum(ops.square(adapted), axis=layer.norm_axes))


def _magnitude(adapter):
    return ops.cast(adapter.lora_magnitude_vector, "float32")


def _kernel_factor(layer, adapter, norm):
    """`m / norm` shaped to broadcast against the kernel (norm axes kept)."""
    shape = list(layer.kernel_variable.shape)
    for axis in layer.norm_axes:
        shape[axis] = 1
    return ops.reshape(_magnitude(adapter) / ops.cast(norm, "float32"), shape)
