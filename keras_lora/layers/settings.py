"""AdapterSettings: the validated settings of one adapter, and the values
`init` takes."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

# "pissa_niter_<K>" stands for "pissa_niter_0", "pissa_niter_1", ...: PiSSA
# from a randomized SVD with K subspace iterations.
INIT_METHODS = (
    "default",
    "gaussian",
    "pissa",
    "pissa_niter_<K>",
    "olora",
    "orthogonal",
    False,
)
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """The settings of one adapter, checked when created.

    `scale = alpha / rank` (`alpha / sqrt(rank)` with `use_rslora`) multiplies
    the adapter's update. A `LoraAdapter` holds one; `LoraConfig` resolves a
    layer path to one (`LoraConfig.adapter_settings`).

    Args:
        rank: the adapter rank, a positive integer (stored as an `int`).
        alpha: the scaling numerator, a positive number; `None` means `rank`.
            Stored as a `float`.
        dropout: dropout rate on the adapter input in training, in `[0, 1)`.
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA).
        init: how the factors start, one of `INIT_METHODS` (K a number of
            iterations); `"orthogonal"` needs an even rank. See
            `keras_lora.layers.initialization`.
        use_dora: make the adapter DoRA (see `keras_lora.layers.dora`).

    Raises:
        TypeError: if `use_rslora` or `use_dora` is not a bool.
        ValueError: if another value is out of range or of the wrong type.

    Example:

    >>> settings = keras_lora.layers.AdapterSettings(rank=4, alpha=8)
    >>> settings.scale
    2.0
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str | bool = "default"
    use_dora: bool = False

    def __post_init__(self):
        rank, alpha, dropout = self.rank, self.alpha, self.dropout
        if (
            isinstance(rank, bool)
            or not isinstance(rank, numbers.Integral)
            or rank <= 0
        ):
            raise ValueError(
                f"`rank` must be a positive integer. Received: rank={rank!r}"
            )
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not alpha > 0
            or not math.isfinite(alpha)
        ):
            raise ValueError(
                "`alpha` must be a positive number, or None to use `rank`. "
                f"Received: alpha={alpha!r}"
            )
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0.0 <= dropout < 1.0
        ):
            raise ValueError(
                f"`dropout` must be a number in [0, 1). Received: dropout={dropout!r}"
            )
        if not isinstance(self.use_rslora, bool):
            raise TypeError(
                f"`use_rslora` must be a bool. Received: use_rslora={self.use_rslora!r}"
            )
        if not is_init_method(self.init):
            raise ValueError(
                f"`init` must be one of {INIT_METHODS}, K being a number of "
                f"iterations (0, 1, ...). Received: init={self.init!r}"
            )
        if self.init == "orthogonal" and rank % 2:
            raise ValueError(
                "init='orthogonal' needs an even `rank`: A and B each take half "
                f"of an orthogonal basis. Received: rank={rank!r}"
            )
        if not isinstance(self.use_dora, bool):
            raise TypeError(
                f"`use_dora` must be a bool. Received: use_dora={self.use_dora!r}"
            )
        # Plain Python numbers, so that `to_dict` is JSON-serializable.
        object.__setattr__(self, "rank", int(rank))
        object.__setattr__(self, "alpha", float(rank if alpha is None else alpha))
        object.__setattr__(self, "dropout", float(dropout))

    @property
    def scale(self) -> float:
        """`alpha / rank` (`alpha / sqrt(rank)` with `use_rslora`)."""
        divisor = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / divisor

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the settings, in order: `rank`, `alpha`, ..."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a JSON-serializable dict, one key per field
        (the keyword arguments of `LoraLayer.add_adapter`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> AdapterSettings:
        """Creates settings from a dict `to_dict` made (missing keys take
        their defaults).

        Args:
            settings: a dict of setting name to value.

        Returns:
            An `AdapterSettings`.

        Raises:
            ValueError: if a key is unknown, or as the constructor.
        """
        known = cls.field_names()
        unknown = sorted(key for key in settings if key not in known)
        if unknown:
            raise ValueError(
                f"`settings` has keys that AdapterSettings does not know: "
                f"{unknown}. Accepted keys: {list(known)}. "
                f"Received: settings={dict(settings)!r}"
            )
        return cls(**settings)


def is_init_method(init) -> bool:
    """Whether `init` is one of `INIT_METHODS` (with K a non-negative integer).

    Args:
        init: a value passed as `init`.

    Returns:
        True if adapters accept it.
    """
    if init is False:
        return True
    if not isinstance(init, str) or init == "pissa_niter_<K>":
        return False
    return init in INIT_METHODS or _PISSA_NITER.fullmatch(init) is not None


def pissa_iterations(init: str) -> int | None:
    """The K of `"pissa_niter_K"`, or `None` for any other init."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def computes_factors(init) -> bool:
    """Whether `init` computes the factors from the layer (PiSSA, OLoRA,
    orthogonal) rather than drawing them from an initializer."""
    return isinstance(init, str) and (
        init in ("pissa", "olora", "orthogonal") or pissa_iterations(init) is not None
    )


def rewrites_kernel(init) -> bool:
    """Whether `init` replaces the base kernel by a residual (PiSSA, OLoRA)."""
    return computes_factors(init) and init != "orthogonal"
