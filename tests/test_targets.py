"""Tests for keras_lora.targets: which layers a config selects."""

import keras
import pytest

from keras_lora.targets import (
    is_broad,
    normalize_targets,
    pattern_value,
    select,
    unwrapped,
)

ATTENTION = ("query", "key", "value", "attention_output")


def transformer_layers(blocks=2):
    """Paths to real Keras layers, as the model walker reports them."""
    layers = {"embedding": keras.layers.Embedding(16, 8, name="embedding")}
    for block in range(blocks):
        prefix = f"block_{block}"
        attention = keras.layers.MultiHeadAttention(
            num_heads=2, key_dim=4, name="self_attention"
        )
        attention.build((None, 3, 8), (None, 3, 8))
        layers[f"{prefix}/self_attention"] = attention
        for projection in ("query_dense", "key_dense", "value_dense", "output_dense"):
            sublayer = getattr(attention, projection)
            layers[f"{prefix}/self_attention/{sublayer.name}"] = sublayer
        layers[f"{prefix}/dropout"] = keras.layers.Dropout(0.1, name="dropout")
        layers[f"{prefix}/ffn/dense_1"] = keras.layers.Dense(16, name="dense_1")
        layers[f"{prefix}/ffn/dense_2"] = keras.layers.Dense(8, name="dense_2")
    layers["norm"] = keras.layers.LayerNormalization(name="norm")
    layers["conv"] = keras.layers.Conv2D(4, 3, name="conv")
    layers["classifier"] = keras.layers.Dense(2, name="classifier")
    return layers


@pytest.fixture(scope="module")
def layers():
    return transformer_layers()


def attention_paths(block, names=ATTENTION):
    return [f"block_{block}/self_attention/{name}" for name in names]


# Target forms.


def test_none_selects_every_layer_with_a_wrapper(layers):
    expected = [
        "embedding",
        *attention_paths(0),
        "block_0/ffn/dense_1",
        "block_0/ffn/dense_2",
        *attention_paths(1),
        "block_1/ffn/dense_1",
        "block_1/ffn/dense_2",
        "conv",
        "classifier",
    ]
    assert select(layers) == expected


def test_layer_name_matches_at_every_depth(layers):
    assert select(layers, "query") == ["block_0/self_attention/query"] + [
        "block_1/self_attention/query"
    ]
    assert select(layers, "classifier") == ["classifier"]


def test_exact_path(layers):
    assert select(layers, "block_1/self_attention/value") == [
        "block_1/self_attention/value"
    ]


def test_partial_path_matches_whole_names_from_the_end(layers):
    assert select(layers, "self_attention/key") == attention_paths(0, ["key"]) + (
        attention_paths(1, ["key"])
    )
    assert select(layers, "ffn/dense_1") == [
        "block_0/ffn/dense_1",
        "block_1/ffn/dense_1",
    ]


def test_name_must_match_a_whole_name(layers):
    with pytest.raises(ValueError, match="'uery' matches no layer"):
        select(layers, "uery")


@pytest.mark.parametrize(
    "glob, expected",
    [
        ("*/query", attention_paths(0, ["query"]) + attention_paths(1, ["query"])),
        ("block_1/self_attention/*", attention_paths(1)),
        ("block_[0]/ffn/dense_?", ["block_0/ffn/dense_1", "block_0/ffn/dense_2"]),
        ("*dense_2", ["block_0/ffn/dense_2", "block_1/ffn/dense_2"]),
    ],
)
def test_glob_matches_the_full_path(layers, glob, expected):
    assert select(layers, glob) == expected


def test_regex_must_match_the_full_path(layers):
    assert select(layers, "re:block_0/.*/(query|value)") == attention_paths(
        0, ["query", "value"]
    )
    with pytest.raises(ValueError, match="'re:query' matches no layer"):
        select(layers, "re:query")


def test_layer_class_matches_instances(layers):
    assert select(layers, keras.layers.EinsumDense) == attention_paths(
        0
    ) + attention_paths(1)
    assert select(layers, keras.layers.Embedding) == ["embedding"]


