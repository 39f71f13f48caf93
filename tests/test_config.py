"""Tests for keras_lora.config.LoraConfig."""

import copy
import dataclasses
import json
import pickle

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_lora.config import LoraConfig


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class RegisteredDense(keras.layers.Dense):
    pass


def json_round_trip(config):
    return LoraConfig.from_dict(json.loads(json.dumps(config.to_dict())))


def full_config():
    return LoraConfig(
        rank=16,
        alpha=32,
        dropout=0.1,
        targets=["query", "*/value", "re:block_[01]/.*", keras.layers.EinsumDense],
        exclude=("block_0/*", RegisteredDense),
        use_rslora=True,
        init="gaussian",
        bias="lora_only",
        train=["classifier", "re:norm.*"],
        rank_pattern={"block_0/.*": 4, "query": 8},
        alpha_pattern={"value": 2.5},
        adapter_name="task_a",
    )


# Defaults and normalization.


def test_defaults():
    config = LoraConfig()
    assert config.rank == 8
    assert config.alpha is None
    assert config.dropout == 0.0
    assert config.targets is None
    assert config.exclude is None
    assert config.use_rslora is False
    assert config.init == "default"
    assert config.bias == "none"
    assert config.train == ()
    assert config.rank_pattern == {}
    assert config.alpha_pattern == {}
    assert config.adapter_name == "default"


def test_values_are_normalized():
    config = LoraConfig(
        rank=np.int64(4),
        alpha=16,
        dropout=0,
        targets="query",
        exclude=["key"],
        train=["head"],
        rank_pattern={"q": np.int32(2)},
        alpha_pattern={"q": 3},
    )
    assert type(config.rank) is int and config.rank == 4
    assert type(config.alpha) is float and config.alpha == 16.0
    assert type(config.dropout) is float
    assert config.targets == ("query",)
    assert config.exclude == ("key",)
    assert config.train == ("head",)
    assert type(config.rank_pattern["q"]) is int
    assert type(config.alpha_pattern["q"]) is float
    json.dumps(config.to_dict())


def test_single_train_string_is_one_entry():
    assert LoraConfig(train="classifier").train == ("classifier",)


