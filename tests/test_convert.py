"""Tests for keras_lora.convert: selection, freezing, errors, and what each
model kind becomes. The checks every model kind shares are in
tests/integration/test_model_kinds.py."""

import dataclasses
import inspect
import re

import keras
import numpy as np
import pytest
from integration.inspection import (
    adapter_variables,
    assert_bit_identical,
    assert_same_snapshot,
    base_variables,
    snapshot,
    trainable_by_layer,
    values,
)
from integration.models import (
    MODEL_KINDS,
    SAMPLES,
    SEQUENCE,
    WIDTH,
    TinyBackbone,
    TinyTransformer,
    assert_outputs_close,
    assert_outputs_differ,
    fit_targets,
    outputs,
    train,
)
from testing.cases import CASES, case_id

import keras_lora
from keras_lora.tree.walk import walk

ATTENTION = ("query", "key", "value", "attention_output")


def transformer(blocks=2):
    keras.utils.set_random_seed(0)
    model = TinyTransformer(blocks=blocks, name="transformer")
    inputs = np.random.default_rng(0).normal(size=(SAMPLES, SEQUENCE, WIDTH))
    inputs = inputs.astype("float32")
    model(inputs[:1])
    return model, inputs


def attention(block, names=ATTENTION):
    return [f"block_{block}/self_attention/{name}" for name in names]


def ffn(block):
    return [f"block_{block}/ffn/dense_1", f"block_{block}/ffn/dense_2"]


def trainable_ids(model):
    return {id(variable) for variable in model.trainable_weights}


# Selection.


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"targets": "block_1/self_attention/query"}, attention(1, ["query"])),
        (
            {"targets": ["query", "value"]},
            attention(0, ["query", "value"]) + attention(1, ["query", "value"]),
        ),
        ({"targets": "block_1/*"}, [*attention(1), *ffn(1)]),
        (
            {"targets": r"re:block_\d/self_attention/(query|value)"},
            attention(0, ["query", "value"]) + attention(1, ["query", "value"]),
        ),
        ({"targets": keras.layers.EinsumDense}, attention(0) + attention(1)),
        (
            {"targets": lambda layer, path: path.endswith("dense_2")},
            ["block_0/ffn/dense_2", "block_1/ffn/dense_2"],
        ),
        (
            {"targets": keras.layers.EinsumDense, "exclude": ["key", "block_1/*"]},
            attention(0, ["query", "value", "attention_output"]),
        ),
        ({"targets": None}, [*attention(0), *ffn(0), *attention(1), *ffn(1), "head"]),
    ],
    ids=["path", "name", "glob", "regex", "class", "callable", "exclude", "none"],
)
def test_targets_select_layers_in_every_form(config, expected):
    model, inputs = transformer()
    lora_model = keras_lora.convert(model, rank=2, **config)
    layers = keras_lora.lora_layers(lora_model)
    assert sorted(layers) == sorted(expected)
    assert trainable_ids(lora_model) == set(adapter_variables(lora_model))
    for path, layer in layers.items():
        base_class = keras.layers.Dense if "ffn" in path or path == "head" else None
        assert isinstance(layer.layer, base_class or keras.layers.EinsumDense)


