"""LoraConv1D, LoraConv2D, LoraConv3D: LoRA for Keras' convolutions.

One generic class does the work; the three public classes only name the Keras
class they adapt.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_lora.layers.base import LoraLayer


class LoraConv(LoraLayer):
    """LoRA adapter around a `keras.layers.Conv1D`, `Conv2D` or `Conv3D`.

    `outputs = activation(conv(x, W) + b + scale * conv_B(conv_A(dropout(x))))`
    where `conv_A` has the base's kernel size, strides, padding, dilation and
    groups, with kernel `(k..., in / groups, rank)`, and `conv_B` is a 1x1
    convolution with kernel `(1..., rank / groups, filters)`. With groups,
    `rank` must be divisible by `groups`, as in peft. With DoRA the magnitude
    has one entry per filter, the norm running over all other kernel axes.

    Args:
        layer: the convolution layer to adapt, built or not.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: the convolution's input tensor.
        training: Python bool; enables adapter dropout.
    """

    def check_settings(self, settings):
        groups = self.layer.groups
        if settings.rank % groups:
            raise ValueError(
                f"{type(self).__name__} '{self.layer.name}' has groups={groups}; "
                f"`rank` must be divisible by it. Received: rank={settings.rank}"
            )

    def check_matrix_view(self, operation):
        groups = self.layer.groups
        if groups > 1:
            raise ValueError(
                f"{type(self).__name__} '{self.layer.name}' has groups={groups}: "
                "its update is one matrix per group, not one (fan_in x fan_out) "
                f"matrix, so it does not support {operation}. Received: "
                f"{operation} on a layer with groups={groups}"
            )

    def max_rank(self):
        # Each group's update is a (k... * in/groups, filters/groups) matrix
        # of rank at most rank/groups.
        *kernel_size, in_per_group, filters = self.kernel_variable.shape
        groups = self.layer.groups
        fan_in = math.prod(kernel_size) * in_per_group
        return groups * min(fan_in, filters // groups)

    def factor_shapes(self, rank):
        *kernel_size, in_per_group, filters = self.kernel_variable.shape
        groups = self.layer.groups
        ones = (1,) * len(kernel_size)
        return (*kernel_size, in_per_group, rank), (*ones, rank // groups, filters)

    @property
    def norm_axes(self):
        # Every kernel axis but the filters: the spatial ones and the inputs.
        return tuple(range(self.layer.rank + 1))

    def output_layout(self, values, ndim):
        if self.layer.data_format == "channels_first":
            return ops.reshape(values, (-1, *[1] * (ndim - 2)))
        return values

    def output_bias(self):
        bias = super().output_bias()
        return None if bias is None else self.output_layout(bias, self.layer.rank + 2)

    def adapter_output(self, x, lora_a, lora_b):
        base = self.layer
        padding = base.padding
        if padding == "causal":
            left = base.dilation_rate[0] * (base.kernel_size[0] - 1)
            pad = [[0, 0], [left, 0], [0, 0]]
            if base.data_format == "channels_first":
                pad = [[0, 0], [0, 0], [left, 0]]
            x = ops.pad(x, pad)
            padding = "valid"
        hidden = ops.conv(
            x,
            lora_a,
            strides=list(base.strides),
            padding=padding,
            dilation_rate=base.dilation_rate,
            data_format=base.data_format,
        )
        return ops.conv(hidden, lora_b, padding="valid", data_format=base.data_format)

    def delta(self, lora_a, lora_b):
        groups = self.layer.groups
        *kernel_size, in_per_group, rank = lora_a.shape
        filters = lora_b.shape[-1]
        a = ops.reshape(lora_a, (*kernel_size, in_per_group, groups, rank // groups))
        b = ops.reshape(lora_b, (rank // groups, groups, filters // groups))
        # Spelled out, not "...igs,sgt->...igt": TensorFlow 2.21's CPU einsum
        # corrupts memory with that ellipsis form (intermittent segfaults).
        spatial = "xyz"[: len(kernel_size)]
        grouped = ops.einsum(f"{spatial}igs,sgt->{spatial}igt", a, b)
        return ops.reshape(grouped, (*kernel_size, in_per_group, filters))


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraConv1D(LoraConv):
    """LoRA adapter around a `keras.layers.Conv1D` (causal padding included).

    See `keras_lora.layers.LoraConv` for the formula and arguments.

    Args:
        layer: the `keras.layers.Conv1D` layer to adapt, built or not.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`.
        **kwargs: base layer arguments such as `name`.

    Example:

    >>> layer = keras_lora.LoraConv1D(keras.layers.Conv1D(8, 3), rank=4)
    >>> layer(np.ones((2, 10, 4))).shape
    (2, 8, 8)
    """

    base_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraConv2D(LoraConv):
    """LoRA adapter around a `keras.layers.Conv2D`.

    See `keras_lora.layers.LoraConv` for the formula and arguments.

    Args:
        layer: the `keras.layers.Conv2D` layer to adapt, built or not.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`.
        **kwargs: base layer arguments such as `name`.

    Example:

    >>> layer = keras_lora.LoraConv2D(keras.layers.Conv2D(8, 3), rank=4)
    >>> layer(np.ones((2, 10, 10, 4))).shape
    (2, 8, 8, 8)
    """

    base_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraConv3D(LoraConv):
    """LoRA adapter around a `keras.layers.Conv3D`.

    See `keras_lora.layers.LoraConv` for the formula and arguments.

    Args:
        layer: the `keras.layers.Conv3D` layer to adapt, built or not.
        rank, alpha, dropout, use_rslora, init, use_dora, adapter_name: the
            first adapter, see `keras_lora.layers.LoraLayer`.
        **kwargs: base layer arguments such as `name`.

    Example:

    >>> layer = keras_lora.LoraConv3D(keras.layers.Conv3D(8, 3), rank=4)
    >>> layer(np.ones((2, 6, 6, 6, 4))).shape
    (2, 4, 4, 4, 8)
    """

    base_class = keras.layers.Conv3D
