"""keras_lora.add_adapter_layouts: adapter layout rules derived from the base
kernels' rules, checked on the paths of the variables `convert` creates.

These tests read the `LayoutMap` only, so they run on every backend without a
device mesh; `tests/distributed/` lays variables out on real (host) devices.
"""

import keras
import pytest

import keras_lora

MESH = keras.distribution.DeviceMesh((2,), ["model"], devices=["cpu:0", "cpu:1"])


def build_model() -> keras.Model:
    """A Dense pair (column-, then row-sharded), attention projections in and
    out of the heads, a convolution and an embedding, named for the rules."""
    ids = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 8, name="embed")(ids)
    x = keras.layers.Dense(16, name="up")(x)
    x = keras.layers.Dense(8, name="down")(x)
    heads = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), name="query"
    )(x)
    x = keras.layers.EinsumDense("abde,dec->abc", output_shape=(None, 8), name="out")(
        heads
    )
    x = keras.layers.Conv1D(6, 3, name="conv")(x)
    return keras.Model(ids, x)


KERNEL_RULES = {
    "embed/embeddings": ("model", None),
    "up/kernel": (None, "model"),
    "down/kernel": ("model", None),
    "query/kernel": (None, "model", None),
    "out/kernel": ("model", None, None),
    "conv/kernel": (None, None, "model"),
}

# Each factor axis that stands for a kernel axis is laid out as that axis; the
# rank axis (and a 1x1 convolution's size-1 axis) is replicated. A factor with
# nothing sharded gets no rule.
EXPECTED = {
    "embed/default/lora_a": ("model", None),
    "up/default/lora_b": (None, "model"),
    "down/default/lora_a": ("model", None),
    "query/default/lora_b": (None, "model", None),
    "out/default/lora_a": ("model", None, None),
    "conv/default/lora_b": (None, None, "model"),
}


def layout_map_with(rules) -> keras.distribution.LayoutMap:
    layout_map = keras.distribution.LayoutMap(MESH)
    for pattern, axes in rules.items():
        layout_map[pattern] = axes
    return layout_map


def axes_of(layout_map, variable):
    layout = layout_map[variable.path]
    return None if layout is None else layout.axes


def adapter_layouts(model, layout_map) -> dict:
    """`{variable path: axes or None}` for every adapter factor of `model`."""
    return {
        variable.path: axes_of(layout_map, variable)
        for layer in keras_lora.lora_layers(model).values()
        for adapter in layer.adapters.values()
        for variable in (adapter.lora_a, adapter.lora_b)
    }


def test_factors_are_laid_out_like_their_kernel_axes():
    model = build_model()
    layout_map = layout_map_with(KERNEL_RULES)
    added = keras_lora.add_adapter_layouts(model, layout_map)
    assert len(added) == len(EXPECTED)
    lora_model = keras_lora.convert(model, rank=2)

    layouts = adapter_layouts(lora_model, layout_map)
    assert len(layouts) == 2 * len(KERNEL_RULES)
    for path, axes in layouts.items():
        assert axes == EXPECTED.get(path), path
    for layer in keras_lora.lora_layers(lora_model).values():
        # The kernel's own rule is untouched, and every rule fits its factor.
        assert (
            axes_of(layout_map, layer.kernel_variable)
            == KERNEL_RULES[layer.kernel_variable.path]
        )
        for variable in (layer.lora_a, layer.lora_b):
            axes = axes_of(layout_map, variable)
            assert axes is None or len(axes) == len(variable.shape)


def test_later_adapters_of_any_name_get_the_rules():
    model = build_model()
    layout_map = layout_map_with(KERNEL_RULES)
    lora_model = keras_lora.convert(model, rank=2)
    keras_lora.add_adapter_layouts(lora_model, layout_map)
    keras_lora.add_adapter(lora_model, "task_b", keras_lora.LoraConfig(rank=3))

    layer = keras_lora.lora_layers(lora_model)["up"]
    assert axes_of(layout_map, layer.adapters["task_b"].lora_b) == (None, "model")
    assert axes_of(layout_map, layer.adapters["task_b"].lora_a) is None


def test_unsharded_kernels_and_other_layers_get_no_rule():
    model = build_model()
    layout_map = layout_map_with({"up/kernel": (None, "model"), "up/bias": ("model",)})
    added = keras_lora.add_adapter_layouts(model, layout_map)
    assert added == {"^up/[^/]+/lora_b$": (None, "model")}
    assert len(layout_map) == 3


def test_a_users_rule_for_a_factor_wins_and_a_second_call_adds_nothing():
    model = build_model()
    layout_map = layout_map_with({**KERNEL_RULES, "up/default/lora_b": (None, None)})
    added = keras_lora.add_adapter_layouts(model, layout_map)
    assert len(added) == len(EXPECTED) - 1
    assert keras_lora.add_adapter_layouts(model, layout_map) == {}
    lora_model = keras_lora.convert(model, rank=2)
    assert axes_of(layout_map, keras_lora.lora_layers(lora_model)["up"].lora_b) == (
        None,
        None,
    )


def test_a_rule_that_does_not_fit_the_kernel_is_refused_and_nothing_is_added():
    model = build_model()
    layout_map = layout_map_with(
        {"up/kernel": (None, "model"), "down/kernel": ("model",)}
    )
    with pytest.raises(
        ValueError, match=r"rule for kernel 'down/kernel' of shape \(16, 8\) has 1 axes"
    ):
        keras_lora.add_adapter_layouts(model, layout_map)
    assert len(layout_map) == 2


def test_bad_arguments_are_refused():
    layout_map = layout_map_with({})
    with pytest.raises(TypeError, match="`model` must be a Keras model or layer"):
        keras_lora.add_adapter_layouts("model", layout_map)
    with pytest.raises(TypeError, match="`layout_map` must be a keras.distribution"):
        keras_lora.add_adapter_layouts(build_model(), {"up/kernel": (None, "model")})
