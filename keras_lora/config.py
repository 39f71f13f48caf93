"""LoraConfig: the validated, JSON round-trippable settings of a conversion."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras

from keras_lora.layers.settings import AdapterSettings
from keras_lora.targets import Target, normalize_targets, pattern_value

BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The settings `keras_lora.convert` applies: which layers to adapt, and how.

    Each selected layer gets an adapter named `adapter_name` whose output,
    `scale * B(A(dropout(x)))` with `scale = alpha / rank`
    (`alpha / sqrt(rank)` with `use_rslora`), is added to the layer's output.
    The config is frozen; derive a changed copy with `dataclasses.replace`.
    Lists are stored as tuples and dicts as read-only mappings.

    Args:
        rank: the adapter rank, a positive integer.
        alpha: the scaling numerator, a positive number. `None` (the default)
            means each layer's own rank, after `rank_pattern`, so the scale is
            1 (peft's `lora_alpha` instead defaults to 8 whatever the rank).
        dropout: dropout rate on the adapter input in training, in `[0, 1)`.
        targets: the layers to adapt: a target or a list of targets, each a
            layer path or name, a glob, a `"re:"` regex, a `keras.layers.Layer`
            subclass or a callable `(layer, path) -> bool`; see
            `keras_lora.targets.select`. `None` adapts every layer that can
            take the adapter; layers that cannot (a grouped conv whose groups
            do not divide the rank, a subclass whose call a wrapper cannot
            cover) keep none and are named in one warning on the
            `"keras_lora"` logger. `"all-linear"` (peft's preset) adapts every
            `Dense` and `EinsumDense` but the model's output layer (see
            `keras_lora.tree.walk.output_layers`), skipping in the same way. A
            single target is stored as a one-element tuple.
        exclude: the layers to leave out, in the same forms as `targets`.
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilized LoRA).
        init: how the factors start: `"default"` (B zeros; Embedding: A zeros),
            `"gaussian"`, `"pissa"`, `"pissa_niter_K"` (K subspace iterations
            of a randomized SVD), `"olora"`, `"orthogonal"` (even rank), or
            `False` (both random, for tests). PiSSA and OLoRA replace the base
            kernel by a residual; see `keras_lora.layers.initialization`.
        use_dora: make every adapter DoRA (weight-decomposed: a trainable
            magnitude per output unit, see `keras_lora.layers.dora`); peft's
            `use_dora`. Like `use_rslora`, it applies to every selected layer.
        bias: which biases train: `"none"`, `"all"`, or `"lora_only"` (those of
            the adapted layers).
        train: layers kept fully trainable (peft's `modules_to_save`), given as
            strings in the forms of `targets` (paths, names, globs, regexes).
        rank_pattern: per-layer ranks: regex keys matched against the end of
            each path (see `keras_lora.targets.pattern_value`); the first
            matching key wins, otherwise `rank` applies.
        alpha_pattern: per-layer alphas, matched as `rank_pattern`.
        adapter_name: the name of the adapter the conversion adds.

    Example:

    >>> config = keras_lora.LoraConfig(
    ...     rank=8, alpha=16, targets=["query", "value"], rank_pattern={"block_0/.*": 4}
    ... )
    >>> config.resolved("block_0/self_attention/query")
    (4, 16.0)
    >>> keras_lora.LoraConfig.from_dict(config.to_dict()) == config
    True
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: Target | Sequence[Target] | None = None
    exclude: Target | Sequence[Target] | None = None
    use_rslora: bool = False
    init: str | bool = "default"
    use_dora: bool = False
    bias: str = "none"
    train: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    adapter_name: str = "default"

    def __post_init__(self):
        self._settings(self.rank, self.alpha)
        if not (isinstance(self.bias, str) and self.bias in BIAS_MODES):
            raise ValueError(
                f"`bias` must be one of {BIAS_MODES}. Received: bias={self.bias!r}"
            )
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(
                "`adapter_name` must be a non-empty string. "
                f"Received: adapter_name={self.adapter_name!r}"
            )
        if "/" in self.adapter_name:
            raise ValueError(
                "`adapter_name` names a Keras layer, so it cannot contain '/'. "
                f"Received: adapter_name={self.adapter_name!r}"
            )
        normalized = {
            # Plain Python numbers, so that `to_dict` is JSON-serializable.
            "rank": int(self.rank),
            "alpha": None if self.alpha is None else float(self.alpha),
            "dropout": float(self.dropout),
            "targets": normalize_targets(self.targets, "targets"),
            "exclude": normalize_targets(self.exclude, "exclude"),
            "train": _normalize_train(self.train),
            "rank_pattern": _freeze_pattern("rank_pattern", self.rank_pattern, int),
            "alpha_pattern": _freeze_pattern("alpha_pattern", self.alpha_pattern),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def resolved(self, path: str) -> tuple[int, float]:
        """Returns the rank and alpha of the layer at `path`.

        The rank is the value of the first `rank_pattern` key matching `path`,
        else `rank`; the alpha is that of the first matching `alpha_pattern`
        key, else `alpha`, else (`alpha=None`) the layer's resolved rank.

        Args:
            path: a layer path, e.g. `"block_0/self_attention/query"`.

        Returns:
            A pair `(rank, alpha)`.

        Example:

        >>> LoraConfig(rank=8, rank_pattern={"query": 4}).resolved("b/query")
        (4, 4.0)
        """
        rank = pattern_value(path, self.rank_pattern)
        rank = self.rank if rank is None else rank
        alpha = pattern_value(path, self.alpha_pattern)
        if alpha is None:
            alpha = rank if self.alpha is None else self.alpha
        return rank, float(alpha)

    def adapter_settings(self, path: str) -> AdapterSettings:
        """Returns the settings of the adapter the layer at `path` gets: its
        `resolved(path)` rank and alpha, and the config's other settings.

        Args:
            path: a layer path, e.g. `"block_0/self_attention/query"`.

        Returns:
            A `keras_lora.layers.AdapterSettings`.

        Raises:
            ValueError: if the resolved rank does not suit `init`
                (`"orthogonal"` needs an even rank).

        Example:

        >>> config = LoraConfig(rank=8, alpha=16, rank_pattern={"query": 4})
        >>> config.adapter_settings("b/query").scale
        4.0
        """
        return self._settings(*self.resolved(path))

    def _settings(self, rank, alpha) -> AdapterSettings:
        return AdapterSettings(
            rank, alpha, self.dropout, self.use_rslora, self.init, self.use_dora
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-serializable dict.

        String targets are kept as they are; a layer class becomes
        `{"class": <Keras registered name>}` (`"Dense"` for Keras' own layers,
        `"package>Name"` for registered ones).

        Returns:
            A dict with one key per field, which `from_dict` turns back into an
            equal config.

        Raises:
            ValueError: if `targets` or `exclude` holds a callable, or a class
                Keras cannot find by name.

        Example:

        >>> json.dumps(keras_lora.LoraConfig(targets="query").to_dict())
        """
        config = {field.name: getattr(self, field.name) for field in _fields()}
        for name in ("targets", "exclude"):
            if config[name] is not None:
                config[name] = [_encode_target(name, entry) for entry in config[name]]
        config["train"] = list(self.train)
        config["rank_pattern"] = dict(self.rank_pattern)
        config["alpha_pattern"] = dict(self.alpha_pattern)
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LoraConfig:
        """Creates a config from a dict `to_dict` made (missing keys take
        their defaults).

        A class target `{"class": name}` is looked up among Keras' registered
        objects (and an active `keras.saving.custom_object_scope`), then in
        `keras.layers`.

        Args:
            config: a dict, e.g. loaded from JSON.

        Returns:
            A `LoraConfig`.

        Raises:
            TypeError: if `config` is not a mapping.
            ValueError: if a key is unknown, a class cannot be found, or a
                value is invalid.

        Example:

        >>> keras_lora.LoraConfig.from_dict({"rank": 4, "targets": ["query"]})
        """
        if not isinstance(config, Mapping):
            raise TypeError(
                f"`config` must be a dict. Received: config={config!r} of type "
                f"{type(config).__name__}"
            )
        known = [field.name for field in _fields()]
        unknown = sorted(key for key in config if key not in known)
        if unknown:
            raise ValueError(
                f"`config` has keys that LoraConfig does not know: {unknown}. "
                f"Accepted keys: {known}. Received: config={dict(config)!r}"
            )
        kwargs = dict(config)
        for name in ("targets", "exclude"):
            if isinstance(kwargs.get(name), list | tuple):
                kwargs[name] = [_decode_target(name, entry) for entry in kwargs[name]]
            elif name in kwargs:
                kwargs[name] = _decode_target(name, kwargs[name])
        return cls(**kwargs)


