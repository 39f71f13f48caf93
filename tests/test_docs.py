"""The API reference documents exactly `keras_lora.__all__`, each name once."""

import collections
import html.parser
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import keras_lora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def public_objects() -> dict[str, object]:
    return {
        f"keras_lora.{name}": getattr(keras_lora, name) for name in keras_lora.__all__
    }


def kind_of(value) -> str:
    """The kind mkdocstrings shows for `value`: "class", "function" or "attribute"."""
    if inspect.isclass(value):
        return "class"
    return "function" if inspect.isfunction(value) else "attribute"


def resolve(identifier: str):
    """Imports `identifier` as mkdocstrings' loader (griffe) does.

    The longest importable module prefix wins, so `keras_lora.convert` is the
    module even though `keras_lora.convert` in Python is the function.
    """
    parts = identifier.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            value = getattr(value, part)
        return value
    raise ImportError(f"Cannot import {identifier}")


def test_api_page_directives_name_each_public_object_once():
    """Checks docs/api.md's `:::` directives without building the site.

    It runs where mkdocs is not installed (it is in the `docs` extra, not
    `test`). Each directive's public name is its `heading` option, or else its
    identifier; the identifier must resolve to that public object. What the
    directive renders (members, submodules) is checked by the built-site test
    below.
    """
    text = (ROOT / "docs" / "api.md").read_text()
    documented = {}
    for identifier, options in re.findall(r"^::: (\S+)\n((?:    .*\n)*)", text, re.M):
        heading = re.search(r"^\s+heading: (\S+)$", options, re.M)
        name = heading[1] if heading else identifier
        assert name not in documented, f"{name} is documented twice"
        documented[name] = resolve(identifier)
    expected = public_objects()
    assert set(documented) == set(expected)
    for name, value in documented.items():
        assert value is expected[name], f"{name}'s directive renders {value!r}"


class ObjectHeadings(html.parser.HTMLParser):
    """Collects mkdocstrings' object headings as (level, id, name, kind).

    mkdocstrings wraps each object in `<div class="doc doc-object doc-KIND">`
    and opens it with `<hN id="PATH" class="doc doc-heading">NAME ...</hN>`.
    """

    def __init__(self):
        super().__init__()
        self.headings = []
        self.kind = None
        self.open = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "doc-object" in classes:
            [self.kind] = [c[4:] for c in classes if c.startswith("doc-")][1:]
        elif re.fullmatch(r"h\d", tag) and "doc-heading" in classes:
            self.open = (tag, attrs["id"], [])

    def handle_data(self, data):
        if self.open:
            self.open[2].append(data)

    def handle_endtag(self, tag):
        if self.open and tag == self.open[0]:
            tag, html_id, text = self.open
            name = "".join(text).split()[0]
            self.headings.append((int(tag[1]), html_id, name, self.kind))
            self.open = None


def test_built_api_page_shows_each_public_object_once(tmp_path):
    """Builds the site (`mkdocs build --strict`) and reads the API page's HTML.

    The top-level object headings (level 3, mkdocs.yml's `heading_level`) must
    be `keras_lora.__all__`, each once, each of the kind the public object is
    (a module rendered in place of the function of the same name shows as
    kind "module"); every other object heading is a member of a class there
    (not, say, a function of a module).
    """
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parser = ObjectHeadings()
    parser.feed((site / "api" / "index.html").read_text())
    roots = [heading for heading in parser.headings if heading[0] == 3]
    counts = collections.Counter(name for _, _, name, _ in roots)
    assert [name for name, count in counts.items() if count > 1] == []
    expected = {name: kind_of(value) for name, value in public_objects().items()}
    assert {name: kind for _, _, name, kind in roots} == expected
    classes = tuple(f"{id_}." for _, id_, _, kind in roots if kind == "class")
    members = [id_ for level, id_, _, _ in parser.headings if level > 3]
    assert [id_ for id_ in members if not id_.startswith(classes)] == []
