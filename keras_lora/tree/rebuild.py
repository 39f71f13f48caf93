"""`rebuild`: a model with some of its layers replaced.

`convert` replaces selected layers by wrappers, `unload` wrappers by their base
layers. Graph models are cloned with `keras.models.clone_model`, reusing every
layer not replaced (weights are shared, never copied); other layers are rewired
in place; a layer that builds its own sub-layers gets the `LoraRoot` mix-in, so
that a `.keras` file keeps its wrappers. Details: docs/design.md, "The cloner".
"""

from __future__ import annotations

import keras

from keras_lora.layers.base import LoraLayer
from keras_lora.tree.keras_private import (
    Functional,
    attributes,
    is_graph_model,
    rewire,
    unlocked_state,
)
from keras_lora.tree.walk import children, own_variables, resolve, walk


def rebuild(model: keras.Model, replacements: dict[int, keras.layers.Layer]):
    """Returns `model` rebuilt with `replacements` (`id(old) -> new`) applied.

    Args:
        model: the model to rebuild.
        replacements: the layers to swap in, keyed by the id of the old layer.

    Returns:
        The rebuilt model. If rebuilding fails, the in-place rewiring is undone
        before the error propagates.
    """
    rewired = []
    memo = dict(replacements)
    try:
        new_model = _rebuild(model, memo, rewired)
        _sync_roots(new_model)
    except Exception:
        for reference, old in reversed(rewired):
            rewire(reference, old)
        _sync_roots(model)
        raise
    return new_model


def _rebuild(layer, memo, rewired):
    if id(layer) in memo:
        return memo[id(layer)]
    if is_graph_model(layer):
        new = _rebuild_graph(layer, memo, rewired)
    else:
        memo[id(layer)] = layer
        new = layer
        for child, reference in children(layer):
            replacement = _rebuild(child, memo, rewired)
            if replacement is not reference.get():
                rewired.append((reference, reference.get()))
                rewire(reference, replacement)
    memo[id(layer)] = new
    return new


def _rebuild_graph(model, memo, rewired):
    graph_layers = [
        child for child, ref in children(model) if ref.attribute == "layers"
    ]
    mapped = {id(child): _rebuild(child, memo, rewired) for child in graph_layers}
    if all(mapped[id(child)] is child for child in graph_layers):
        return model
    cloned = keras.models.clone_model(
        model, clone_function=lambda layer: mapped.get(id(layer), layer)
    )
    if type(model) in (keras.Sequential, Functional):
        new = cloned
    else:
        new = _rehome(model, cloned, memo)
    # A new model takes the global policy in force now; keep the model's own,
    # so that compile adds loss scaling under mixed_float16 as it did before.
    new.dtype_policy = model.dtype_policy
    return new


def _rehome(model, cloned, memo):
    """A new instance of `model`'s class over `cloned`'s graph, carrying the
    attributes the class's constructor had set, with layers replaced."""
    cls = _original_class(type(model))
    new = cls.__new__(cls)
    # The class's own constructor builds a graph of new layers; initialise the
    # instance as the graph class it derives from, over the cloned graph.
    graph_class = next(c for c in cls.__mro__ if c in (keras.Sequential, Functional))
    if graph_class is keras.Sequential:
        graph_class.__init__(new, layers=cloned.layers, name=model.name)
    else:
        graph_class.__init__(
            new, inputs=cloned.input, outputs=cloned.output, name=model.name
        )
    with unlocked_state(new):
        present = {attribute for attribute, _ in attributes(new)}
        for attribute, value in attributes(model):
            if attribute not in present:
                setattr(new, attribute, _replace_in(value, memo))
    return new


def _replace_in(value, memo):
    if isinstance(value, keras.layers.Layer):
        return memo.get(id(value), value)
    if isinstance(value, (list, tuple)) and any(
        isinstance(item, keras.layers.Layer) for item in value
    ):
        return type(value)(_replace_in(item, memo) for item in value)
    if isinstance(value, dict) and any(
        isinstance(item, keras.layers.Layer) for item in value.values()
    ):
        return {key: _replace_in(item, memo) for key, item in value.items()}
    return value


def _is_native(layer) -> bool:
    """Whether Keras serializes `layer` graph-wise, wrappers included."""
    return is_graph_model(layer) and type(layer).get_config in (
        keras.Sequential.get_config,
        Functional.get_config,
    )