class _FrozenMapping(Mapping):
    """A read-only, hashable, ordered copy of a dict (order matters for
    patterns: the first matching key wins)."""

    def __init__(self, items: Mapping):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self.items()) == list(other.items())

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(LoraConfig)


def _normalize_train(train) -> tuple[str, ...]:
    entries = (train,) if isinstance(train, str) else train
    if not isinstance(entries, list | tuple) or not all(
        isinstance(entry, str) and entry for entry in entries
    ):
        raise TypeError(
            "`train` must be a list of layer paths, names, globs or 're:' "
            f"regexes (non-empty strings). Received: train={train!r}"
        )
    for entry in entries:
        normalize_targets(entry, "train")
    return tuple(entries)


def _freeze_pattern(argument: str, pattern, kind: type = float) -> _FrozenMapping:
    if not isinstance(pattern, Mapping):
        raise TypeError(
            f"`{argument}` must be a dict of regexes to values. "
            f"Received: {argument}={pattern!r}"
        )
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"`{argument}` keys must be non-empty strings (regexes). "
                f"Received: {argument}={pattern!r}"
            )
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(
                f"`{argument}` key {key!r} is not a valid regular expression "
                f"({error}). Received: {argument}={pattern!r}"
            ) from error
        if not _is_positive(value, integral=kind is int):
            expected = "positive integers" if kind is int else "positive numbers"
            raise ValueError(
                f"`{argument}` values must be {expected}. "
                f"Received: {argument}={pattern!r}"
            )
    return _FrozenMapping({key: kind(value) for key, value in pattern.items()})