def test_rank_and_alpha_patterns_set_each_layers_rank_and_scale():
    model, _ = transformer()
    lora_model = keras_lora.convert(
        model,
        rank=2,
        alpha=4,
        targets=["query", "value"],
        rank_pattern={"query": 4},
        alpha_pattern={"block_1/.*": 1},
    )
    layers = keras_lora.lora_layers(lora_model)
    expected = {  # path: (rank, scale)
        "block_0/self_attention/query": (4, 4 / 4),
        "block_0/self_attention/value": (2, 4 / 2),
        "block_1/self_attention/query": (4, 1 / 4),
        "block_1/self_attention/value": (2, 1 / 2),
    }
    assert sorted(layers) == sorted(expected)
    for path, (rank, scale) in expected.items():
        adapter = layers[path].adapters["default"]
        assert adapter.rank == rank
        assert adapter.scale == pytest.approx(scale)
        # EinsumDense "abc,cde->abde": A is (c, r), B is (r, heads, head_dim).
        assert tuple(layers[path].lora_a.shape) == (WIDTH, rank)
        assert tuple(layers[path].lora_b.shape) == (rank, 2, WIDTH // 2)


def test_rank_keyword_equals_a_config():
    results = []
    for config in ({"rank": 4, "init": False}, keras_lora.LoraConfig(4, init=False)):
        model, inputs = transformer(blocks=1)
        keras.utils.set_random_seed(1)
        if isinstance(config, dict):
            lora_model = keras_lora.convert(model, **config)
        else:
            lora_model = keras_lora.convert(model, config)
        layers = keras_lora.lora_layers(lora_model)
        results.append(
            (
                list(layers),
                [layer.adapters["default"].settings() for layer in layers.values()],
                outputs(lora_model, inputs),
            )
        )
    (paths, settings, result), (paths_2, settings_2, result_2) = results
    assert paths == paths_2
    assert settings == settings_2
    assert_outputs_close(result, result_2, atol=0)


def test_train_keeps_a_layer_fully_trainable():
    model, inputs = transformer(blocks=1)
    head_kernel = model.head.kernel
    lora_model = keras_lora.convert(
        model, rank=2, targets=["query", "value"], train=["head"]
    )
    assert lora_model.head.trainable
    assert not isinstance(lora_model.head, keras_lora.LoraLayer)
    head = {id(lora_model.head.kernel), id(lora_model.head.bias)}
    assert trainable_ids(lora_model) == set(adapter_variables(lora_model)) | head

    others = [v for v in base_variables(lora_model) if id(v) not in head]
    before = values(others)
    kernel_before = head_kernel.numpy().copy()
    train(lora_model, inputs, fit_targets(lora_model, inputs))
    assert not np.array_equal(head_kernel.numpy(), kernel_before)
    assert_bit_identical(before, values(others))


def bias_variables(model, adapted_only=False):
    """The `bias` variables of the model's layers (a LoRA layer's base's)."""
    found = {}
    for site in walk(model).values():
        layer = site.layer
        is_lora = isinstance(layer, keras_lora.LoraLayer)
        base = layer.layer if is_lora else layer
        bias = getattr(base, "bias", None)
        if isinstance(bias, keras.Variable) and (is_lora or not adapted_only):
            found[id(bias)] = bias
    return found


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_choose_which_biases_train(bias):
    model, inputs = transformer(blocks=1)
    lora_model = keras_lora.convert(
        model, rank=2, targets=["query", "value"], bias=bias
    )
    biases = {
        "none": {},
        "all": bias_variables(lora_model),
        "lora_only": bias_variables(lora_model, adapted_only=True),
    }[bias]
    expected_count = {"none": 0, "all": 7, "lora_only": 2}[bias]
    assert len(biases) == expected_count
    assert trainable_ids(lora_model) == set(adapter_variables(lora_model)) | set(biases)

    others = [v for v in base_variables(lora_model) if id(v) not in biases]
    before, biases_before = values(others), values(biases.values())
    train(lora_model, inputs, fit_targets(lora_model, inputs))
    assert_bit_identical(before, values(others))
    for old, new in zip(biases_before, values(biases.values()), strict=True):
        assert not np.array_equal(old, new)


# Errors, and the model left unchanged.


def test_passing_a_config_and_fields_is_an_error():
    model, _ = transformer(blocks=1)
    state = snapshot(model)
    with pytest.raises(ValueError, match="either `config` or LoraConfig fields"):
        keras_lora.convert(model, keras_lora.LoraConfig(rank=4), rank=4)
    with pytest.raises(TypeError, match="must be a keras_lora.LoraConfig"):
        keras_lora.convert(model, {"rank": 4})
    assert_same_snapshot(state, snapshot(model))


def test_converting_a_converted_model_points_to_add_adapter():
    model, _ = transformer(blocks=1)
    lora_model = keras_lora.convert(model, rank=2)
    state = snapshot(lora_model)
    with pytest.raises(ValueError, match=r"already has LoRA layers.*add_adapter"):
        keras_lora.convert(lora_model, rank=2)
    assert_same_snapshot(state, snapshot(lora_model))


def test_a_model_that_is_not_built_is_an_error():
    model = keras.Sequential([keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="is not built"):
        keras_lora.convert(model)
    assert not model.built


@pytest.mark.parametrize("value", [keras.layers.Dense(4), "model", None])
def test_a_non_model_is_a_type_error(value):
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        keras_lora.convert(value)


def multi_io():
    return MODEL_KINDS["functional_multi_io"]()[0]


def test_a_target_matching_nothing_lists_the_available_paths():
    model = multi_io()
    state = snapshot(model)
    with pytest.raises(ValueError, match="matches no layer") as error:
        keras_lora.convert(model, targets=["trunk", "nothing"])
    for path in ("conv", "features_dense", "trunk", "dropout", "score", "label"):
        assert re.search(rf"\b{path}\b", str(error.value))
    assert_same_snapshot(state, snapshot(model))


def test_a_target_naming_a_dropout_lists_the_available_paths():
    model = multi_io()
    state = snapshot(model)
    with pytest.raises(ValueError, match="no LoRA wrapper") as error:
        keras_lora.convert(model, targets=["dropout"])
    assert_same_snapshot(state, snapshot(model))
    for path in ("conv", "features_dense", "trunk", "score", "label"):
        assert re.search(rf"\b{path}\b", str(error.value))


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class ScoreHead(keras.layers.Layer):
    """A layer that owns a Dense and an EinsumDense no wrapper can adapt (its
    kernel axis is contracted only), in that order."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.Dense(WIDTH, name="proj")
        self.score = keras.layers.EinsumDense("abc,c->ab", (None,), name="score")

    def call(self, inputs):
        return self.score(self.proj(inputs))


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Scorer(keras.Model):
    """A subclassed model: a Dense rewired first, then a graph to clone."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(WIDTH, name="first")
        self.tower = keras.Sequential(
            [keras.layers.Dense(WIDTH, name="a"), keras.layers.Dense(WIDTH, name="b")],
            name="tower",
        )
        self.score_head = ScoreHead(name="score_head")

    def call(self, inputs):
        return self.score_head(self.tower(self.first(inputs)))


def scorer():
    keras.utils.set_random_seed(0)
    model = Scorer(name="scorer")
    inputs = np.random.default_rng(0).normal(size=(SAMPLES, SEQUENCE, WIDTH))
    model(inputs[:1].astype("float32"))
    return model, inputs.astype("float32")


@pytest.mark.parametrize(
    "make, config, error, message",
    [
        (multi_io, {"targets": ["nothing"]}, ValueError, "matches no layer"),
        (multi_io, {"targets": ["dropout"]}, ValueError, "no LoRA wrapper"),
        (multi_io, {"exclude": ["nothing"]}, ValueError, "matches no layer"),
        (multi_io, {"exclude": "*"}, ValueError, "removes every layer"),
        (multi_io, {"train": ["nothing"]}, ValueError, "matches no layer"),
        (
            multi_io,
            {"targets": ["trunk"], "train": ["trunk"]},
            ValueError,
            "both adapted and fully trained",
        ),
        # A `train` layer holding an adapted one: its frozen base would train.
        (
            lambda: transformer(blocks=1)[0],
            {"targets": ["query"], "train": ["block_0"]},
            ValueError,
            r"cannot hold adapted ones.*\['block_0'\]",
        ),
        # Conv2D with groups=2, named explicitly, refuses an odd rank after
        # Dense layers were wrapped (and their bases frozen).
        (
            lambda: keras.Sequential(
                [
                    keras.Input((4, 4, 4)),
                    keras.layers.Dense(4, name="dense"),
                    keras.layers.Conv2D(4, 1, groups=2, name="conv"),
                ]
            ),
            {"rank": 3, "targets": ["dense", "conv"]},
            ValueError,
            "divisible",
        ),
        # The EinsumDense is refused after `first`, `tower/a`, `tower/b` and
        # `score_head/proj` were wrapped.
        (
            lambda: scorer()[0],
            {"targets": ["first", "a", "b", "proj", "score"]},
            ValueError,
            "cannot adapt 'score'",
        ),
    ],
    ids=[
        "no_match",
        "dropout",
        "exclude_no_match",
        "exclude_all",
        "train_no_match",
        "train_overlap",
        "train_holds_adapted",
        "late_rank",
        "late_einsum",
    ],
)
def test_a_failed_convert_leaves_the_model_unchanged(make, config, error, message):
    model = make()
    state = snapshot(model)
    with pytest.raises(error, match=message):
        keras_lora.convert(model, **config)
    assert_same_snapshot(state, snapshot(model))
    assert not keras_lora.lora_layers(model)


def test_a_convert_failing_while_rewiring_undoes_the_rewiring(monkeypatch):
    model, inputs = scorer()
    expected = outputs(model, inputs)
    state = snapshot(model)
    first, tower = model.first, model.tower

    def failing_clone(*args, **kwargs):
        raise RuntimeError("clone failed")

    # `first` is rewired in place before the tower is cloned.
    monkeypatch.setattr(keras.models, "clone_model", failing_clone)
    with pytest.raises(RuntimeError, match="clone failed"):
        keras_lora.convert(model, targets=["first", "a"], init=False)
    monkeypatch.undo()
    assert model.first is first and model.tower is tower
    assert type(model) is Scorer
    assert_same_snapshot(state, snapshot(model))
    assert_outputs_close(outputs(model, inputs), expected, atol=0)


# What each model kind becomes, and what happens to the model passed in.


@pytest.mark.parametrize("kind", ["sequential", "functional_multi_io", "nested"])
def test_a_graph_model_is_cloned_and_the_input_keeps_base_outputs(kind):
    """The input model still runs and keeps its base outputs (its graph holds
    the base layers), but it is consumed: every layer it shares with the LoRA
    model is frozen."""
    model, inputs = MODEL_KINDS[kind]()
    base = outputs(model, inputs)
    lora_model = keras_lora.convert(model, rank=2)
    assert lora_model is not model
    assert type(lora_model) is type(model)
    assert model.trainable_weights == []
    for layer in keras_lora.lora_layers(lora_model).values():
        assert not layer.layer.trainable
    train(lora_model, inputs, fit_targets(lora_model, inputs))
    assert_outputs_differ(outputs(lora_model, inputs), base)
    assert_outputs_close(outputs(model, inputs), base, atol=1e-6)


def test_a_shared_layer_is_wrapped_once_and_stays_shared():
    model, inputs = MODEL_KINDS["shared_layer"]()
    base_count = len(model.weights)
    lora_model = keras_lora.convert(model, rank=2, init=False)
    wrappers = [layer for layer in lora_model.layers if layer.name == "shared"]
    assert len(wrappers) == 1
    wrapper = wrappers[0]
    assert isinstance(wrapper, keras_lora.LoraDense)
    assert list(keras_lora.lora_layers(lora_model)) == [
        "shared",
        "left_head",
        "right_head",
    ]
    # Both call sites of the graph call the one wrapper.
    layer_configs = lora_model.get_config()["layers"]
    shared_configs = [c for c in layer_configs if c["name"] == "shared"]
    assert len(shared_configs) == 1
    assert len(shared_configs[0]["inbound_nodes"]) == 2
    # One adapter for the shared layer, one per head; nothing counted twice.
    assert len(lora_model.weights) == base_count + 2 * 3
    assert len({id(v) for v in lora_model.weights}) == len(lora_model.weights)
    # Both sites apply the adapted layer: with the same input at both, each
    # head sees the wrapper's output.
    left, _ = inputs
    hidden = wrapper(left)
    results = outputs(lora_model, [left, left])
    for head, result in zip(("left_head", "right_head"), results, strict=True):
        expected = keras.ops.convert_to_numpy(lora_model.get_layer(head)(hidden))
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_a_subclassed_model_is_converted_in_place():
    model, inputs = MODEL_KINDS["subclassed"]()
    query = model.blocks[0].self_attention._query_dense
    lora_model = keras_lora.convert(model, rank=2, targets=["query", "head"])
    assert lora_model is model
    assert isinstance(lora_model, TinyTransformer)
    assert isinstance(lora_model.head, keras_lora.LoraDense)
    wrapper = lora_model.blocks[0].self_attention._query_dense
    assert isinstance(wrapper, keras_lora.LoraEinsumDense)
    assert wrapper.layer is query
    assert lora_model.features(inputs).shape == (SAMPLES, SEQUENCE, WIDTH)


def test_a_functional_subclass_keeps_its_class_methods_and_attributes():
    """A new instance of the class over the cloned graph; the input model
    still runs, but its custom blocks are shared and now hold adapters."""
    model, inputs = MODEL_KINDS["functional_subclass"]()
    base = outputs(model, inputs)
    block = model.transformer_layers[0]
    lora_model = keras_lora.convert(model, rank=2, init=False)

    assert lora_model is not model
    assert isinstance(lora_model, TinyBackbone)
    assert type(lora_model).__name__ == "TinyBackbone"
    assert lora_model.name == model.name
    assert (lora_model.vocabulary_size, lora_model.width) == (16, WIDTH)
    assert isinstance(lora_model.token_embedding, keras_lora.LoraEmbedding)
    assert lora_model.token_embedding in lora_model.layers
    assert isinstance(lora_model.output_dense, keras_lora.LoraDense)
    assert lora_model.transformer_layers[0] is block
    assert isinstance(block.self_attention._query_dense, keras_lora.LoraEinsumDense)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(lora_model.embed(inputs)),
        keras.ops.convert_to_numpy(lora_model.token_embedding(inputs)),
    )
    assert_outputs_differ(outputs(lora_model, inputs), base)
    assert lora_model.get_config()["base"]["config"]["width"] == WIDTH
    # The input model's graph holds the base embedding and output layer but
    # the shared, rewired block: its outputs are neither base nor LoRA ones.
    assert model.token_embedding is lora_model.token_embedding.layer
    assert_outputs_differ(outputs(model, inputs), base)


def test_converting_a_compiled_subclassed_model_drops_what_keras_built_for_it():
    model, inputs = MODEL_KINDS["subclassed"]()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.optimizer.build(model.trainable_variables)
    base = model.predict(inputs, verbose=0)  # traced with the base layers
    lora_model = keras_lora.convert(model, rank=2, init=False)
    assert lora_model is model
    expected = outputs(lora_model, inputs)[0]
    assert_outputs_differ([expected], [base])
    predicted = lora_model.predict(inputs, verbose=0)
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-5)
    # The optimizer built for the base weights is replaced by one built for
    # the adapters, so fit works without recompiling.
    lora_model.run_eagerly = True
    before = values(base_variables(lora_model))
    lora_model.fit(inputs, fit_targets(lora_model, inputs), batch_size=4, verbose=0)
    assert_bit_identical(before, values(base_variables(lora_model)))
    assert_outputs_differ(outputs(lora_model, inputs), [expected])


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class TowerModel(keras.Model):
    """A subclassed model whose constructor builds a Sequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tower = keras.Sequential(
            [
                keras.layers.Dense(WIDTH, name="a"),
                keras.layers.LayerNormalization(name="norm"),
                keras.layers.Dense(WIDTH, name="b"),
            ],
            name="tower",
        )
        self.head = keras.layers.Dense(2, name="head")

    def call(self, inputs):
        return self.head(self.tower(inputs))


def test_a_graph_built_by_a_subclassed_model_round_trips_with_its_adapters(
    tmp_path,
):
    keras.utils.set_random_seed(0)
    model = TowerModel(name="tower_model")
    inputs = np.random.default_rng(0).normal(size=(SAMPLES, WIDTH)).astype("float32")
    model(inputs)
    lora_model = keras_lora.convert(model, rank=2, targets=["a", "b"], init=False)
    expected = outputs(lora_model, inputs)
    lora_model.save(tmp_path / "tower.keras")
    loaded = keras.models.load_model(tmp_path / "tower.keras")
    assert list(keras_lora.lora_layers(loaded)) == ["tower/a", "tower/b"]
    assert_outputs_close(outputs(loaded, inputs), expected, atol=0)
    assert trainable_by_layer(loaded) == trainable_by_layer(lora_model)
    assert not loaded.tower.get_layer("norm").trainable
    assert not loaded.head.trainable


def test_bias_mode_round_trips_through_a_keras_file(tmp_path):
    model, _ = MODEL_KINDS["sequential"]()
    lora_model = keras_lora.convert(model, rank=2, bias="lora_only")
    lora_model.save(tmp_path / "bias.keras")
    loaded = keras.models.load_model(tmp_path / "bias.keras")

    def trainable(model):
        # Keras scopes variable paths differently once loaded; compare by the
        # LoRA layer that owns each variable, its name and shape.
        return sorted(
            (path, variable.name, tuple(variable.shape))
            for path, layer in keras_lora.lora_layers(model).items()
            for variable in layer.trainable_weights
        )

    assert trainable(loaded) == trainable(lora_model)
    assert len(loaded.trainable_weights) == len(lora_model.trainable_weights)


def test_converted_graph_keeps_the_model_dtype_policy_for_loss_scaling(
    dtype_policy,
):
    dtype_policy("mixed_float16")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.Dense(2, dtype="float32"),
        ]
    )
    dtype_policy("float32")
    lora_model = keras_lora.convert(model, rank=2)
    assert lora_model.dtype_policy.name == "mixed_float16"
    lora_model.compile(optimizer="adam", loss="mse")
    assert isinstance(lora_model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_adapter_variable_paths_are_unique_across_blocks():
    # Two attention blocks each hold a `query` and a `value` layer; their
    # adapters must not share a variable path (Keras' `get_state_tree` and
    # `LayoutMap`s key variables by path).
    inputs = keras.Input((SEQUENCE, WIDTH))
    x = inputs
    for index in range(2):
        x = keras.layers.MultiHeadAttention(2, 4, name=f"block_{index}")(x, x)
    lora_model = keras_lora.convert(
        keras.Model(inputs, x), rank=2, targets=["query", "value"]
    )
    lora_model.compile(optimizer="sgd", loss="mse")
    paths = sorted(v.path for v in lora_model.trainable_weights)
    assert paths == sorted(
        f"block_{index}/{layer}/default/{factor}"
        for index in range(2)
        for layer in ("query", "value")
        for factor in ("lora_a", "lora_b")
    )
    state = lora_model.get_state_tree()["trainable_variables"]
    assert sorted(state["block_0"]["query"]["default"]) == ["lora_a", "lora_b"]


# Broad targets: every layer that can take the adapter.


class DenseWithMode(keras.layers.Dense):
    """A Dense subclass whose call takes an extra argument."""

    def call(self, inputs, mode=None):
        return super().call(inputs)


def mixed_cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 6))
    x = keras.layers.Conv2D(6, 1, name="pointwise")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", groups=6, name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = DenseWithMode(5, name="moded")(x)
    x = keras.layers.Dense(5, name="hidden")(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Dropout(0.1)(x))
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).normal(size=(SAMPLES, 4, 4, 6))
    return model, data.astype("float32")


def test_targets_none_skips_what_cannot_take_the_adapter_and_names_it(caplog):
    model, inputs = mixed_cnn()
    base = outputs(model, inputs)
    with caplog.at_level("WARNING", logger="keras_lora"):
        lora_model = keras_lora.convert(model, rank=4)
    assert list(keras_lora.lora_layers(lora_model)) == ["pointwise", "hidden", "head"]
    assert_outputs_close(outputs(lora_model, inputs), base, atol=1e-6)
    [record] = caplog.records
    message = record.getMessage()
    assert "2 cannot and keep no adapter" in message
    assert "depthwise (Conv2D): LoraConv2D 'depthwise' has groups=6" in message
    assert "moded (DenseWithMode): the class changes the call signature" in message
    # Skipped layers are frozen like every other unadapted layer.
    assert not lora_model.get_layer("depthwise").trainable
    assert not lora_model.get_layer("moded").trainable


def test_an_explicit_target_that_cannot_take_the_adapter_still_raises():
    model, _ = mixed_cnn()
    with pytest.raises(ValueError, match="groups=6; `rank` must be divisible"):
        keras_lora.convert(model, rank=4, targets=["pointwise", "depthwise"])
    with pytest.raises(ValueError, match="no LoRA wrapper: moded"):
        keras_lora.convert(model, rank=4, targets=["moded"])
    assert not keras_lora.lora_layers(model)


def test_broad_targets_where_no_layer_can_take_the_adapter_raise():
    inputs = keras.Input((4, 4, 6))
    outputs_ = keras.layers.Conv2D(6, 3, groups=6, name="depthwise")(inputs)
    model = keras.Model(inputs, outputs_)
    with pytest.raises(ValueError, match="No selected layer can take this adapter"):
        keras_lora.convert(model, rank=4)
    assert model.get_layer("depthwise").trainable


def test_all_linear_adapts_every_dense_but_the_output_layer(caplog):
    model, inputs = mixed_cnn()
    with caplog.at_level("WARNING", logger="keras_lora"):
        lora_model = keras_lora.convert(model, rank=2, targets="all-linear")
    assert list(keras_lora.lora_layers(lora_model)) == ["hidden"]
    [record] = caplog.records
    assert "moded (DenseWithMode)" in record.getMessage()
    assert "depthwise" not in record.getMessage()
    config = keras_lora.adapter_config(lora_model)
    assert config.targets == ("all-linear",)


def test_all_linear_on_a_subclassed_model_adapts_every_linear_layer():
    """A subclassed model's outputs cannot be traced to a layer, so, as peft
    does for a model that is not a transformers `PreTrainedModel`, no output
    layer is left out."""
    model, _ = transformer(blocks=1)
    lora_model = keras_lora.convert(model, rank=2, targets="all-linear")
    expected = [*attention(0), *ffn(0), "head"]
    # Under torch a subclassed model lists its sub-layers in another order.
    assert sorted(keras_lora.lora_layers(lora_model)) == sorted(expected)


# Trainable flags that Keras does not save.


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class TokenPrepender(keras.layers.Layer):
    """Owns a weight (a class token) beside a sub-layer, as ViT's embedding."""

    def __init__(self, width=WIDTH, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.projection = keras.layers.Dense(width, name="projection")

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.class_token = self.add_weight(shape=(1, 1, self.width), name="token")

    def call(self, inputs):
        tokens = self.projection(inputs)
        batch = keras.ops.shape(tokens)[0]
        token = keras.ops.broadcast_to(self.class_token, (batch, 1, self.width))
        return keras.ops.concatenate([token, tokens], axis=1)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_a_layer_holding_an_adapter_keeps_its_own_weights_frozen_after_loading(
    tmp_path,
):
    inputs = keras.Input((SEQUENCE, WIDTH))
    outputs_ = keras.layers.Dense(2, name="head")(TokenPrepender(name="embed")(inputs))
    model = keras.Model(inputs, outputs_)
    lora_model = keras_lora.convert(model, rank=2, targets=["projection"])
    token = lora_model.get_layer("embed").class_token
    assert lora_model.get_layer("embed").trainable and not token.trainable
    expected = sorted(v.path for v in lora_model.trainable_weights)
    path = tmp_path / "model.keras"
    lora_model.save(path)
    loaded = keras.models.load_model(path)
    assert sorted(v.path for v in loaded.trainable_weights) == expected
    assert not loaded.get_layer("embed").class_token.trainable


# The signature.


def test_convert_takes_exactly_the_config_fields_with_their_defaults():
    parameters = inspect.signature(keras_lora.convert).parameters
    keywords = {
        name: parameter.default
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    defaults = keras_lora.LoraConfig()
    expected = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    # A pattern's None stands for the config's empty dict.
    expected["rank_pattern"] = expected["alpha_pattern"] = None
    assert list(keywords) == list(expected)
    assert keywords == expected


def test_a_misspelt_field_is_a_type_error_naming_it():
    model, _ = transformer(blocks=1)
    with pytest.raises(TypeError, match="targer"):
        keras_lora.convert(model, targer=["query"])


def test_fields_passed_with_a_config_are_an_error():
    model, _ = transformer(blocks=1)
    with pytest.raises(ValueError, match=r"not both.*\['rank'\]"):
        keras_lora.convert(model, keras_lora.LoraConfig(), rank=2)


def test_a_rank_above_min_fan_in_fan_out_is_named_in_one_warning(caplog):
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(8, 1, name="narrow_in")(inputs)
    x = keras.layers.Conv2D(8, 3, groups=4, padding="same", name="grouped")(x)
    x = keras.layers.Dense(2, name="narrow_out")(x)
    x = keras.layers.Dense(16, name="wide")(keras.layers.Dense(16, name="w0")(x))
    model = keras.Model(inputs, x)
    with caplog.at_level("WARNING", logger="keras_lora"):
        keras_lora.convert(model, rank=4)
    [record] = caplog.records
    message = record.getMessage()
    # Conv 1x1 from 3 channels: fan_in 3. Dense to 2 units: fan_out 2. The
    # grouped conv: 4 groups of (3*3*2, 2) matrices, rank at most 4 * 2 = 8.
    assert "narrow_in (rank 4 > 3), narrow_out (rank 4 > 2), w0 (rank 4 > 2)" in (
        message
    )
    assert "grouped" not in message and "wide" not in message


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_max_rank_is_the_rank_of_a_full_random_update(case):
    """`max_rank` against NumPy: a random update of rank 64 has it."""
    wrapper = case.wrap(rank=64, init=False)
    delta = wrapper.kernel_matrix(wrapper.get_delta_weight())
    # A grouped conv's update is one block of filters per group.
    groups = getattr(wrapper.layer, "groups", 1)
    blocks = np.split(keras.ops.convert_to_numpy(delta), groups, axis=1)
    rank = sum(np.linalg.matrix_rank(block.astype("float64")) for block in blocks)
    assert wrapper.max_rank() == rank
