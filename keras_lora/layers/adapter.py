"""One named adapter: its settings, its two factors and its dropout."""

from __future__ import annotations

import math
import numbers
import re

import keras

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


def validate_adapter_settings(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str | bool = "default",
    use_dora: bool = False,
) -> None:
    """Checks the settings every adapter shares, as `LoraConfig` does.

    Args:
        rank: the adapter rank, a positive integer.
        alpha: the scaling numerator, a positive number, or `None` for `rank`.
        dropout: the dropout rate on the adapter input, in `[0, 1)`.
        use_rslora: whether the scale is `alpha / sqrt(rank)`.
        init: one of `INIT_METHODS`; `"orthogonal"` needs an even rank.
        use_dora: whether the adapter is DoRA (weight-decomposed).

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
    if not is_init_method(init):
        raise ValueError(
            f"`init` must be one of {INIT_METHODS}, K being a number of "
            f"iterations (0, 1, ...). Received: init={init!r}"
        )
    if init == "orthogonal" and rank % 2:
        raise ValueError(
            "init='orthogonal' needs an even `rank`: A and B each take half of "
            f"an orthogonal basis. Received: rank={rank!r}"
        )
    if not isinstance(use_dora, bool):
        raise TypeError(f"`use_dora` must be a bool. Received: use_dora={use_dora!r}")


def factor_initializers(
    init: str | bool,
    rank: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    zero_factor: str = "b",
) -> tuple[keras.initializers.Initializer, keras.initializers.Initializer]:
    """Returns the initializers for `lora_a` and `lora_b`, as peft sets them.

    Args:
        init: `"default"`, `"gaussian"` or `False` (both factors random);
            the methods that compute the factors (`computes_factors`) start
            as `"default"` and are then set by
            `keras_lora.layers.initialization`.
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
        init: how the factors start, one of `INIT_METHODS`. PiSSA and OLoRA
            also keep the factors they start from (`initial_lora_a`,
            `initial_lora_b`, not trainable), see
            `keras_lora.layers.initialization`.
        use_dora: also hold a DoRA magnitude (see `keras_lora.layers.dora`).
        **kwargs: base layer arguments (`name` is the adapter name).
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | bool = "default",
        use_dora: bool = False,
        **kwargs,
    ):
        validate_adapter_settings(rank, alpha, dropout, use_rslora, init, use_dora)
        super().__init__(**kwargs)
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.dropout = float(dropout)
        self.use_rslora = use_rslora
        self.init = init
        self.use_dora = use_dora
        self.lora_a = None
        self.lora_b = None
        self.initial_lora_a = None
        self.initial_lora_b = None
        self.lora_magnitude_vector = None
        self.weight_norm = None
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
        """Creates `lora_a` and `lora_b` as float32 variables (and, for an
        init that rewrites the base kernel, `initial_lora_a` and
        `initial_lora_b`, not trainable).

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
        if rewrites_kernel(self.init):
            self.initial_lora_a, self.initial_lora_b = (
                self.add_weight(
                    name=f"initial_{name}",
                    shape=shape,
                    initializer="zeros",
                    dtype="float32",
                    trainable=False,
                )
                for name, shape in (("lora_a", a_shape), ("lora_b", b_shape))
            )
        self.built = True

    def set_factors(self, lora_a, lora_b) -> None:
        """Assigns `lora_a` and `lora_b` from arrays of their shapes.

        Args:
            lora_a: an array (or tensor) shaped like `lora_a`.
            lora_b: an array (or tensor) shaped like `lora_b`.

        Raises:
            ValueError: if the factors are not created yet, or a shape differs;
                nothing is assigned then.
        """
        if self.lora_a is None:
            raise ValueError(
                f"Adapter '{self.name}' has no factors yet: its layer is not "
                "built. Build the layer before setting the factors."
            )
        pairs = ((self.lora_a, lora_a), (self.lora_b, lora_b))
        for variable, value in pairs:
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"`{variable.name}` of adapter '{self.name}' has shape "
                    f"{tuple(variable.shape)}. Received: {variable.name} of "
                    f"shape {tuple(value.shape)}"
                )
        for variable, value in pairs:
            variable.assign(keras.ops.cast(value, variable.dtype))

    def create_magnitude(self, value) -> None:
        """Creates the DoRA variables from the initial weight norm `value`.

        `lora_magnitude_vector` (trainable, float32) starts at `value`;
        `weight_norm` (not trainable) holds the norm a merge divided by, so
        that unmerging can divide it back.

        Args:
            value: the column norm of the adapted kernel, one per output unit.
        """
        shape = tuple(value.shape)
        self.lora_magnitude_vector = self.add_weight(
            name="lora_magnitude_vector",
            shape=shape,
            initializer=lambda shape, dtype: keras.ops.cast(value, dtype),
            dtype="float32",
        )
        self.weight_norm = self.add_weight(
            name="weight_norm",
            shape=shape,
            initializer="ones",
            dtype="float32",
            trainable=False,
        )

    @property
    def parameters(self) -> dict[str, keras.Variable]:
        """The adapter's learned variables by name: `lora_a`, `lora_b` and,
        with DoRA, `lora_magnitude_vector`; what an adapter file holds."""
        names = ("lora_a", "lora_b", "lora_magnitude_vector")
        variables = {name: getattr(self, name) for name in names}
        return {name: v for name, v in variables.items() if v is not None}

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
            "use_dora": self.use_dora,
        }

    def get_config(self):
        base_config = super().get_config()
        return {**base_config, **self.settings()}
