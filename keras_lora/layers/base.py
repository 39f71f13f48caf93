"""LoraLayer: the wrapper mechanics every LoRA layer type shares."""

from __future__ import annotations

import contextlib
import inspect
import math

import keras
from keras import ops

from keras_lora.layers import dora
from keras_lora.layers.adapter import LoraAdapter
from keras_lora.layers.adapter_routing import AdapterRouting, routing_for_call
from keras_lora.layers.hooks import LoraHooks
from keras_lora.layers.initialization import (
    check_init,
    deferred_initialization,
    initialize,
)
from keras_lora.tracking import substituted_variable, unlocked_state


class LoraLayer(LoraHooks, keras.layers.Wrapper):
    """Adds low-rank adapters to a frozen Keras layer.

    `outputs = activation(layer(x) + sum(scale * B(A(dropout(x)))))` over the
    active adapters, where `layer(x)` is the wrapped layer without its
    activation and `scale = alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).
    The adapter path is always computed factorised; the full-size update is only
    formed by `merge()`, which folds it into the base weights.

    Subclasses name the Keras class they adapt in `base_class` and implement
    the per-type hooks of `keras_lora.layers.hooks.LoraHooks` (at least
    `factor_shapes`, `adapter_output` and `delta`); this class does the rest.

    Args:
        layer: the Keras layer to adapt, built or not. It is frozen.
        rank: rank of the first adapter.
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
            if training:
                raise ValueError(
                    f"Layer '{self.name}' has merged adapters "
                    f"{self._merged_adapters} and cannot be trained: the "
                    "adapters would get no gradient. Call `unmerge()` before "
                    f"training. Received: training={training}"
                )
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
            if adapter.use_dora:
                update = self._factorised_update(adapter, x)
                outputs = dora.output(self, adapter, outputs, x, update, training)
            else:
                update = self._factorised_update(adapter, x, negated=True)
                outputs = _add_negated(outputs, update)
        return activation(outputs) if activation is not None else outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

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
            if self._adapters[name].use_dora:
                dora.remember_norm(self, self._adapters[name])
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
            if adapter.use_dora:
                restored = dora.unmerged_kernel(self, adapter, restored)
            else:
                restored = restored - self._scaled_delta(adapter)
        kernel.assign(ops.cast(restored, kernel.dtype))
        self._merged_adapters = []

    def get_delta_weight(self, adapter_name: str | None = None):
        """Returns `scale * delta` of one adapter, in the base kernel's layout.

        For a DoRA adapter this is its low-rank part only, as in peft; merging
        it also rescales the kernel by its magnitude (see `merged_kernel`).

        Args:
            adapter_name: the adapter; `None` means the active one.

        Returns:
            A float32 tensor shaped like the base kernel.
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_names("adapter_name", [name])
        return self._scaled_delta(self._adapters[name])

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
                constructor.

        Raises:
            ValueError: if the name exists or a setting is invalid, DoRA is
                asked of a quantized base or a layer type without DoRA hooks,
                or the init cannot apply (see
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
        # After LoraAdapter validated the settings, so the hook gets a plain
        # int whatever integer type was passed (np.int64 from a config).
        self.check_rank(adapter.rank)
        check_init(self, adapter)
        if use_dora:
            dora.check_supported(self)
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
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"`layer` must be a keras.layers.{self.base_class.__name__}. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        if isinstance(layer, LoraLayer):
            raise ValueError(
                f"Layer '{layer.name}' is already a {type(layer).__name__}; add "
                "another adapter with `add_adapter()` instead of wrapping it "
                f"again. Received: layer={layer.name}"
            )
        if not isinstance(layer, self.base_class):
            raise TypeError(
                f"{type(self).__name__} wraps keras.layers."
                f"{self.base_class.__name__} layers. Received: layer={layer.name} "
                f"of type {type(layer).__name__}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras' built-in LoRA enabled "
                "(`enable_lora`); use one or the other, not both. "
                f"Received: layer={layer.name}"
            )
        expected = inspect.signature(self.base_class.call).parameters
        actual = inspect.signature(type(layer).call).parameters
        if list(actual) != list(expected):
            raise TypeError(
                f"{type(self).__name__} cannot wrap '{layer.name}': its class "
                f"{type(layer).__name__} changes the call signature of "
                f"keras.layers.{self.base_class.__name__} (expected "
                f"call{tuple(expected)}, got call{tuple(actual)}), so the adapter "
                "would not apply to every mode it has. Register a wrapper for it "
                "with `keras_lora.register_wrapper`."
            )

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

    def _check_mergeable(self) -> None:
        mode = getattr(self.layer, "quantization_mode", None)
        if mode:
            raise ValueError(
                f"Layer '{self.name}' wraps an {mode}-quantized base; merging into "
                "quantized weights would be lossy. Use "
                "`keras_lora.merge_and_unload(model, dequantize=True)` instead."
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
            if adapter.use_dora:
                # From the factors as initialised, over the base kernel as the
                # adapter will see it.
                adapter.create_magnitude(dora.weight_norm(self, adapter))

    def _kernel_plus(self, names):
        """The base kernel plus the scaled deltas of `names`, in float32; a
        DoRA adapter also rescales what is folded in before it."""
        kernel = ops.cast(self.kernel_variable, "float32")
        for name in names:
            adapter = self._adapters[name]
            if adapter.use_dora:
                kernel = dora.merged_kernel(self, adapter, kernel)
                continue
            kernel = kernel + self._scaled_delta(adapter)
        return kernel

    def _folding_is_cheaper(self, inputs, **call_arguments) -> bool:
        """Whether, in an inference call (`training` false or `None`, as
        Keras' Dropout reads it), adding the adapters to the kernel for this
        call costs less than computing them factorised. A custom training
        loop passes `training=True`, as Keras' guides do, and so keeps the
        factorised gradient.

        Forming `W + scale * delta` takes about `rank` multiply-adds per kernel
        element; the factorised path takes at least `rank` per output element
        (its last product) plus a pass over the output to add it. Folding wins
        when the output is at least as large as the kernel: a batch of tokens
        through a Dense layer, a convolution over an image, but never one
        embedding lookup. Either way the layer computes the same function (to
        float32 rounding); symbolic shapes and quantized bases always take the
        factorised path. A symbolic size is `None` (TensorFlow) or a symbolic
        dimension object (JAX's shape polymorphism, used by `model.export`),
        whose comparisons may be undecidable, so any size that is not an
        `int` counts as unknown.
        """
        if getattr(self.layer, "quantization_mode", None):
            return False
        output_shape = self.compute_output_shape(tuple(inputs.shape), **call_arguments)
        if not all(isinstance(size, int) for size in output_shape):
            return False
        return math.prod(output_shape) >= math.prod(self.kernel_variable.shape)

    def _scaled_delta(self, adapter: LoraAdapter):
        """`scale * delta` of `adapter` in float32 (inside a mixed-precision
        call the factors read in the compute dtype, and so does their delta).
        Takes the adapter, not its name: DoRA needs it while the adapter is
        being created, before it is registered."""
        delta = self.delta(adapter.lora_a, adapter.lora_b) * adapter.scale
        return ops.cast(delta, "float32")

    def _factorised_update(self, adapter: LoraAdapter, x, negated=False):
        """`scale * B(A(x))` of one adapter (`-scale * ...` if `negated`), in
        the compute dtype."""
        lora_b = ops.cast(adapter.lora_b, self.compute_dtype)
        scale = -adapter.scale if negated else adapter.scale
        if scale != 1.0:
            # Every adapter output is linear in B: scaling the small factor
            # saves a pass over the full-size output.
            lora_b = lora_b * scale
        return self.adapter_output(
            x, ops.cast(adapter.lora_a, self.compute_dtype), lora_b
        )

    def _call_per_example(self, inputs, routing: AdapterRouting, training):
        """Each example through the adapter `routing` gives it, as peft's
        `_mixed_batch_forward`; see `keras_lora.layers.adapter_routing`."""
        routing.check(self, inputs, training)
        with _without_activation(self.layer) as activation:
            outputs = self.layer(inputs, training=training)
        for position, name in routing.adapters():
            update = self._factorised_update(self._adapters[name], inputs, True)
            outputs = _add_negated(outputs, routing.select(position, update))
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


def _add_negated(outputs, negated_update):
    """`outputs + update`, computed as `outputs - (-update)`: the same bits.

    TensorFlow's oneDNN remapper fuses MatMul or Conv + BiasAdd + Add +
    activation, and on that chain with an adapter update as the Add's other
    input it fails ("... has an empty op name"), logs errors, and skips the
    whole optimisation pass for the function. A subtraction is outside the
    pattern. The update is negated through `B`, the small factor, for free.
    """
    return ops.subtract(outputs, ops.cast(negated_update, outputs.dtype))


@contextlib.contextmanager
def _without_activation(layer):
    """Runs `layer` without its activation, yielding the activation.

    The adapter update is added before the activation, so the base output is
    needed pre-activation; calling the layer itself (rather than re-deriving its
    math) keeps quantized and subclassed bases exact.
    """
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        yield None
        return
    layer.activation = None
    try:
        yield activation
    finally:
        layer.activation = activation
