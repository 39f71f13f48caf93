"""The adapter directory format: what its two files hold, how a directory is
written atomically, and how it is read back and checked.

```
adapter_config.json    {"format_version": 1, "keras_lora_version": "0.1.0",
                        "adapter_name": "default", "config": LoraConfig.to_dict(),
                        "layers": [{"path", "wrapper", "rank", "alpha", "dropout",
                                    "use_rslora", "init", "use_dora"}, ...],
                        "train": [paths of fully trained layers],
                        "weights": [keys of the trained non-adapter tensors]}
adapter.safetensors    float32 tensors "{path}/lora_a", "{path}/lora_b" per layer
                       (and "{path}/lora_magnitude_vector" for DoRA layers),
                       and "{path}/{variable name}" for each key of "weights"
```

A layer record without `use_dora` (written before DoRA) means `false`.

This module knows files, not models: `match.py` checks what it reads
against a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import safetensors.numpy

from keras_lora.config import LoraConfig
from keras_lora.layers.settings import AdapterSettings

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
# Settings added after files of this format were first written, with the value
# their absence means.
SETTING_DEFAULTS = {"use_dora": False}
_REQUIRED = tuple(
    key for key in AdapterSettings.field_names() if key not in SETTING_DEFAULTS
)
_LAYER_KEYS = ("path", "wrapper", *_REQUIRED)


def adapter_keys(path: str, use_dora: bool = False) -> dict[str, str]:
    """The file keys of one layer's adapter tensors, by `LoraAdapter.parameters`
    name: `"{path}/lora_a"`, `"{path}/lora_b"` and, with DoRA,
    `"{path}/lora_magnitude_vector"` (peft's name for the magnitude).

    Args:
        path: the layer path.
        use_dora: whether the layer's adapter is DoRA.

    Returns:
        A dict of parameter name to file key.
    """
    names = ("lora_a", "lora_b", *(("lora_magnitude_vector",) if use_dora else ()))
    return {name: f"{path}/{name}" for name in names}


def layer_settings(record: dict) -> dict:
    """The adapter settings a layer record holds, defaults filled in.

    Args:
        record: one entry of the document's `"layers"`.

    Returns:
        The keyword arguments of `LoraLayer.add_adapter`: every key of the
        record but `path` and `wrapper` (an unknown one fails there).
    """
    settings = {k: v for k, v in record.items() if k not in ("path", "wrapper")}
    return {**SETTING_DEFAULTS, **settings}


def write_directory(
    directory: str | os.PathLike, document: dict, tensors: dict[str, np.ndarray]
) -> None:
    """Writes an adapter directory, all or nothing (`replace_directory`).

    Args:
        directory: the adapter directory to (re)place.
        document: the JSON document for `adapter_config.json`.
        tensors: the float32 arrays for `adapter.safetensors`.

    Raises:
        ValueError: as `replace_directory`.
    """

    def write(staging):
        safetensors.numpy.save_file(
            tensors,
            os.path.join(staging, WEIGHTS_FILE),
            metadata={"format": "keras_lora"},
        )
        write_json(os.path.join(staging, CONFIG_FILE), document)

    replace_directory(directory, (CONFIG_FILE, WEIGHTS_FILE), write)


def replace_directory(
    directory: str | os.PathLike,
    file_names: Collection[str],
    write: Callable[[str], None],
) -> None:
    """Writes a directory of files, all or nothing: `write(staging)` fills a
    hidden sibling, whose files are flushed, then the sibling is renamed into
    place (an existing directory renamed aside and deleted after).

    Args:
        directory: the directory to (re)place.
        file_names: the names of the files `write` writes; an existing
            `directory` may hold only these.
        write: writes the files into the directory it is given.

    Raises:
        ValueError: if `directory` is a file, or a directory holding other
            files (they would be deleted).
    """
    target = os.path.abspath(os.fspath(directory))
    name = os.path.basename(target)
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise ValueError(
                "`directory` exists and is not a directory; pass a directory "
                f"path for the adapter. Received: directory={directory!r}"
            )
        others = sorted(set(os.listdir(target)) - set(file_names))
        if others:
            raise ValueError(
                f"`directory` holds files other than an adapter's ({others}); "
                "saving replaces the whole directory, so pass a new path or an "
                f"adapter directory. Received: directory={directory!r}"
            )
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        write(staging)
        for file_name in file_names:
            _sync(os.path.join(staging, file_name))
        _sync(staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _sync(parent)


def write_json(path: str, document: Any) -> None:
    """Writes `document` as indented JSON to `path`.

    Args:
        path: the file to write.
        document: a JSON-serializable value.
    """
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)


def read_directory(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads an adapter directory and checks that it is self-consistent.

    Args:
        directory: an adapter directory `write_directory` wrote.

    Returns:
        `(document, tensors)`: the JSON document and the arrays by key.

    Raises:
        ValueError: listing every problem found: a missing directory or file,
            bad JSON, an unknown format version, a malformed field, a
            truncated or corrupt safetensors file, missing or extra keys, or a
            tensor that is not float32.
    """
    root = os.fspath(directory)
    if not os.path.isdir(root):
        raise ValueError(
            "`directory` is not an adapter directory: it does not exist or is "
            f"not a directory. Received: directory={directory!r}"
        )
    problems = []
    document = read_json(os.path.join(root, CONFIG_FILE), problems)
    tensors = read_tensors(os.path.join(root, WEIGHTS_FILE), problems)
    if document is not None:
        problems.extend(check_document(document))
    if document is not None and tensors is not None and not problems:
        problems.extend(_check_tensors(document, tensors))
    if problems:
        raise problems_error(f"Cannot load the adapter in {root!r}", problems)
    return document, tensors


def check_document(document: Any) -> list[str]:
    """Returns the problems of an `adapter_config.json` document (none: `[]`).

    Args:
        document: the parsed JSON.

    Returns:
        A list of problem descriptions.
    """
    if not isinstance(document, dict):
        return [f"{CONFIG_FILE} does not hold a JSON object"]
    version = document.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        saved_by = document.get("keras_lora_version", "an unknown version")
        return [
            f"{CONFIG_FILE} has format_version {version!r} (saved by keras_lora "
            f"{saved_by}); this keras_lora reads format_version "
            f"{FORMAT_VERSION}: upgrade keras_lora to load it"
        ]
    problems = []
    name = document.get("adapter_name")
    if not isinstance(name, str) or not name or "/" in name:
        problems.append(f"adapter_name must be a layer name, got {name!r}")
    config = document.get("config")
    if not isinstance(config, dict):
        problems.append(f"config must be a JSON object, got {config!r}")
        config = {}
    try:
        # Targets are not needed to load (the saved paths are), and a class
        # target may not be importable here.
        LoraConfig.from_dict({**config, "targets": None, "exclude": None})
    except (TypeError, ValueError) as error:
        problems.append(f"config is not a valid LoraConfig: {error}")
    for field in ("train", "weights"):
        value = document.get(field)
        if not isinstance(value, list) or not all(
            isinstance(item, str) and item for item in value
        ):
            problems.append(f"{field} must be a list of strings, got {value!r}")
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        problems.append(f"layers must be a non-empty list, got {layers!r}")
        return problems
    for index, record in enumerate(layers):
        problems.extend(_check_layer_record(index, record))
    paths = [
        record["path"]
        for record in layers
        if isinstance(record, dict) and isinstance(record.get("path"), str)
    ]
    repeated = sorted(path for path, count in Counter(paths).items() if count > 1)
    if repeated:
        problems.append(f"layers lists paths more than once: {repeated}")
    return problems


def problems_error(summary: str, problems: list[str]) -> ValueError:
    """A `ValueError` whose message lists every problem, one per line."""
    listed = "\n".join(f"  - {problem}" for problem in problems)
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return ValueError(f"{summary}; nothing was changed. {count}:\n{listed}")


def _check_layer_record(index: int, record: Any) -> list[str]:
    if not isinstance(record, dict):
        return [f"layers[{index}] must be an object, got {record!r}"]
    missing = [key for key in _LAYER_KEYS if key not in record]
    if missing:
        return [f"layers[{index}] lacks {missing}"]
    where = f"layers[{index}] ({record['path']!r})"
    problems = []
    for key in ("path", "wrapper"):
        if not isinstance(record[key], str) or not record[key]:
            problems.append(f"{where}: {key} must be a non-empty string")
    try:
        # Other keys are refused when the layer is matched, naming the layer.
        settings = layer_settings(record)
        AdapterSettings(*(settings[key] for key in AdapterSettings.field_names()))
    except (TypeError, ValueError) as error:
        problems.append(f"{where}: {error}")
    return problems


def _check_tensors(document, tensors) -> list[str]:
    declared = [
        key
        for record in document["layers"]
        for key in adapter_keys(
            record["path"], layer_settings(record)["use_dora"]
        ).values()
    ]
    declared += document["weights"]
    problems = []
    repeated = sorted(key for key, count in Counter(declared).items() if count > 1)
    if repeated:
        problems.append(f"keys declared more than once: {repeated}")
    missing = [key for key in declared if key not in tensors]
    if missing:
        problems.append(f"{WEIGHTS_FILE} lacks tensors {missing}")
    extra = sorted(set(tensors) - set(declared))
    if extra:
        problems.append(f"{WEIGHTS_FILE} has tensors {CONFIG_FILE} does not: {extra}")
    for key, value in tensors.items():
        if value.dtype != np.float32:
            problems.append(f"tensor {key!r} is {value.dtype}, not float32")
    return problems


def read_json(path: str, problems: list[str]) -> Any:
    """The JSON value in the file at `path`, or `None` with the problem noted
    in `problems`."""

    def load(file):
        return json.loads(file.read().decode("utf-8"))

    errors = (UnicodeDecodeError, json.JSONDecodeError)
    return _read(path, problems, load, errors, "is not valid JSON")


def read_tensors(path: str, problems: list[str]) -> dict[str, np.ndarray] | None:
    """The arrays of the safetensors file at `path`, or `None` with the
    problem noted in `problems`."""

    def load(file):
        # Own, writable copies: the arrays safetensors returns are read-only
        # views of a bytes object, and TensorFlow may adopt a NumPy buffer as
        # a variable's storage on `assign`.
        tensors = safetensors.numpy.load(file.read())
        return {key: np.array(value) for key, value in tensors.items()}

    # safetensors raises its own error types.
    problem = "cannot be read (truncated or corrupt)"
    return _read(path, problems, load, (Exception,), problem)


def _read(path, problems, load, errors, problem):
    """`load(file)` of the file at `path`, or `None` with the problem noted."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        problems.append(f"{name} is missing")
        return None
    try:
        with open(path, "rb") as file:
            return load(file)
    except (OSError, *errors) as error:
        problems.append(f"{name} {problem}: {error}")
        return None


def _move_into_place(staging: str, target: str) -> None:
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    aside = f"{staging}-replaced"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _sync(path: str) -> None:
    """Flushes a file or a directory entry to disk, where the OS allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