def test_layer_class_matches_subclass_instances():
    class MyDense(keras.layers.Dense):
        pass

    candidates = {"a": MyDense(2, name="a"), "b": keras.layers.Embedding(4, 2)}
    assert select(candidates, keras.layers.Dense) == ["a"]


def test_callable_gets_layer_and_path(layers):
    seen = []

    def wide_dense(layer, path):
        seen.append(path)
        return isinstance(layer, keras.layers.Dense) and layer.units == 16

    assert select(layers, wide_dense) == ["block_0/ffn/dense_1", "block_1/ffn/dense_1"]
    assert seen == list(layers)


def test_list_is_a_union_in_candidate_order(layers):
    selected = select(
        layers, ["classifier", "value", "*/query", keras.layers.Embedding]
    )
    assert selected == [
        "embedding",
        *attention_paths(0, ["query", "value"]),
        *attention_paths(1, ["query", "value"]),
        "classifier",
    ]


def test_tuple_and_overlapping_entries_select_once(layers):
    assert select(layers, ("query", "*/query", "re:.*query")) == attention_paths(
        0, ["query"]
    ) + attention_paths(1, ["query"])


# Exclude.


@pytest.mark.parametrize(
    "exclude",
    [
        "re:block_0/.*",
        "block_0/*",
        lambda layer, path: path.startswith("block_0"),
        ["block_0/self_attention/query", "block_0/ffn/dense_1"],
        ("block_0/self_attention/*", keras.layers.Dropout, "re:block_0/ffn/.*"),
    ],
)
def test_exclude_removes_its_matches(layers, exclude):
    selected = select(layers, ["query", "dense_1"], exclude=exclude)
    assert selected == ["block_1/self_attention/query", "block_1/ffn/dense_1"]


def test_a_container_path_matches_the_container_only(layers):
    # As in peft, a path matches itself, not its sub-layers: use "block_0/*".
    selected = select(layers, "query", exclude="block_0/self_attention")
    assert selected == attention_paths(0, ["query"]) + attention_paths(1, ["query"])


def test_exclude_with_default_targets(layers):
    selected = select(layers, exclude=[keras.layers.EinsumDense, "block_*", "conv"])
    assert selected == ["embedding", "classifier"]


def test_exclude_entry_matching_nothing_raises(layers):
    with pytest.raises(ValueError, match="`exclude` entry 'qkv' matches no layer"):
        select(layers, "query", exclude=["block_0/self_attention/query", "qkv"])


def test_excluding_everything_raises(layers):
    with pytest.raises(ValueError, match="removes every layer that `targets` selects"):
        select(layers, "query", exclude="*/query")


# Layers without a wrapper.


@pytest.mark.parametrize(
    "target, listed",
    [
        ("dropout", "block_0/dropout (Dropout), block_1/dropout (Dropout)"),
        ("block_0/dropout", "block_0/dropout (Dropout)."),
        ("self_attention", "block_0/self_attention (MultiHeadAttention)"),
    ],
)
def test_plain_name_of_layer_without_wrapper_raises(layers, target, listed):
    with pytest.raises(ValueError, match="no LoRA wrapper") as info:
        select(layers, ["query", target])
    message = str(info.value)
    assert f"`targets` entry '{target}' selects layers" in message
    assert listed in message
    assert "Dense, EinsumDense, Conv1D, Conv2D, Conv3D, Embedding" in message
    assert "register_wrapper" in message


def test_plain_name_matching_layers_with_and_without_wrapper_raises():
    candidates = {
        "a/head": keras.layers.Dense(2, name="head"),
        "b/head": keras.layers.Dropout(0.5, name="head"),
    }
    with pytest.raises(ValueError, match="b/head \\(Dropout\\)"):
        select(candidates, "head")
    assert select(candidates, "*/head") == ["a/head"]


@pytest.mark.parametrize(
    "target",
    ["*", "block_0/*", "re:.*", lambda layer, path: True, keras.layers.Layer],
)
def test_broad_target_skips_layers_without_wrapper(layers, target):
    selected = select(layers, target)
    assert "block_0/dropout" not in selected
    assert "block_0/self_attention" not in selected
    assert "block_0/self_attention/query" in selected