def _is_positive(value, integral: bool) -> bool:
    expected = numbers.Integral if integral else numbers.Real
    return (
        isinstance(value, expected)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


def _encode_target(argument: str, entry: Target) -> str | dict[str, str]:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, type):
        name = keras.saving.get_registered_name(entry)
        if _find_class(name) is not entry:
            raise ValueError(
                f"`{argument}` holds the class {entry.__qualname__}, which Keras "
                f"cannot find by its name {name!r}, so the config cannot be saved. "
                "Register it with `@keras.saving.register_keras_serializable()`, "
                f"or target it by name or glob. Received: {argument}={entry!r}"
            )
        return {"class": name}
    raise ValueError(
        f"`{argument}` holds a callable, which cannot be saved in a config. Use "
        "layer paths, names, globs, 're:' regexes or layer classes in configs "
        f"that are saved. Received: {argument} entry {entry!r}"
    )


def _decode_target(argument: str, entry: Any) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    name = entry.get("class") if list(entry) == ["class"] else None
    cls = _find_class(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f'A class in `{argument}` must be saved as {{"class": <name>}} with '
            "the name of a Keras layer class, registered or in `keras.layers` "
            "(or given in a `keras.saving.custom_object_scope`). "
            f"Received: {argument} entry {dict(entry)!r}"
        )
    return cls


def _find_class(name: str) -> type | None:
    cls = keras.saving.get_registered_object(name, module_objects=vars(keras.layers))
    is_layer_class = isinstance(cls, type) and issubclass(cls, keras.layers.Layer)
    return cls if is_layer_class else None
