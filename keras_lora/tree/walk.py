"""The layer tree of a model: paths, and where each layer is referenced.

A layer's path is the chain of layer names from the model's direct sub-layer
down to it, joined with "/" (`block_0/self_attention/query`). The model's own
name is not part of it, so paths do not depend on how Keras scoped the build.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_lora.layers.base import LoraLayer
from keras_lora.tree.keras_private import attributes, is_graph_model, producer

# Attributes in which Keras and TensorFlow keep their own bookkeeping of
# sub-layers, by exact name; the user-visible references are the other
# attributes, whatever their names (keras-hub keeps attention in
# `_self_attention_layer`). TensorFlow's trackable keeps its checkpoint
# dependencies in the four `_self_` attributes.
_BOOKKEEPING = frozenset(
    {
        "_layers",
        "_trainable_variables",
        "_non_trainable_variables",
        "_metrics",
        "_seed_generators",
        "_tracked",
        "_inbound_nodes",
        "_outbound_nodes",
        "_operations",
        "_input_layers",
        "_output_layers",
        "_compiled_trainable_state",
        "_functional",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_dependency_names",
        "_self_unconditional_deferred_dependencies",
        "_self_saveable_object_factories",
    }
)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where a parent layer holds a child: `parent.<attribute>[key]`.

    `key` is `None` for a plain attribute, a list index or a dict key otherwise.
    """

    parent: keras.layers.Layer
    attribute: str
    key: int | str | None = None

    def get(self) -> keras.layers.Layer:
        """Returns the layer held there now."""
        value = getattr(self.parent, self.attribute)
        return value if self.key is None else value[self.key]

    def step(self) -> list:
        """A JSON-friendly `[attribute, key]` step for saved configs."""
        return [self.attribute, self.key]


def children(layer: keras.layers.Layer) -> list[tuple[keras.layers.Layer, Reference]]:
    """The direct sub-layers of `layer`, each with the reference that holds it.

    For a graph model, its graph layers come first (without input layers), then
    layers held by other attributes (a Functional subclass may keep some).

    Args:
        layer: any Keras layer or model.

    Returns:
        `(child, reference)` pairs, one per reference; a child held twice
        appears twice.
    """
    found = []
    if is_graph_model(layer):
        for index, child in enumerate(layer.layers):
            if not isinstance(child, keras.layers.InputLayer):
                found.append((child, Reference(layer, "layers", index)))
    for attribute, value in attributes(layer):
        if attribute in _BOOKKEEPING:
            continue
        if isinstance(value, keras.layers.Layer):
            found.append((value, Reference(layer, attribute)))
        elif isinstance(value, (list, tuple)):
            found.extend(
                (item, Reference(layer, attribute, index))
                for index, item in enumerate(value)
                if isinstance(item, keras.layers.Layer)
            )
        elif isinstance(value, dict):
            found.extend(
                (item, Reference(layer, attribute, key))
                for key, item in value.items()
                if isinstance(item, keras.layers.Layer) and isinstance(key, str)
            )
    return found


@dataclasses.dataclass
class Site:
    """One layer of the tree: its path, and every reference that holds it."""

    path: str
    layer: keras.layers.Layer
    references: list[Reference]
    steps: list[list] = dataclasses.field(default_factory=list)


def walk(model: keras.layers.Layer) -> dict[str, Site]:
    """Every layer under `model`, once each, by path, parents before children.

    A layer reachable at several paths (shared) is listed at the first one, and
    every reference to it is collected. A LoRA wrapper is one unit: its base
    layer and adapters are not listed.

    Args:
        model: a Keras model or layer.

    Returns:
        A dict of path to `Site`, in depth-first order.
    """
    sites: dict[str, Site] = {}
    by_id: dict[int, Site] = {}

    def visit(layer, prefix, steps):
        for child, reference in children(layer):
            if id(child) in by_id:
                site = by_id[id(child)]
                if all(ref != reference for ref in site.references):
                    site.references.append(reference)
                continue
            path = f"{prefix}{child.name}"
            child_steps = [*steps, reference.step()]
            site = Site(path, child, [reference], child_steps)
            by_id[id(child)] = site
            sites.setdefault(path, site)
            if not isinstance(child, LoraLayer):
                visit(child, f"{path}/", child_steps)

    visit(model, "", [])
    return sites


def resolve(root: keras.layers.Layer, steps: list) -> keras.layers.Layer:
    """The layer reached from `root` by `steps` (a `Site.steps` list of
    `[attribute, key]` pairs).

    Args:
        root: the layer the steps start from.
        steps: `[attribute, key]` pairs; `key` is `None` for a plain attribute.

    Returns:
        The layer at the end of the steps.
    """
    layer = root
    for attribute, key in steps:
        value = getattr(layer, attribute)
        layer = value if key is None else value[key]
    return layer


def own_variables(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The variables `layer` holds itself, not through its sub-layers.

    Args:
        layer: a Keras layer.

    Returns:
        A list of variables, in `layer.weights` order.
    """
    # A sub-layer's weights include its own sub-layers': no walk needed.
    inner = {id(v) for child, _ in children(layer) for v in child.weights}
    return [variable for variable in layer.weights if id(variable) not in inner]


def bias_variable(layer: keras.layers.Layer) -> keras.Variable | None:
    """The bias of `layer` (of the base layer, for a LoRA wrapper), or `None`.

    Args:
        layer: a Keras layer or LoRA wrapper.

    Returns:
        The `bias` variable, or `None` if the layer has none.
    """
    base = layer.layer if isinstance(layer, LoraLayer) else layer
    bias = getattr(base, "bias", None)
    return bias if isinstance(bias, keras.Variable) else None


def output_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers that compute a graph model's outputs: for each output, the
    last layer with weights on its way (a classifier head, an LM head),
    looking through weightless layers (Dropout, Activation) and into nested
    graph models. This is what `targets="all-linear"` leaves out, as peft's
    `"all-linear"` leaves out the output layer.

    Args:
        model: a Keras model or layer.

    Returns:
        The output layers, once each; empty for a model with no layer graph
        (a subclassed model), whose outputs cannot be traced.
    """
    if not is_graph_model(model):
        return []
    found = []
    pending = list(keras.tree.flatten(model.outputs))
    while pending:
        layer, inputs, index = producer(pending.pop())
        if is_graph_model(layer):
            pending.append(keras.tree.flatten(layer.outputs)[index])
        elif layer.weights or len(inputs) != 1:
            if all(layer is not seen for seen in found):
                found.append(layer)
        else:
            pending.extend(inputs)
    return found


def output_paths(model: keras.layers.Layer, sites: dict[str, Site]) -> list[str]:
    """The paths (in `sites`, a `walk(model)`) of `output_layers(model)`."""
    paths = {id(site.layer): path for path, site in sites.items()}
    return [paths[id(layer)] for layer in output_layers(model) if id(layer) in paths]