@pytest.mark.parametrize(
    "target",
    ["*/dropout", "re:norm", lambda layer, path: "drop" in path, keras.layers.Dropout],
)
def test_broad_target_matching_only_layers_without_wrapper_raises(layers, target):
    with pytest.raises(ValueError, match="selects layers that have no LoRA wrapper"):
        select(layers, target)


def test_no_layer_with_a_wrapper_raises():
    candidates = {
        "dropout": keras.layers.Dropout(0.5),
        "norm": keras.layers.Activation("relu"),
    }
    with pytest.raises(ValueError, match="No layer of the model has a LoRA wrapper"):
        select(candidates)


# Targets matching nothing.


def test_unmatched_target_lists_paths_and_suggests(layers):
    with pytest.raises(ValueError) as info:
        select(layers, ["query", "qeury"])
    message = str(info.value)
    assert "`targets` entry 'qeury' matches no layer" in message
    assert "Did you mean 'query'?" in message
    assert "block_1/self_attention/query" in message
    assert "Received: targets=['query', 'qeury']" in message


def test_unmatched_target_shortens_the_paths_of_big_models():
    layers = {
        f"layer_{i}/dense": keras.layers.Dense(2, name="dense") for i in range(50)
    }
    with pytest.raises(ValueError) as info:
        select(layers, "*/query")
    message = str(info.value)
    assert "layer_19/dense, ... and 30 more (layer names: dense)" in message
    assert "layer_20/" not in message


@pytest.mark.parametrize(
    "target, fragment",
    [
        (keras.layers.Conv3D, "class Conv3D matches no layer"),
        (lambda layer, path: False, "callable .*<lambda> matches no layer"),
        ("re:block_9/.*", "'re:block_9/.\\*' matches no layer"),
    ],
)
def test_every_unmatched_form_raises(layers, target, fragment):
    with pytest.raises(ValueError, match=fragment):
        select(layers, target)


# Invalid targets.


@pytest.mark.parametrize(
    "targets, error, fragment",
    [
        (
            3,
            TypeError,
            "Each entry of `targets` must be a layer path.*Received: targets=3",
        ),
        (["query", 1.5], TypeError, "entry of type float"),
        (int, TypeError, "must be a keras.layers.Layer subclass"),
        ([], ValueError, "`targets` must not be empty; pass None"),
        ("", ValueError, "Strings in `targets` must not be empty"),
        ("re:", ValueError, "Strings in `targets` must not be empty"),
        ("re:block_(", ValueError, "'re:block_\\(' is not a valid regular expression"),
        ({"query"}, TypeError, "entry of type set"),
    ],
)
def test_invalid_targets_raise(layers, targets, error, fragment):
    with pytest.raises(error, match=fragment):
        select(layers, targets)
    with pytest.raises(error, match=fragment.replace("targets", "exclude")):
        select(layers, "query", exclude=targets)


def test_invalid_candidates_raise():
    with pytest.raises(TypeError, match="`candidates` must be a mapping"):
        select([keras.layers.Dense(2)])
    with pytest.raises(TypeError, match="`candidates` must be a mapping"):
        select({"a": "not a layer"})


def test_normalize_targets():
    assert normalize_targets(None) is None
    assert normalize_targets("query") == ("query",)
    assert normalize_targets(["a", keras.layers.Dense]) == ("a", keras.layers.Dense)


# require_wrapper=False: any layer type, for `train` or among LoRA layers.


def test_without_wrapper_requirement_any_layer_matches(layers):
    selected = select(
        layers, ["norm", "classifier", "*/dropout"], require_wrapper=False
    )
    assert selected == ["block_0/dropout", "block_1/dropout", "norm", "classifier"]
    assert select(layers, require_wrapper=False) == list(layers)
    assert select(layers, exclude="block_*", require_wrapper=False) == [
        "embedding",
        "norm",
        "conv",
        "classifier",
    ]


def test_argument_names_the_field_in_errors(layers):
    with pytest.raises(ValueError, match="`train` entry 'head' matches no layer"):
        select(layers, ["norm", "head"], require_wrapper=False, argument="train")
    with pytest.raises(TypeError, match="Each entry of `train` must be"):
        select(layers, [3], require_wrapper=False, argument="train")
    with pytest.raises(ValueError, match="`train` entry 'dropout' selects layers"):
        select(layers, "dropout", argument="train")
    with pytest.raises(ValueError, match="removes every layer that `train` selects"):
        select(layers, "norm", "norm", require_wrapper=False, argument="train")


