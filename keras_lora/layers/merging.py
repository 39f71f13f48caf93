"""Merging: folding a `LoraLayer`'s adapters into its base kernel and back."""

from __future__ import annotations

from keras import ops

from keras_lora.layers.adapter import LoraAdapter


class Merging:
    """Merges and unmerges the adapters of a `LoraLayer`, each by its variant
    (`keras_lora.layers.variant`), and gives their deltas.

    Uses the layer's `kernel_variable`, its `delta` hook and the adapter state
    of `keras_lora.layers.named_adapters.NamedAdapters`.
    """

    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        """Folds `scale * delta` of adapters into the base kernel, in place.

        A merged layer's call is the base layer's call.

        Args:
            adapter_names: adapters to merge; `None` means the active ones.
            safe: check the merged kernel is finite before writing it.

        Raises:
            ValueError: as `merged_kernel`; nothing is written then.
        """
        names = self._active_adapters if adapter_names is None else adapter_names
        merged = self.merged_kernel(names, safe=safe)
        for name in names:
            adapter = self._adapters[name]
            adapter.variant.prepare_unmerge(self, adapter)
        kernel = self.kernel_variable
        kernel.assign(ops.cast(merged, kernel.dtype))
        self._merged_adapters = list(names)

    def merged_kernel(self, adapter_names: list[str] | None = None, safe: bool = False):
        """Returns the base kernel with adapters folded in, without writing it.

        `merge()` writes this; a caller merging several layers all or nothing
        checks every layer with it first.

        Args:
            adapter_names: adapters to fold in; `None` means the active ones.
            safe: check the result is finite.

        Returns:
            A float32 tensor shaped like the base kernel.

        Raises:
            ValueError: if already merged, a name is unknown, the adapters are
                disabled, the base is quantized, or (`safe=True`) the result is
                not finite.
        """
        names = self._check_names(
            "adapter_names",
            self._active_adapters if adapter_names is None else adapter_names,
        )
        if self._merged_adapters:
            raise ValueError(
                f"Layer '{self.name}' is already merged (adapters "
                f"{self._merged_adapters}). Call `unmerge()` first."
            )
        if not self._adapters_enabled:
            raise ValueError(
                f"Layer '{self.name}' has its adapters disabled; call "
                "`enable_adapters()` before merging."
            )
        self._check_mergeable()
        merged = self._kernel_plus(names)
        if safe and not bool(ops.all(ops.isfinite(merged))):
            raise ValueError(
                f"Merging adapters {names} into layer '{self.name}' gives "
                "non-finite weights; nothing was merged."
            )
        return merged

    def unmerge(self) -> None:
        """Subtracts the merged adapters from the base kernel.

        Raises:
            ValueError: if the layer is not merged.
        """
        if not self._merged_adapters:
            raise ValueError(
                f"Layer '{self.name}' is not merged; there is nothing to unmerge."
            )
        kernel = self.kernel_variable
        restored = ops.cast(kernel, "float32")
        for name in reversed(self._merged_adapters):
            adapter = self._adapters[name]
            restored = adapter.variant.unmerge(self, adapter, restored)
        kernel.assign(ops.cast(restored, kernel.dtype))
        self._merged_adapters = []

    def get_delta_weight(self, adapter_name: str | None = None):
        """Returns `scale * delta` of one adapter, in the base kernel's layout
        (peft's name; `scaled_delta` takes the adapter itself).

        For a DoRA adapter this is its low-rank part only, as in peft; merging
        it also rescales the kernel by its magnitude (see `merged_kernel`).

        Args:
            adapter_name: the adapter; `None` means the active one.

        Returns:
            A float32 tensor shaped like the base kernel.
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_names("adapter_name", [name])
        return self.scaled_delta(self._adapters[name])

    def scaled_delta(self, adapter: LoraAdapter):
        """Returns `scale * delta(lora_a, lora_b)` of `adapter`, in float32.

        Inside a mixed-precision call the factors read in the compute dtype,
        and so does their delta. Variants call it, also while the adapter is
        being created, before it is registered.

        Args:
            adapter: a `LoraAdapter` of this layer, with factors.

        Returns:
            A float32 tensor shaped like the base kernel.
        """
        delta = self.delta(adapter.lora_a, adapter.lora_b) * adapter.scale
        return ops.cast(delta, "float32")

    def _kernel_plus(self, names):
        """The base kernel with the adapters `names` folded in, in order, each
        by its variant, in float32."""
        kernel = ops.cast(self.kernel_variable, "float32")
        for name in names:
            adapter = self._adapters[name]
            kernel = adapter.variant.merge(self, adapter, kernel)
        return kernel

    def _check_mergeable(self) -> None:
        mode = getattr(self.layer, "quantization_mode", None)
        if mode:
            raise ValueError(
                f"Layer '{self.name}' wraps an {mode}-quantized base; merging into "
                "quantized weights would be lossy. Use "
                "`keras_lora.merge_and_unload(model, dequantize=True)` instead."
            )