def _roots(model):
    """The layers Keras rebuilds from their own config: the model itself unless
    it is a plain graph, and the graph layers of every plain graph in it."""
    found = [] if _is_native(model) else [model]
    graphs = [model] if _is_native(model) else []
    while graphs:
        graph = graphs.pop()
        for child, reference in children(graph):
            if reference.attribute != "layers" or isinstance(child, LoraLayer):
                continue
            (graphs if _is_native(child) else found).append(child)
    return found


def _sync_roots(model):
    for root in _roots(model):
        original = _original_class(type(root))
        wanted = _lora_class(original) if _wrapper_sites(root) else original
        if type(root) is not wanted:
            root.__class__ = wanted


def _wrapper_sites(root) -> list[tuple[list, LoraLayer]]:
    """`(steps, wrapper)` for the wrappers `root`'s own config must record.
    A graph model inside `root` is built by its constructor too, not from the
    graph's config, so the graph's layers are `root`'s to record."""
    return [
        (site.steps, site.layer)
        for site in walk(root).values()
        if isinstance(site.layer, LoraLayer)
    ]


def _frozen_steps(root) -> list[list]:
    """Steps of the frozen layers under `root` (not those below a frozen
    layer, which freezing it covers): its constructor creates them trainable,
    so its config must record them."""
    frozen = []
    for site in walk(root).values():
        if isinstance(site.layer, LoraLayer) or site.layer.trainable:
            continue
        if not any(site.steps[: len(outer)] == outer for outer in frozen):
            frozen.append(site.steps)
    return frozen


def _frozen_variables(root) -> list[list]:
    """`[steps, names]` for each layer under `root` (`root` itself at steps
    `[]`) that trains but holds frozen variables of its own, such as a ViT
    embedding's `class_token` beside an adapted projection: Keras saves
    trainable flags per layer, not per variable."""
    layers = [([], root)] + [(site.steps, site.layer) for site in walk(root).values()]
    found = []
    for steps, layer in layers:
        if isinstance(layer, LoraLayer) or not layer.trainable:
            continue
        names = [v.name for v in own_variables(layer) if not v.trainable]
        if names:
            found.append([steps, names])
    return found


def _original_class(cls):
    return cls.__mro__[2] if issubclass(cls, LoraRoot) else cls


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(original):
    if original not in _LORA_CLASSES:
        lora_class = type(original.__name__, (LoraRoot, original), {})
        lora_class.__module__ = original.__module__
        lora_class.__qualname__ = original.__qualname__
        _LORA_CLASSES[original] = keras.saving.register_keras_serializable(
            package="keras_lora", name="LoraRoot"
        )(lora_class)
    return _LORA_CLASSES[original]


@keras.saving.register_keras_serializable(package="keras_lora", name="LoraRoot")
class LoraRoot:
    """Mix-in for layers that rebuild their own sub-layers: their config adds
    where each wrapper sits and which layers and variables are frozen, and
    loading re-applies all three.

    A converted model of such a class is an instance of a subclass of its own
    class (same name, methods and attributes) with this mix-in first.
    """

    def get_config(self):
        cls = type(self)
        self.__class__ = _original_class(cls)
        try:
            base = keras.saving.serialize_keras_object(self)
        finally:
            self.__class__ = cls
        sites = [
            {"steps": steps, "wrapper": keras.saving.serialize_keras_object(wrapper)}
            for steps, wrapper in _wrapper_sites(self)
        ]
        return {
            "base": base,
            "lora_sites": sites,
            "frozen": _frozen_steps(self),
            "frozen_variables": _frozen_variables(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = keras.saving.deserialize_keras_object(
            config["base"], custom_objects=custom_objects
        )
        replacements = {}
        for site in config["lora_sites"]:
            layer = resolve(base, site["steps"])
            wrapper_class = keras.saving.get_registered_object(
                site["wrapper"]["registered_name"], custom_objects
            )
            replacements[id(layer)] = wrapper_class.restore(
                layer, site["wrapper"]["config"]
            )
        model = rebuild(base, replacements)
        for steps in config.get("frozen", []):
            resolve(model, steps).trainable = False
        for steps, names in config.get("frozen_variables", []):
            for variable in own_variables(resolve(model, steps)):
                if variable.name in names:
                    variable.trainable = False
        return model
