"""LoraVariant: how an adapter is created, computed, merged and unmerged.

A `LoraAdapter` picks its variant once, from its settings (`adapter.variant`):
plain LoRA, this module, or DoRA (`keras_lora.layers.dora.DoraVariant`).
`LoraLayer` calls the variant of each adapter and so holds no branch on the
kind of adapter, as peft's `LoraVariant` does. A variant holds no state: its
methods take the `LoraLayer` and the `LoraAdapter`.
"""

from __future__ import annotations

from keras import ops


class LoraVariant:
    """Plain LoRA: the update `scale * B(A(x))`, merged as `scale * delta`."""

    @staticmethod
    def check(layer) -> None:
        """Refuses the variant on a layer that cannot compute it, before the
        adapter is added.

        Args:
            layer: the `LoraLayer` the adapter is added to.
        """

    @staticmethod
    def create(layer, adapter) -> None:
        """Creates the variant's own variables, once the factors are created
        and initialised.

        Args:
            layer: the built `LoraLayer` holding `adapter`.
            adapter: the new `LoraAdapter`.
        """

    @staticmethod
    def output(layer, adapter, outputs, dropped_inputs, training=None):
        """Returns `outputs` plus the adapter's contribution, factorised.

        Args:
            layer: the unmerged `LoraLayer` holding `adapter`.
            adapter: an active `LoraAdapter` of `layer`.
            outputs: the layer's outputs so far (before the activation): the
                base output plus the adapters before this one.
            dropped_inputs: the inputs after this adapter's dropout.
            training: whether the call trains.

        Returns:
            The outputs with the adapter applied, in their dtype.
        """
        update = layer.scaled_output(adapter, dropped_inputs, negated=True)
        return add_negated(outputs, update)

    @staticmethod
    def merge(layer, adapter, kernel):
        """Returns `kernel` with the adapter folded in: `kernel + scale * delta`.

        Args:
            layer: the unmerged `LoraLayer` holding `adapter`.
            adapter: a `LoraAdapter` of `layer`.
            kernel: the float32 kernel so far (the base kernel plus the
                adapters folded in before this one).

        Returns:
            A float32 tensor shaped like the base kernel.
        """
        return kernel + layer.scaled_delta(adapter)

    @staticmethod
    def prepare_unmerge(layer, adapter) -> None:
        """Keeps what `unmerge` needs once `merge`'s kernel is written (the
        base kernel it came from is then gone). Called by `LoraLayer.merge`.

        Args:
            layer: the unmerged `LoraLayer` holding `adapter`.
            adapter: the `LoraAdapter` about to be merged.
        """

    @staticmethod
    def unmerge(layer, adapter, kernel):
        """Undoes `merge`.

        Args:
            layer: the merged `LoraLayer` holding `adapter`.
            adapter: a merged `LoraAdapter` of `layer`.
            kernel: the float32 kernel with this adapter (and any merged
                before it) folded in.

        Returns:
            The float32 kernel without this adapter.
        """
        return kernel - layer.scaled_delta(adapter)


def add_negated(outputs, negated_update):
    """`outputs + update`, computed as `outputs - (-update)`: the same bits.

    TensorFlow's oneDNN remapper fails on MatMul or Conv + BiasAdd + Add +
    activation when an adapter update is the Add's other input, and then skips
    the whole optimisation pass; a subtraction is outside its pattern. The
    update is negated through `B`, the small factor, for free (see
    `LoraLayer.scaled_output`).

    Args:
        outputs: a tensor.
        negated_update: `-update`, broadcastable against `outputs`.

    Returns:
        `outputs + update`, in the dtype of `outputs`.
    """
    return ops.subtract(outputs, ops.cast(negated_update, outputs.dtype))
