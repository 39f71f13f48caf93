"""LoraLayer: the wrapper mechanics every LoRA layer type shares."""

from __future__ import annotations

import contextlib
import math

import keras
from keras import ops

from keras_lora.layers.adapter import LoraAdapter
from keras_lora.layers.adapter_routing import AdapterRouting, routing_for_call
from keras_lora.layers.hooks import LoraHooks
from keras_lora.layers.initialization import deferred_initialization, initialize
from keras_lora.layers.merging import Merging
from keras_lora.layers.named_adapters import NamedAdapters
from keras_lora.layers.variant import add_negated
from keras_lora.tree.keras_private import substituted_variable


class LoraLayer(NamedAdapters, Merging, LoraHooks, keras.layers.Wrapper):
    """Adds low-rank adapters to a frozen Keras layer.

    `outputs = activation(layer(x) + sum(scale * B(A(dropout(x)))))` over the
    active adapters, where `layer(x)` is the wrapped layer without its
    activation and `scale = alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).
    The adapter path is always computed factorised; the full-size update is only
    formed by `merge()`, which folds it into the base weights.

    Subclasses name the Keras class they adapt in `base_class` and implement
    the per-type hooks of `keras_lora.layers.hooks.LoraHooks` (at least
    `factor_shapes`, `adapter_output` and `delta`); this class does the rest,
    with the adapter management of `keras_lora.layers.named_adapters`, the
    merging of `keras_lora.layers.merging` and each adapter's variant
    (`keras_lora.layers.variant`: plain LoRA or DoRA).

    Args:
        layer: the Keras layer to adapt, built or not. It is frozen.
        rank: rank of the first adapter (its settings are checked by
            `keras_lora.layers.AdapterSettings`).
        alpha: scaling numerator of the first adapter; `None` means `rank`.
        dropout: dropout rate on the adapter input, in `[0, 1)`, training only.
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA).
        init: `"default"` (peft's `init_lora_weights=True`), `"gaussian"`,
            `"pissa"`, `"pissa_niter_K"`, `"olora"`, `"orthogonal"` (see
            `keras_lora.layers.initialization`; PiSSA and OLoRA replace the
            base kernel by a residual), or `False` (both factors random).
        use_dora: make the adapter DoRA (Liu et al. 2024, arXiv 2402.09353): a
            trainable magnitude per output unit rescales the adapted kernel
            `W + scale * delta` to unit column norm times the magnitude.
        adapter_name: name of the first adapter.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: the wrapped layer's inputs.
        training: Python bool; dropout runs only in training. Training a
            merged layer raises `ValueError`: unmerge it first.
        adapter_names: inference only: one adapter name per example
            (`"__base__"` for none), or with `adapter_index` the names it
            indexes; each example then uses its own adapter, whatever is
            active (see `keras_lora.adapter_per_example`).
        adapter_index: integers of shape `(batch,)` into `adapter_names`,
            `-1` for the base layer; a tensor inside a traced function.

    Example:

    >>> layer = keras_lora.LoraDense(keras.layers.Dense(16), rank=4)
    >>> layer.add_adapter("task_b", rank=2)
    >>> layer.set_adapter("task_b")
    >>> layer.merge()

    Reference:
        Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
        arXiv 2106.09685.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | bool = "default",
        use_dora: bool = False,
        adapter_name: str = "default",
        **kwargs,
    ):
        self._check_layer(layer)
        kwargs.setdefault("dtype", _unquantized_policy(layer.dtype_policy))
        super().__init__(layer, **kwargs)
        self.layer.trainable = False
        self.supports_masking = layer.supports_masking
        # Inputs reach the base layer through the wrapper, so the wrapper must
        # cast them as the base would: Embedding does not autocast, and float
        # ids cast to float16 or bfloat16 would look up the wrong rows.
        self.autocast = layer.autocast
        self._adapters = {}
        self._active_adapters = []
        self._merged_adapters = []
        self._adapters_enabled = True
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, init, use_dora)
        self._activate([adapter_name])
        if layer.built:
            # A layer built without an input shape (`Embedding.build()`) has
            # no "input_shape" in its build config; the shape is not needed.
            build_config = layer.get_build_config() or {}
            self.build(build_config.get("input_shape"))

    def build(self, input_shape=None):
        super().build(input_shape)
        for adapter in self._adapters.values():
            if not adapter.built:
                self._create_factors(adapter)
        self._apply_trainable_base_weights()

    def call(self, inputs, training=None, adapter_names=None, adapter_index=None):
        routing = routing_for_call(self, adapter_names, adapter_index)
        if routing is not None:
            return self._call_per_example(inputs, routing, training)
        if self._merged_adapters:
            self._refuse_merged_training(training)
            return self.layer(inputs, training=training)
        if not self._adapters_enabled:
            return self.layer(inputs, training=training)
        if not training and self._folding_is_cheaper(inputs):
            # The layer reads a tensor, which autocasting does not touch, so
            # it is handed over in the compute dtype.
            folded = ops.cast(
                self._kernel_plus(self._active_adapters), self.layer.compute_dtype
            )
            with substituted_variable(self.layer, self.kernel_variable, folded):
                return self.layer(inputs, training=training)
        with _without_activation(self.layer) as activation:
            outputs = self.layer(inputs, training=training)
        for name in self._active_adapters:
            adapter = self._adapters[name]
            x = adapter.apply_dropout(inputs, training=training)
            outputs = adapter.variant.output(self, adapter, outputs, x, training)
        return activation(outputs) if activation is not None else outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def scaled_output(self, adapter: LoraAdapter, x, negated: bool = False):
        """Returns `scale * adapter_output(x, lora_a, lora_b)` of `adapter`,
        in the compute dtype, computed factorised.

        Args:
            adapter: a `LoraAdapter` of this layer, with factors.
            x: the adapter's inputs (after its dropout).
            negated: return `-scale * ...`, for
                `keras_lora.layers.variant.add_negated`.

        Returns:
            The update, shaped like the layer's outputs.
        """
        lora_b = ops.cast(adapter.lora_b, self.compute_dtype)
        scale = -adapter.scale if negated else adapter.scale
        if scale != 1.0:
            # Every adapter output is linear in B: scaling the small factor
            # saves a pass over the full-size output.
            lora_b = lora_b * scale
        return self.adapter_output(
            x, ops.cast(adapter.lora_a, self.compute_dtype), lora_b
        )

    @property
    def kernel_variable(self) -> keras.Variable:
        """The base variable `merge()` writes: the wrapped layer's kernel."""
        return self.kernel_of(self.layer)

    def base_output(self, inputs, training=None):
        """The wrapped layer's output on `inputs`, before its activation."""
        with _without_activation(self.layer):
            return self.layer(inputs, training=training)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "adapters": {
                name: adapter.settings() for name, adapter in self._adapters.items()
            },
            "active_adapters": list(self._active_adapters),
            "merged_adapters": list(self._merged_adapters),
            "adapters_enabled": self._adapters_enabled,
            # Which base variables train (a bias, with bias="lora_only"):
            # Keras saves layer-level trainable flags only.
            "trainable_base_weights": [
                variable.name for variable in self.layer.trainable_weights
            ],
        }
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        return cls.restore(layer, config)

    @classmethod
    def restore(cls, layer: keras.layers.Layer, config: dict) -> LoraLayer:
        """Wraps `layer` with the adapters and state a `get_config()` recorded.

        The base weights are taken as they are: a config saved merged expects
        `layer` to hold (or to be loaded with) the merged kernel.

        Args:
            layer: the base layer to wrap.
            config: a wrapper config; its `"layer"` entry, if any, is ignored.

        Returns:
            The new wrapper.
        """
        config = {key: value for key, value in config.items() if key != "layer"}
        adapters = config.pop("adapters")
        active = config.pop("active_adapters")
        merged = config.pop("merged_adapters")
        enabled = config.pop("adapters_enabled")
        trainable_base_weights = config.pop("trainable_base_weights", [])
        (first, first_settings), *others = adapters.items()
        # The saved kernel and factors are the initialised ones already.
        with deferred_initialization():
            wrapper = cls(layer, adapter_name=first, **first_settings, **config)
            for name, settings in others:
                wrapper.add_adapter(name, **settings)
        wrapper.set_adapter(active)
        wrapper._merged_adapters = list(merged)
        wrapper._adapters_enabled = enabled
        wrapper._trainable_base_weights = list(trainable_base_weights)
        if wrapper.built:
            wrapper._apply_trainable_base_weights()
        return wrapper

    def _apply_trainable_base_weights(self) -> None:
        names = getattr(self, "_trainable_base_weights", None)
        if not names:
            return
        self.layer.trainable = True
        for variable in self.layer.weights:
            variable.trainable = variable.name in names
        self._trainable_base_weights = []

    def _check_layer(self, layer) -> None:
        # Imported here: the registry imports every wrapper type, and so this
        # module.
        from keras_lora.layers.registry import check_wrappable

        check_wrappable(self, layer)

    def _refuse_merged_training(self, training) -> None:
        if self._merged_adapters and training:
            raise ValueError(
                f"Layer '{self.name}' has merged adapters "
                f"{self._merged_adapters} and cannot be trained: the "
                "adapters would get no gradient. Call `unmerge()` before "
                f"training. Received: training={training}"
            )

    def _create_factors(self, adapter: LoraAdapter) -> None:
        a_shape, b_shape = self.factor_shapes(adapter.rank)
        # The factors sit next to the base kernel, wherever the wrapper is
        # built ("block/query/kernel" -> "block/query/<adapter>/lora_a"), so
        # that variable paths are unique and `LayoutMap` rules can find them.
        parent, _, name = adapter_scope(self.layer).rpartition("/")
        with keras.name_scope(name, override_parent=parent):
            adapter.create_factors(a_shape, b_shape, self.zero_factor)
            initialize(self, adapter)
            adapter.variant.create(self, adapter)

    def _folding_is_cheaper(self, inputs, **call_arguments) -> bool:
        """Whether adding the adapters to the kernel for this inference call
        costs less than computing them factorised: the output is at least as
        large as the kernel (see docs/design.md, "Inference fold"). Unknown
        sizes (not `int`) and quantized bases say no."""
        if getattr(self.layer, "quantization_mode", None):
            return False
        output_shape = self.compute_output_shape(tuple(inputs.shape), **call_arguments)
        if not all(isinstance(size, int) for size in output_shape):
            return False
        return math.prod(output_shape) >= math.prod(self.kernel_variable.shape)

    def _call_per_example(self, inputs, routing: AdapterRouting, training):
        """Each example through the adapter `routing` gives it, as peft's
        `_mixed_batch_forward`; see `keras_lora.layers.adapter_routing`."""
        routing.check(self, inputs, training)
        with _without_activation(self.layer) as activation:
            outputs = self.layer(inputs, training=training)
        for position, name in routing.adapters():
            update = self.scaled_output(self._adapters[name], inputs, negated=True)
            outputs = add_negated(outputs, routing.select(position, update))
        return activation(outputs) if activation is not None else outputs


def adapter_scope(layer: keras.layers.Layer) -> str:
    """The path under which adapters of a built base layer create their
    variables: the base layer's own (`"block/query"` for a kernel at
    `"block/query/kernel"`)."""
    return layer.path or layer.name


def _unquantized_policy(policy):
    """The wrapper computes in the base layer's dtypes, without quantization."""
    if policy.quantization_mode is None:
        return policy
    return keras.DTypePolicy(
        f"mixed_{policy.compute_dtype}"
        if policy.compute_dtype != policy.variable_dtype
        else policy.variable_dtype
    )


@contextlib.contextmanager
def _without_activation(layer):
    """Runs `layer` without its activation, yielding the activation (the
    adapter update is added before it; see docs/design.md, "Layers")."""
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        yield None
        return
    layer.activation = None
    try:
        yield activation
    finally:
        layer.activation = activation
