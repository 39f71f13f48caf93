"""One named adapter: its settings, its two factors and its dropout."""

from __future__ import annotations

import math

import keras

from keras_lora.layers.dora import DoraVariant
from keras_lora.layers.settings import AdapterSettings, rewrites_kernel
from keras_lora.layers.variant import LoraVariant


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
        rank, alpha, dropout, use_rslora, init, use_dora: the adapter's
            settings, see `keras_lora.layers.AdapterSettings`. PiSSA and OLoRA
            inits also keep the factors they start from (`initial_lora_a`,
            `initial_lora_b`, not trainable), see
            `keras_lora.layers.initialization`; DoRA also holds a magnitude
            (see `keras_lora.layers.dora`).
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
        settings = AdapterSettings(rank, alpha, dropout, use_rslora, init, use_dora)
        super().__init__(**kwargs)
        self.adapter_settings = settings
        # How the adapter computes, merges and unmerges: plain LoRA or DoRA.
        self.variant = DoraVariant if settings.use_dora else LoraVariant
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
    def rank(self) -> int:
        """`adapter_settings.rank`."""
        return self.adapter_settings.rank

    @property
    def alpha(self) -> float:
        """`adapter_settings.alpha`."""
        return self.adapter_settings.alpha

    @property
    def dropout(self) -> float:
        """`adapter_settings.dropout`."""
        return self.adapter_settings.dropout

    @property
    def use_rslora(self) -> bool:
        """`adapter_settings.use_rslora`."""
        return self.adapter_settings.use_rslora

    @property
    def init(self) -> str | bool:
        """`adapter_settings.init`."""
        return self.adapter_settings.init

    @property
    def use_dora(self) -> bool:
        """`adapter_settings.use_dora`."""
        return self.adapter_settings.use_dora

    @property
    def scale(self) -> float:
        """`adapter_settings.scale`: `alpha / rank` (rsLoRA:
        `alpha / sqrt(rank)`)."""
        return self.adapter_settings.scale

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
        """`adapter_settings.to_dict()`: the keyword arguments that recreate
        this adapter (rank, alpha, dropout, ...), as configs and files hold
        them."""
        return self.adapter_settings.to_dict()

    def get_config(self):
        base_config = super().get_config()
        return {**base_config, **self.settings()}
