"""Which layers a LoRA config selects: paths, names, globs, regexes, types,
predicates.

A layer is addressed by its path: the names of the layers from the model's
direct sub-layer down to the layer, joined with `/`
(`"block_0/self_attention/query"`; the model's own name is not part of it).
Keras layer names cannot contain `/`, so a path is unambiguous.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

import keras

from keras_lora.layers.registry import supported_classes, wrapper_for

Target = str | type | Callable[[keras.layers.Layer, str], bool]
"""A path or layer name, a glob, a `"re:"` regex, a layer class or a predicate."""

REGEX_PREFIX = "re:"
ALL_LINEAR = "all-linear"
LINEAR_CLASSES = (keras.layers.Dense, keras.layers.EinsumDense)
_GLOB_CHARACTERS = frozenset("*?[")
_FORMS = (
    "a layer path or name, a glob ('*/query'), a regex prefixed 're:', a "
    "keras.layers.Layer subclass or a callable (layer, path) -> bool"
)
_SHOWN_PATHS = 20
_SHOWN_NAMES = 30

T = TypeVar("T")


def select(
    candidates: Mapping[str, keras.layers.Layer],
    targets: Target | Sequence[Target] | None = None,
    exclude: Target | Sequence[Target] | None = None,
    *,
    require_wrapper: bool = True,
    argument: str = "targets",
    output_paths: Collection[str] = (),
) -> list[str]:
    """Returns the paths of the layers that `targets` select and `exclude`
    does not, in the order of `candidates`.

    A target is one of:

    - a plain string: a path or a layer name. It matches a path equal to it or
      ending in `"/" + target` (whole names from the end, as peft matches
      module names), so `"query"` matches every layer named `query` and
      `"self_attention/query"` every `query` inside a `self_attention`.
    - a glob with `*`, `?` or `[...]`, matched against the full path
      (`"*/query"`, `"block_*/self_attention/*"`); `*` also matches `/`.
    - a string prefixed `"re:"`: a regex that must match the full path.
    - a `keras.layers.Layer` subclass: matches its instances.
    - a callable `(layer, path) -> bool`.
    - a list or tuple of these: the union of their matches.
    - `"all-linear"` alone (peft's preset): every `Dense` and `EinsumDense`
      except the model's output layers (`output_paths`: the classifier or LM
      head).

    A target matches layers by their own path: `"block_0"` names the block
    itself, not the layers inside it (`"block_0/*"` does), as in peft.

    `targets=None` selects every layer that has a wrapper. `None` and
    `"all-linear"` are broad: `unwrapped` lists what they pass over. A plain
    string that
    matches a layer with no wrapper (a `Dropout`, say) is an error; a broad
    target (glob, regex, class, callable) silently skips such layers as long as
    it matches at least one layer that has a wrapper. Every entry of `targets`
    and of `exclude` must match some layer: a typo raises instead of silently
    adapting (or not excluding) layers.

    With `require_wrapper=False` the layer type does not matter (for the
    layers `LoraConfig.train` names, or to pick among LoRA layers):
    `targets=None` then selects every candidate.

    Args:
        candidates: every layer of the model, keyed by path.
        targets: what to select; `None` for every layer that has a wrapper.
        exclude: what to leave out, in the same forms.
        require_wrapper: whether selected layers must have a wrapper.
        argument: the name of `targets` in error messages, e.g. `"train"`.
        output_paths: the paths of the model's output layers (see
            `keras_lora.tree.walk.output_layers`), which `"all-linear"` leaves out.

    Returns:
        The selected paths, in the order of `candidates`.

    Raises:
        TypeError: if a target is not one of the forms above.
        ValueError: if a regex is invalid, an entry matches no layer, a target
            names a layer that has no wrapper, or nothing is left selected.

    Example:

    >>> select(paths_to_layers, targets=["query", "value"], exclude="block_0/*")
    ['block_1/self_attention/query', 'block_1/self_attention/value']
    """
    _check_candidates(candidates)
    entries = normalize_targets(targets, argument)
    excluded = normalize_targets(exclude, "exclude")
    if entries is None or entries == (ALL_LINEAR,):
        kinds = keras.layers.Layer if entries is None else LINEAR_CLASSES
        chosen = {
            path
            for path, layer in candidates.items()
            if isinstance(layer, kinds)
            and (not require_wrapper or _has_wrapper(layer))
            and (entries is None or path not in output_paths)
        }
        if not chosen and entries is not None:
            raise ValueError(
                f"{ALL_LINEAR!r} finds no Dense or EinsumDense layer besides the "
                f"output layers {list(output_paths)}; name the layers to adapt. "
                f"Layers: {_paths_message(candidates)}. "
                f"Received: {argument}={targets!r}"
            )
        if require_wrapper and not chosen:
            raise ValueError(
                "No layer of the model has a LoRA wrapper. "
                f"{_supported_message()} Layers: {_paths_message(candidates)}. "
                f"Received: {argument}={targets!r}"
            )
    else:
        chosen = set()
        matches = _match_entries(candidates, entries, argument, targets)
        for entry, paths in zip(entries, matches, strict=True):
            wrapped = {
                path
                for path in paths
                if not require_wrapper or _has_wrapper(candidates[path])
            }
            unwrapped = [path for path in paths if path not in wrapped]
            if unwrapped and (not wrapped or _is_plain(entry)):
                listed = ", ".join(
                    f"{path} ({type(candidates[path]).__name__})"
                    for path in unwrapped[:_SHOWN_PATHS]
                )
                raise ValueError(
                    f"`{argument}` entry {_describe(entry)} selects layers that "
                    f"have no LoRA wrapper: {listed}. {_supported_message()} "
                    f"Layers: {_paths_message(candidates)}. "
                    f"Received: {argument}={targets!r}"
                )
            chosen.update(wrapped)
    if excluded is not None:
        for paths in _match_entries(candidates, excluded, "exclude", exclude):
            chosen.difference_update(paths)
        if not chosen:
            raise ValueError(
                f"`exclude` removes every layer that `{argument}` selects, so "
                "nothing is left. Narrow `exclude`. "
                f"Received: {argument}={targets!r}, exclude={exclude!r}"
            )
    return [path for path in candidates if path in chosen]


def is_broad(targets: Target | Sequence[Target] | None) -> bool:
    """Whether `targets` is `None` or `"all-linear"`: every layer (of a kind)
    that can take an adapter, rather than named layers."""
    return targets is None or normalize_targets(targets) == (ALL_LINEAR,)


def unwrapped(
    candidates: Mapping[str, keras.layers.Layer],
    targets: Target | Sequence[Target] | None = None,
    exclude: Target | Sequence[Target] | None = None,
) -> dict[str, str]:
    """The layers broad `targets` (see `is_broad`) pass over although their
    kind takes adapters, each with the reason: a subclass whose call
    signature differs from the class its wrapper adapts.

    Args:
        candidates: every layer of the model, keyed by path.
        targets: `None` or `"all-linear"`.
        exclude: layers the user left out; they are not listed.

    Returns:
        A dict of path to reason, in the order of `candidates`.
    """
    kinds = supported_classes() if targets is None else LINEAR_CLASSES
    found = {}
    for path, layer in candidates.items():
        base = next((cls for cls in kinds if isinstance(layer, cls)), None)
        if base is not None and not _has_wrapper(layer):
            found[path] = (
                f"the class changes the call signature of "
                f"keras.layers.{base.__name__}, so a wrapper could not cover "
                "every mode of its call; register a wrapper for it with "
                "`keras_lora.register_wrapper`"
            )
    if exclude is not None:
        excluded = normalize_targets(exclude, "exclude")
        for paths in _match_entries(candidates, excluded, "exclude", exclude):
            for path in paths:
                found.pop(path, None)
    return found


def pattern_value(path: str, patterns: Mapping[str, T]) -> T | None:
    """Returns the value of the first key of `patterns` that matches `path`.

    As peft's `rank_pattern` and `alpha_pattern`: each key is a regex that must
    match whole names at the end of the path, i.e. `re.fullmatch(
    rf"(.*/)?({key})", path)`. The first matching key, in insertion order,
    wins.

    Args:
        path: a layer path, e.g. `"block_0/self_attention/query"`.
        patterns: regex keys to values.

    Returns:
        The value of the first matching key, or `None` if no key matches.

    Raises:
        ValueError: if a key is not a valid regex.

    Example:

    >>> pattern_value("block_0/self_attention/query", {"block_0/.*": 4})
    4
    """
    for key, value in patterns.items():
        try:
            match = re.fullmatch(rf"(.*/)?({key})", path)
        except re.error as error:
            raise ValueError(
                f"Pattern key {key!r} is not a valid regular expression ({error}). "
                f"Received: patterns={dict(patterns)!r}"
            ) from error
        if match:
            return value
    return None


def normalize_targets(
    targets: Target | Sequence[Target] | None, argument: str = "targets"
) -> tuple[Target, ...] | None:
    """Checks targets and returns them as a tuple (`None` stays `None`).

    Args:
        targets: a target, a list or tuple of targets, or `None`.
        argument: the argument name used in error messages.

    Returns:
        A non-empty tuple of targets, or `None`.

    Raises:
        TypeError: if an entry is not one of the forms `select` accepts.
        ValueError: if there is no entry, a string is empty or a regex is
            invalid.

    Example:

    >>> normalize_targets("query")
    ('query',)
    """
    if targets is None:
        return None
    entries = tuple(targets) if isinstance(targets, (list, tuple)) else (targets,)
    if not entries:
        raise ValueError(
            f"`{argument}` must not be empty; pass None instead. "
            f"Received: {argument}={targets!r}"
        )
    if ALL_LINEAR in entries and (len(entries) > 1 or argument != "targets"):
        raise ValueError(
            f"{ALL_LINEAR!r} is a preset for the whole of `targets` (every Dense "
            "and EinsumDense but the output layer); it cannot be combined with "
            f"other entries or used in `{argument}`. Received: "
            f"{argument}={targets!r}"
        )
    for entry in entries:
        if isinstance(entry, str) and entry in ("", REGEX_PREFIX):
            raise ValueError(
                f"Strings in `{argument}` must not be empty. "
                f"Received: {argument}={targets!r}"
            )
        if isinstance(entry, str) and entry.startswith(REGEX_PREFIX):
            try:
                re.compile(entry[len(REGEX_PREFIX) :])
            except re.error as error:
                raise ValueError(
                    f"`{argument}` entry {entry!r} is not a valid regular "
                    f"expression ({error}). Received: {argument}={targets!r}"
                ) from error
        elif isinstance(entry, type) and not issubclass(entry, keras.layers.Layer):
            raise TypeError(
                f"A class in `{argument}` must be a keras.layers.Layer subclass. "
                f"Received: {argument}={targets!r}"
            )
        elif not (isinstance(entry, str) or callable(entry)):
            raise TypeError(
                f"Each entry of `{argument}` must be {_FORMS}. Received: "
                f"{argument}={targets!r} (entry of type {type(entry).__name__})"
            )
    return entries


def _matches(entry: Target, layer: keras.layers.Layer, path: str) -> bool:
    if isinstance(entry, str):
        if entry.startswith(REGEX_PREFIX):
            return re.fullmatch(entry[len(REGEX_PREFIX) :], path) is not None
        if _GLOB_CHARACTERS.intersection(entry):
            return fnmatch.fnmatchcase(path, entry)
        return path == entry or path.endswith("/" + entry)
    if isinstance(entry, type):
        return isinstance(layer, entry)
    return bool(entry(layer, path))


def _match_entries(candidates, entries, argument, received) -> list[list[str]]:
    """The paths each entry matches; an entry matching none raises."""
    matches = []
    for entry in entries:
        paths = [
            path for path, layer in candidates.items() if _matches(entry, layer, path)
        ]
        if not paths:
            raise ValueError(
                f"`{argument}` entry {_describe(entry)} matches no layer of the "
                f"model.{_suggestion(entry, candidates)} Layer paths: "
                f"{_paths_message(candidates)}. "
                f"Received: {argument}={received!r}"
            )
        matches.append(paths)
    return matches


def _is_plain(entry: Target) -> bool:
    return (
        isinstance(entry, str)
        and not entry.startswith(REGEX_PREFIX)
        and not _GLOB_CHARACTERS.intersection(entry)
    )


def _describe(entry: Target) -> str:
    if isinstance(entry, str):
        return repr(entry)
    kind = "class" if isinstance(entry, type) else "callable"
    return f"{kind} {getattr(entry, '__qualname__', repr(entry))}"


def _suggestion(entry: Target, candidates) -> str:
    if not _is_plain(entry):
        return ""
    words = dict.fromkeys([*candidates, *_leaf_names(candidates)])
    close = difflib.get_close_matches(entry, list(words), n=3)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def _leaf_names(candidates) -> dict[str, None]:
    return dict.fromkeys(path.rsplit("/", 1)[-1] for path in candidates)


def _paths_message(candidates) -> str:
    paths = list(candidates)
    if not paths:
        return "(none)"
    if len(paths) <= _SHOWN_PATHS:
        return ", ".join(paths)
    names = list(_leaf_names(candidates))
    shown_names = ", ".join(names[:_SHOWN_NAMES])
    if len(names) > _SHOWN_NAMES:
        shown_names += f", ... and {len(names) - _SHOWN_NAMES} more"
    return (
        ", ".join(paths[:_SHOWN_PATHS])
        + f", ... and {len(paths) - _SHOWN_PATHS} more (layer names: {shown_names})"
    )


def _supported_message() -> str:
    names = ", ".join(cls.__name__ for cls in supported_classes())
    return (
        f"Layer classes with a wrapper: {names}; add one with "
        "`keras_lora.register_wrapper`."
    )


def _has_wrapper(layer: keras.layers.Layer) -> bool:
    return wrapper_for(layer) is not None


def _check_candidates(candidates) -> None:
    if not isinstance(candidates, Mapping) or not all(
        isinstance(path, str) and isinstance(layer, keras.layers.Layer)
        for path, layer in candidates.items()
    ):
        raise TypeError(
            "`candidates` must be a mapping of layer paths (str) to Keras "
            f"layers. Received: candidates of type {type(candidates).__name__}"
        )
