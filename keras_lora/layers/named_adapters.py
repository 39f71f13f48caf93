"""NamedAdapters: the named adapters a `LoraLayer` holds, and which of them
are active, merged or enabled."""

from __future__ import annotations

import keras

from keras_lora.layers.adapter import LoraAdapter
from keras_lora.layers.initialization import check_init
from keras_lora.tree.keras_private import unlocked_state


class NamedAdapters:
    """Adds, activates and deletes the named adapters of a `LoraLayer`.

    The state lives in four attributes `LoraLayer.__init__` sets:
    `_adapters` (name to `LoraAdapter`, in creation order),
    `_active_adapters`, `_merged_adapters` and `_adapters_enabled`. Adding an
    adapter calls back into the layer for its per-type checks
    (`check_settings`) and, once built, `_create_factors`.
    """

    @property
    def lora_a(self) -> keras.Variable:
        """The `lora_a` variable of the (first) active adapter."""
        return self._adapters[self.active_adapter].lora_a

    @property
    def lora_b(self) -> keras.Variable:
        """The `lora_b` variable of the (first) active adapter."""
        return self._adapters[self.active_adapter].lora_b

    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        """A new dict of adapter name to `LoraAdapter`, in creation order."""
        return dict(self._adapters)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of every adapter, in creation order."""
        return tuple(self._adapters)

    @property
    def active_adapter(self) -> str:
        """Name of the (first) active adapter."""
        return self._active_adapters[0]

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """Names of the active adapters; their outputs are summed."""
        return tuple(self._active_adapters)

    @property
    def merged(self) -> bool:
        """Whether adapters are folded into the base weights."""
        return bool(self._merged_adapters)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """Names of the adapters folded into the base weights."""
        return tuple(self._merged_adapters)

    @property
    def adapters_enabled(self) -> bool:
        """False between `disable_adapters()` and `enable_adapters()`."""
        return self._adapters_enabled

    def add_adapter(
        self,
        adapter_name: str,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | bool = "default",
        use_dora: bool = False,
    ) -> None:
        """Adds a new adapter with its own settings; it is inactive (and not
        trainable) until `set_adapter` names it.

        Args:
            adapter_name: a new name.
            rank, alpha, dropout, use_rslora, init, use_dora: as in the
                constructor; see `keras_lora.layers.AdapterSettings`.

        Raises:
            ValueError: if the name exists or a setting is invalid, the layer
                type refuses a setting (`check_settings`), DoRA is asked of a
                quantized base or a layer type without DoRA hooks, or the init
                cannot apply (see
                `keras_lora.layers.initialization.check_init`).
        """
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(
                "`adapter_name` must be a non-empty string. "
                f"Received: adapter_name={adapter_name!r}"
            )
        if adapter_name in self._adapters:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter named "
                f"'{adapter_name}'; pick another name or delete it first. "
                f"Received: adapter_name={adapter_name!r}"
            )
        adapter = LoraAdapter(
            rank,
            alpha,
            dropout,
            use_rslora,
            init,
            use_dora,
            name=adapter_name,
            dtype=self.dtype_policy,
        )
        self.check_settings(adapter.adapter_settings)
        check_init(self, adapter)
        adapter.variant.check(self)
        adapter.trainable = False
        with unlocked_state(self):
            if self.built:
                self._create_factors(adapter)
            self._adapters[adapter_name] = adapter

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Makes the named adapter(s) active and trainable, the others inactive
        and frozen; the outputs of several active adapters are summed.

        Args:
            adapter_names: a name, or a list of names.

        Raises:
            ValueError: if a name is unknown or the layer is merged.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        names = self._check_names("adapter_names", names)
        self._check_not_merged("set_adapter")
        self._activate(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter; if it was active, the first remaining one is.

        Args:
            adapter_name: the adapter to delete.

        Raises:
            ValueError: if the name is unknown, it is the last adapter, or the
                layer is merged.
        """
        self._check_names("adapter_name", [adapter_name])
        if len(self._adapters) == 1:
            raise ValueError(
                f"Cannot delete '{adapter_name}': it is the last adapter of layer "
                f"'{self.name}'. Use `keras_lora.unload` to drop LoRA entirely."
            )
        self._check_not_merged("delete_adapter")
        with unlocked_state(self):
            self._adapters.pop(adapter_name)
        active = [name for name in self._active_adapters if name != adapter_name]
        self._activate(active or [next(iter(self._adapters))])

    def disable_adapters(self) -> None:
        """Makes the layer compute the base output only, until re-enabled.

        Raises:
            ValueError: if the layer is merged.
        """
        self._check_not_merged("disable_adapters")
        self._adapters_enabled = False

    def enable_adapters(self) -> None:
        """Undoes `disable_adapters()`."""
        self._adapters_enabled = True

    def _activate(self, names: list[str]) -> None:
        # As in peft, only active adapters train.
        self._active_adapters = list(names)
        for name, adapter in self._adapters.items():
            adapter.trainable = name in self._active_adapters

    def _check_names(self, argument: str, names) -> list[str]:
        names = list(names)
        unknown = [name for name in names if name not in self._adapters]
        if unknown or not names:
            raise ValueError(
                f"`{argument}` must name adapters of layer '{self.name}': "
                f"{list(self._adapters)}. Received: {argument}={names!r}"
            )
        return names

    def _check_not_merged(self, operation: str) -> None:
        if self._merged_adapters:
            raise ValueError(
                f"Cannot {operation} on layer '{self.name}' while adapters "
                f"{self._merged_adapters} are merged. Call `unmerge()` first."
            )
