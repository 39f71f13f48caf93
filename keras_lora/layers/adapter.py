"""One named adapter: its settings, its two factors and its dropout."""

from __future__ import annotations

import math
import numbers

import keras

INIT_METHODS = ("default", "gaussian", False)


def validate_adapter_settings(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str | bool = "default",
) -> None:
    """Checks the settings every adapter shares, as `LoraConfig` does.

    Args:
        rank: the adapter rank, a positive integer.
        alpha: the scaling numerator, a positive number, or `None` for `rank`.
        dropout: the dropout rate on the adapter input, in `[0, 1)`.
        use_rslora: whether the scale is `alpha / sqrt(rank)`.
        init: one of `"default"`, `"gaussian"` or `False`.

    Raises:
        TypeError: if a value has the wrong type.
        ValueError: if a value is out of range.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
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
    if not isinstance(use_rslora, bool):
        raise TypeError(
            f"`use_rslora` must be a bool. Received: use_rslora={use_rslora!r}"
        )
    if not (init is False or (isinstance(init, str) and init in INIT_METHODS)):
        raise ValueError(
            f"`init` must be one of {INIT_METHODS}. Received: init={init!r}"
        )


def factor_initializers(
    init: str | bool,
    rank: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    zero_factor: str = "b",
) -> tuple[keras.initializers.Initializer, keras.initializers.Initializer]:
    """Returns the initializers for `lora_a` and `lora_b`, as peft sets them.

    Args:
        init: `"default"`, `"gaussian"` or `False` (both factors random).
        rank: the adapter rank.
        a_shape: the shape of `lora_a`; every axis but the last is fan-in.
        b_shape: the shape of `lora_b`; its first axis is the rank.
        zero_factor: `"b"` (Dense, EinsumDense, Conv: A uniform, B zeros) or
            `"a"` (Embedding: A zeros, B standard normal).

    Returns:
        A pair `(a_initializer, b_initializer)`.
    """
    if zero_factor == "a":
        # peft: nn.init.normal_ (std 1, not Keras' default 0.05) for B; with
        # init=False both keep torch.randn (std 1).
        if init is False:
            return (
                keras.initializers.RandomNormal(stddev=1.0),
                keras.initializers.RandomNormal(stddev=1.0),
            )
        return keras.initializers.Zeros(), keras.initializers.RandomNormal(stddev=1.0)
    fan_in = math.prod(a_shape[:-1])
    # kaiming_uniform(a=sqrt(5)) on torch's (r, fan_in) weight: bound 1/sqrt(fan_in).
    a_bound = 1.0 / math.sqrt(fan_in)
    if init == "gaussian":
        a_initializer = keras.initializers.RandomNormal(stddev=1.0 / rank)
    else:
        a_initializer = keras.initializers.RandomUniform(-a_bound, a_bound)
    if init is False:
        b_bound = 1.0 / math.sqrt(math.prod(b_shape[:-1]))
        return a_initializer, keras.initializers.RandomUniform(-b_bound, b_bound)
    return a_initializer, keras.initializers.Zeros()


class LoraAdapter(keras.layers.Layer):
    """Holds one named adapter of a `LoraLayer`: its settings and factors.

    The wrapper owns the math; this layer only owns state, so that Keras tracks
    and saves each adapter's variables under the adapter's name.

    Args:
        rank: the adapter rank.
        alpha: the scaling numerator; `None` means `rank`.
        dropout: dropout rate on the adapter input, applied only in training.
        use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        init: how the factors start: `"default"`, `"gaussian"` or `False`.
        **kwargs: base layer arguments (`name` is the adapter name).
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | bool = "default",
        **kwargs,
    ):
        validate_adapter_settings(rank, alpha, dropout, use_rslora, init)
        super().__init__(**kwargs)
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.dropout = float(dropout)
        self.use_rslora = use_rslora
        self.init = init
        self.lora_a = None
        self.lora_b = None
        self.dropout_layer = (
            keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
            if self.dropout
            else None
        )

    @property
    def scale(self) -> float:
        """The factor applied to the adapter output: `alpha / rank` (rsLoRA:
        `alpha / sqrt(rank)`)."""
        divisor = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / divisor

    def create_factors(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        zero_factor: str = "b",
    ) -> None:
        """Creates `lora_a` and `lora_b` as float32 variables.

        Args:
            a_shape: the shape of `lora_a`.
            b_shape: the shape of `lora_b`.
            zero_factor: which factor starts at zero, see `factor_initializers`.
        """
        a_initializer, b_initializer = factor_initializers(
            self.init, self.rank, a_shape, b_shape, zero_factor
        )
        self.lora_a = self.add_weight(
            name="lora_a", shape=a_shape, initializer=a_initializer, dtype="float32"
        )
        self.lora_b = self.add_weight(
            name="lora_b", shape=b_shape, initializer=b_initializer, dtype="float32"
        )
        self.built = True

    def apply_dropout(self, inputs, training=None):
        """Returns `inputs` after this adapter's dropout (identity at rate 0)."""
        if self.dropout_layer is None:
            return inputs
        return self.dropout_layer(inputs, training=training)

    def settings(self) -> dict:
        """The settings that recreate this adapter: rank, alpha, dropout, ..."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "init": self.init,
        }

    def get_config(self):
        base_config = super().get_config()
        return {**base_config, **self.settings()}