# Validation of every field.


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (
            {"rank": 0},
            ValueError,
            "`rank` must be a positive integer. Received: rank=0",
        ),
        ({"rank": -2}, ValueError, "Received: rank=-2"),
        ({"rank": 2.5}, ValueError, "Received: rank=2.5"),
        ({"rank": True}, ValueError, "Received: rank=True"),
        ({"rank": "8"}, ValueError, "Received: rank='8'"),
        ({"alpha": 0}, ValueError, "`alpha` must be a positive number.*alpha=0"),
        ({"alpha": -1.0}, ValueError, "Received: alpha=-1.0"),
        ({"alpha": float("inf")}, ValueError, "Received: alpha=inf"),
        ({"alpha": float("nan")}, ValueError, "Received: alpha=nan"),
        ({"alpha": "16"}, ValueError, "Received: alpha='16'"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, "Received: dropout=-0.1"),
        ({"dropout": "0.1"}, ValueError, "Received: dropout='0.1'"),
        ({"use_rslora": 1}, TypeError, "`use_rslora` must be a bool"),
        ({"init": "xavier"}, ValueError, "`init` must be one of.*init='xavier'"),
        ({"init": True}, ValueError, "Received: init=True"),
        ({"bias": "some"}, ValueError, "`bias` must be one of.*bias='some'"),
        ({"bias": None}, ValueError, "Received: bias=None"),
        ({"targets": 3}, TypeError, "Each entry of `targets` must be.*targets=3"),
        ({"targets": []}, ValueError, "`targets` must not be empty"),
        ({"targets": "re:("}, ValueError, "'re:\\(' is not a valid regular"),
        ({"targets": [int]}, TypeError, "A class in `targets` must be a keras"),
        ({"exclude": [None]}, TypeError, "Each entry of `exclude` must be"),
        ({"exclude": ""}, ValueError, "Strings in `exclude` must not be empty"),
        ({"train": 3}, TypeError, "`train` must be a list of layer paths.*train=3"),
        ({"train": [""]}, TypeError, "Received: train=\\[''\\]"),
        ({"train": [keras.layers.Dense]}, TypeError, "`train` must be a list"),
        ({"train": ["re:("]}, ValueError, "`train` entry 're:\\(' is not a valid"),
        ({"rank_pattern": {"q": 0}}, ValueError, "`rank_pattern` values must be posi"),
        ({"rank_pattern": {"q": 2.5}}, ValueError, "rank_pattern=\\{'q': 2.5\\}"),
        ({"rank_pattern": {"q": True}}, ValueError, "`rank_pattern` values must"),
        ({"rank_pattern": {"q(": 4}}, ValueError, "`rank_pattern` key 'q\\(' is not"),
        ({"rank_pattern": {1: 4}}, TypeError, "`rank_pattern` keys must be non-empty"),
        ({"rank_pattern": [("q", 4)]}, TypeError, "`rank_pattern` must be a dict"),
        ({"alpha_pattern": {"q": -1}}, ValueError, "`alpha_pattern` values must be"),
        ({"alpha_pattern": {"q": "x"}}, ValueError, "alpha_pattern=\\{'q': 'x'\\}"),
        ({"alpha_pattern": {"[": 4}}, ValueError, "`alpha_pattern` key '\\[' is not"),
        ({"alpha_pattern": None}, TypeError, "`alpha_pattern` must be a dict"),
        ({"adapter_name": ""}, ValueError, "`adapter_name` must be a non-empty"),
        ({"adapter_name": 3}, ValueError, "Received: adapter_name=3"),
        ({"adapter_name": "a/b"}, ValueError, "cannot contain '/'"),
    ],
)
def test_invalid_field_raises(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("init", ["default", "gaussian", False])
def test_every_init_is_accepted(init):
    assert LoraConfig(init=init).init == init


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_every_bias_is_accepted(bias):
    assert LoraConfig(bias=bias).bias == bias


def test_callable_and_class_targets_are_accepted():
    def predicate(layer, path):
        return path.endswith("query")

    config = LoraConfig(targets=[predicate, keras.layers.Dense])
    assert config.targets == (predicate, keras.layers.Dense)


# Frozen, unaliased, hashable.


def test_config_is_frozen():
    config = LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4


def test_patterns_are_read_only_copies():
    pattern = {"query": 4}
    config = LoraConfig(rank_pattern=pattern, alpha_pattern=pattern)
    pattern["key"] = 2
    assert config.rank_pattern == {"query": 4}
    with pytest.raises(TypeError):
        config.rank_pattern["value"] = 2
    with pytest.raises(TypeError):
        config.alpha_pattern["value"] = 2


def test_lists_are_copied_to_tuples():
    targets, train = ["query"], ["head"]
    config = LoraConfig(targets=targets, train=train)
    targets.append("key")
    train.append("norm")
    assert config.targets == ("query",)
    assert config.train == ("head",)


def test_configs_are_hashable_and_compare_by_value():
    assert hash(full_config()) == hash(full_config())
    assert full_config() == full_config()
    assert len({full_config(), full_config(), LoraConfig()}) == 2
    assert LoraConfig(rank=4) != LoraConfig(rank=8)


def test_pattern_order_matters_for_equality():
    first = LoraConfig(rank_pattern={"a": 1, "b": 2})
    assert first != LoraConfig(rank_pattern={"b": 2, "a": 1})


def test_replace_validates_again():
    config = dataclasses.replace(full_config(), rank=4, targets="key")
    assert config.rank == 4 and config.targets == ("key",)
    assert config.rank_pattern == full_config().rank_pattern
    with pytest.raises(ValueError, match="Received: rank=0"):
        dataclasses.replace(config, rank=0)


# to_dict / from_dict.


def test_json_round_trip_of_every_field():
    config = full_config()
    assert json_round_trip(config) == config


def test_json_round_trip_of_defaults():
    assert json_round_trip(LoraConfig()) == LoraConfig()


def test_to_dict_has_one_plain_entry_per_field():
    data = full_config().to_dict()
    assert list(data) == [field.name for field in dataclasses.fields(LoraConfig)]
    assert data["targets"] == [
        "query",
        "*/value",
        "re:block_[01]/.*",
        {"class": "EinsumDense"},
    ]
    assert data["exclude"] == [
        "block_0/*",
        {"class": "keras_lora_tests>RegisteredDense"},
    ]
    assert data["train"] == ["classifier", "re:norm.*"]
    assert type(data["rank_pattern"]) is dict
    assert list(data["rank_pattern"]) == ["block_0/.*", "query"]


@pytest.mark.parametrize(
    "layer_class",
    [keras.layers.Dense, keras.layers.Conv2D, keras.layers.Embedding, RegisteredDense],
)
def test_class_target_round_trip(layer_class):
    config = LoraConfig(targets=layer_class)
    restored = json_round_trip(config)
    assert restored.targets == (layer_class,)


def test_class_target_resolved_in_custom_object_scope():
    class ScopedDense(keras.layers.Dense):
        pass

    data = {"targets": [{"class": "ScopedDense"}]}
    with pytest.raises(ValueError, match="A class in `targets` must be saved as"):
        LoraConfig.from_dict(data)
    with keras.saving.custom_object_scope({"ScopedDense": ScopedDense}):
        assert LoraConfig.from_dict(data).targets == (ScopedDense,)
        assert json_round_trip(LoraConfig(targets=ScopedDense)).targets == (
            ScopedDense,
        )


def test_unregistered_class_cannot_be_saved():
    class LocalDense(keras.layers.Dense):
        pass

    config = LoraConfig(exclude=LocalDense)
    with pytest.raises(ValueError, match="`exclude` holds the class .*LocalDense"):
        config.to_dict()


@pytest.mark.parametrize("field", ["targets", "exclude"])
def test_callable_target_cannot_be_saved(field):
    config = LoraConfig(**{field: ["query", lambda layer, path: True]})
    with pytest.raises(ValueError, match=f"`{field}` holds a callable.*names, globs"):
        config.to_dict()


@pytest.mark.parametrize(
    "entry",
    [{"class": "NoSuchLayer"}, {"class": "relu"}, {"class": 3}, {"name": "Dense"}],
)
def test_from_dict_bad_class_entry_raises(entry):
    with pytest.raises(ValueError, match="A class in `exclude` must be saved as"):
        LoraConfig.from_dict({"exclude": [entry]})


def test_from_dict_unknown_keys_raise():
    with pytest.raises(ValueError, match="keys that LoraConfig does not know: "):
        LoraConfig.from_dict({"rank": 4, "lora_alpha": 8, "r": 4})
    with pytest.raises(ValueError, match="\\['lora_alpha', 'r'\\]"):
        LoraConfig.from_dict({"rank": 4, "lora_alpha": 8, "r": 4})


def test_from_dict_requires_a_mapping():
    with pytest.raises(TypeError, match="`config` must be a dict"):
        LoraConfig.from_dict([("rank", 4)])


def test_from_dict_fills_defaults_and_validates():
    assert LoraConfig.from_dict({"rank": 4, "targets": "query"}) == LoraConfig(
        rank=4, targets="query"
    )
    with pytest.raises(ValueError, match="Received: rank=0"):
        LoraConfig.from_dict({"rank": 0})


@settings(max_examples=50, deadline=None)
@given(
    rank=st.integers(1, 512),
    alpha=st.none() | st.floats(0.01, 1e4),
    dropout=st.floats(0.0, 0.99),
    targets=st.none()
    | st.lists(st.sampled_from(["query", "*/value", "re:.*"]), min_size=1),
    rank_pattern=st.dictionaries(
        st.sampled_from(["q", "k.*", "block_0/.*"]), st.integers(1, 64)
    ),
    use_rslora=st.booleans(),
    init=st.sampled_from(["default", "gaussian", False]),
)
def test_json_round_trip_property(
    rank, alpha, dropout, targets, rank_pattern, use_rslora, init
):
    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        rank_pattern=rank_pattern,
        use_rslora=use_rslora,
        init=init,
    )
    assert json_round_trip(config) == config