# pattern_value: peft's rank_pattern / alpha_pattern semantics.


@pytest.mark.parametrize(
    "path, patterns, expected",
    [
        ("block_0/self_attention/query", {"query": 4}, 4),
        ("block_0/self_attention/query", {"self_attention/query": 4}, 4),
        ("block_0/self_attention/query", {"block_0/self_attention/query": 4}, 4),
        ("query", {"query": 4}, 4),
        ("block_0/self_attention/query", {"uery": 4}, None),
        ("block_0/self_attention/query", {"self_attention": 4}, None),
        ("block_0/self_attention/query", {"block_0/.*": 2, "query": 4}, 2),
        ("block_0/self_attention/query", {"query": 4, "block_0/.*": 2}, 4),
        ("block_1/self_attention/value", {"block_0/.*": 2, "query|value": 6}, 6),
        ("block_1/ffn/dense_1", {r"block_\d+/ffn/dense_\d": 3}, 3),
        ("block_1/ffn/dense_1", {}, None),
    ],
)
def test_pattern_value(path, patterns, expected):
    assert pattern_value(path, patterns) == expected


def test_pattern_value_invalid_regex_raises():
    with pytest.raises(ValueError, match="Pattern key 'query\\(' is not a valid"):
        pattern_value("query", {"query(": 4})


# The "all-linear" preset.


def test_all_linear_selects_dense_and_einsum_dense_but_the_output_layers(layers):
    selected = select(layers, "all-linear", output_paths=["classifier"])
    expected = []
    for block in range(2):
        expected += attention_paths(block)
        expected += [f"block_{block}/ffn/dense_1", f"block_{block}/ffn/dense_2"]
    assert selected == expected


def test_all_linear_without_output_layers_selects_every_linear_layer(layers):
    assert "classifier" in select(layers, "all-linear")
    assert "conv" not in select(layers, "all-linear")
    assert "embedding" not in select(layers, "all-linear")


def test_all_linear_takes_exclude(layers):
    selected = select(layers, "all-linear", exclude="block_0/*")
    assert selected[0] == "block_1/self_attention/query"


def test_all_linear_with_only_output_layers_raises():
    head = {"head": keras.layers.Dense(2, name="head")}
    with pytest.raises(ValueError, match=r"'all-linear' finds no Dense.*\['head'\]"):
        select(head, "all-linear", output_paths=["head"])


@pytest.mark.parametrize(
    "targets, argument",
    [(["all-linear", "conv"], "targets"), ("all-linear", "exclude")],
)
def test_all_linear_is_a_preset_for_the_whole_of_targets(layers, targets, argument):
    with pytest.raises(ValueError, match="preset for the whole of `targets`"):
        normalize_targets(targets, argument)


def test_is_broad():
    assert is_broad(None)
    assert is_broad("all-linear")
    assert is_broad(("all-linear",))
    assert not is_broad(["query"])


class DenseWithMode(keras.layers.Dense):
    """A Dense subclass whose call takes an extra argument."""

    def call(self, inputs, mode=None):
        return super().call(inputs)


def test_unwrapped_lists_subclasses_whose_call_a_wrapper_cannot_cover(layers):
    candidates = {**layers, "moded": DenseWithMode(2, name="moded")}
    reasons = unwrapped(candidates)
    assert list(reasons) == ["moded"]
    assert "changes the call signature of keras.layers.Dense" in reasons["moded"]
    assert "register_wrapper" in reasons["moded"]
    assert unwrapped(candidates, "all-linear") == reasons
    assert unwrapped(candidates, exclude="moded") == {}
    assert "moded" not in select(candidates)


def test_a_suggestion_names_each_close_match_once():
    """A top-level layer's path is also its name; it is suggested once."""
    candidates = {"hidden": keras.layers.Dense(2, name="hidden")}
    with pytest.raises(ValueError, match="matches no layer") as error:
        select(candidates, ["hiden"])
    assert "Did you mean 'hidden'?" in str(error.value)