# resolved: per-layer rank and alpha.


@pytest.mark.parametrize(
    "kwargs, path, expected",
    [
        ({}, "block_0/query", (8, 8.0)),
        ({"rank": 4}, "query", (4, 4.0)),
        ({"rank": 4, "alpha": 16}, "query", (4, 16.0)),
        # alpha=None means each layer's own (resolved) rank.
        ({"rank_pattern": {"query": 2}}, "block_0/query", (2, 2.0)),
        ({"alpha": 16, "rank_pattern": {"query": 2}}, "block_0/query", (2, 16.0)),
        ({"alpha_pattern": {"query": 3}}, "block_0/query", (8, 3.0)),
        ({"alpha_pattern": {"query": 3}}, "block_0/key", (8, 8.0)),
        ({"rank_pattern": {"block_0/.*": 2, "query": 4}}, "block_0/query", (2, 2.0)),
        ({"rank_pattern": {"query": 4, "block_0/.*": 2}}, "block_0/query", (4, 4.0)),
        ({"rank_pattern": {"uery": 4}}, "block_0/query", (8, 8.0)),
        (
            {
                "rank": 8,
                "alpha": 16,
                "rank_pattern": {"q": 4},
                "alpha_pattern": {"q": 1},
            },
            "a/q",
            (4, 1.0),
        ),
    ],
)
def test_resolved(kwargs, path, expected):
    rank, alpha = LoraConfig(**kwargs).resolved(path)
    assert (rank, alpha) == expected
    assert type(rank) is int and type(alpha) is float


def test_copy_and_pickle_keep_the_config():
    config = LoraConfig(targets=["query", keras.layers.Dense], rank_pattern={"q": 2})
    assert copy.deepcopy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(TypeError):
        copy.deepcopy(config).rank_pattern["k"] = 1
