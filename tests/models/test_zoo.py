"""Every generic check of keras_lora, run over the model zoo (`zoo.ZOO`): real
keras-hub backbones and keras.applications models, each from a tiny random
config.

Tests are grouped by model (the module-scoped `name` fixture), and the
expensive part is shared: the `adapted` fixture builds a model once, converts
it with `targets=None` and fits it; `attention` converts another with its
`attention_targets`; `reloaded` loads `adapted`'s adapter files into a fresh
one. Each records every number the checks assert on as it goes, so a check
that later changes a model (the merge) cannot change another's assertion; the
checks that use `adapted.model` itself only read it (save, call).
"""

import contextlib
import dataclasses
import logging
import re

import keras
import numpy as np
import pytest
from backends import applications_zoo
from integration.inspection import (
    adapter_variables,
    assert_bit_identical,
    assert_no_keras_lora_class,
    base_variables,
    trainable_by_layer,
    values,
)
from integration.models import assert_outputs_close, assert_outputs_differ, outputs

import keras_lora
from keras_lora.tree.walk import walk
from models.zoo import BATCH, EXPECTED_ADAPTED, ZOO

RANK = 4
ADAPTABLE = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Embedding,
)
PROJECTIONS = (keras.layers.Dense, keras.layers.EinsumDense)

# A trainable variable the loss does not reach (an adapter left out of the
# computation) fails the fit instead of warning.
pytestmark = pytest.mark.filterwarnings("error:Gradients do not exist:UserWarning")


def keras_tracked_layers(layer, recursive=True) -> list:
    """Every layer Keras itself tracks under `layer` (not `layer` itself).

    `_flatten_layers` is private Keras API, used on purpose and only here: it
    is what Keras collects weights from and saves, so it is the ground truth
    keras_lora's walk must reach. If a Keras release renames it, every test of
    this module fails here, loudly.
    """
    return list(layer._flatten_layers(include_self=False, recursive=recursive))


def expected_targets(model) -> list:
    """The layers a model's `attention_targets` must adapt, found through
    Keras' tracking rather than keras_lora's walk: the Dense and EinsumDense
    layers each attention layer owns (q, k, v and output projections) in a
    transformer, every ungrouped convolution in a CNN."""
    layers = keras_tracked_layers(model)
    attention = [
        layer for layer in layers if type(layer).__name__.endswith("Attention")
    ]
    if attention:
        return [
            child
            for layer in attention
            for child in keras_tracked_layers(layer, recursive=False)
            if isinstance(child, PROJECTIONS)
        ]
    return [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.Conv2D) and layer.groups == 1
    ]


def regression_targets(structure):
    """Random targets shaped like `structure` (a model's outputs: a tensor or
    a dict of tensors), for a mean-squared-error fit."""
    rng = np.random.default_rng(7)
    return keras.tree.map_structure(
        lambda output: rng.normal(size=tuple(output.shape)).astype("float32"),
        structure,
    )


def optimizer():
    """SGD with momentum: a slot per trainable variable, as Adam has two,
    and several times cheaper than Adam in an eager step."""
    return keras.optimizers.SGD(0.05, momentum=0.9)


def flat_numpy(structure) -> list[np.ndarray]:
    """A model's outputs (a tensor or a dict) as a flat list of NumPy arrays,
    as `integration.models.outputs` returns them."""
    return [keras.ops.convert_to_numpy(x) for x in keras.tree.flatten(structure)]


@contextlib.contextmanager
def keras_lora_log():
    """The records the `"keras_lora"` logger emits inside the block. A
    module-scoped fixture cannot take pytest's function-scoped `caplog`, so
    this is its equivalent for one logger."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("keras_lora")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=applications_zoo)
        if hasattr(factory, "application")
        else name
        for name, factory in ZOO.items()
    ],
)
def name(request):
    return request.param


@dataclasses.dataclass
class Adapted:
    """A zoo model converted with `targets=None` and fitted, with what was
    recorded on the way."""

    model: keras.Model
    inputs: object
    base_weights: list  # values, before convert
    tracked: list  # adaptable layers Keras tracks, before convert
    paths: dict  # id(layer) -> path, from the walk before convert
    records: list  # "keras_lora" log records emitted by convert
    base_outputs: list
    converted_outputs: list
    trainable_ids: set
    adapter_ids: set
    base_before: list
    base_after: list
    adapters_before: list
    adapters_after: list
    losses: list
    trained_outputs: list


@pytest.fixture(scope="module")
def adapted(name) -> Adapted:
    model, inputs, _ = ZOO[name]()
    base_weights = values(model.weights)
    base_outputs = outputs(model, inputs)
    tracked = [
        layer for layer in keras_tracked_layers(model) if isinstance(layer, ADAPTABLE)
    ]
    paths = {id(site.layer): path for path, site in walk(model).items()}
    with keras_lora_log() as records:
        lora_model = keras_lora.convert(model, rank=RANK, targets=None)
    converted = lora_model(inputs)
    adapters = list(adapter_variables(lora_model).values())
    base_before, adapters_before = (
        values(base_variables(lora_model)),
        values(adapters),
    )
    trainable_ids = {id(v) for v in lora_model.trainable_weights}
    # A real `fit`: two steps on the batch, eager, which is several times
    # faster than tracing for models this small.
    lora_model.compile(optimizer=optimizer(), loss="mse", run_eagerly=True)
    history = lora_model.fit(
        inputs,
        regression_targets(converted),
        batch_size=BATCH,
        epochs=2,
        verbose=0,
    )
    return Adapted(
        model=lora_model,
        inputs=inputs,
        base_weights=base_weights,
        tracked=tracked,
        paths=paths,
        records=records,
        base_outputs=base_outputs,
        converted_outputs=flat_numpy(converted),
        trainable_ids=trainable_ids,
        adapter_ids={id(v) for v in adapters},
        base_before=base_before,
        base_after=values(base_variables(lora_model)),
        adapters_before=adapters_before,
        adapters_after=values(adapters),
        losses=history.history["loss"],
        trained_outputs=outputs(lora_model, inputs),
    )


@dataclasses.dataclass
class Attention:
    """A zoo model converted with its `attention_targets`, as recorded."""

    expected_ids: set  # ids of the layers the targets must adapt
    wrapped: dict  # path -> id(base layer) of each LoRA layer
    base_outputs: list
    converted_outputs: list


@pytest.fixture(scope="module")
def attention(name, adapted) -> Attention:
    model, inputs, targets = ZOO[name]()
    # The factory is deterministic: `adapted` recorded this model's outputs.
    base_outputs = adapted.base_outputs
    expected_ids = {id(layer) for layer in expected_targets(model)}
    lora_model = keras_lora.convert(model, rank=RANK, targets=targets)
    layers = keras_lora.lora_layers(lora_model)
    return Attention(
        expected_ids=expected_ids,
        wrapped={path: id(layer.layer) for path, layer in layers.items()},
        base_outputs=base_outputs,
        converted_outputs=outputs(lora_model, inputs),
    )


def test_targets_none_wraps_or_names_every_layer_keras_tracks(adapted):
    layers = keras_lora.lora_layers(adapted.model)
    wrapped = {id(layer.layer) for layer in layers.values()}
    assert wrapped
    # Nothing is adapted that Keras does not track (its weights would be lost),
    # and Keras tracks every wrapper in the LoRA model.
    assert wrapped <= {id(layer) for layer in adapted.tracked}
    tracked_after = {id(layer) for layer in keras_tracked_layers(adapted.model)}
    assert {id(layer) for layer in layers.values()} <= tracked_after

    skipped = [layer for layer in adapted.tracked if id(layer) not in wrapped]
    unreachable = [layer.name for layer in skipped if id(layer) not in adapted.paths]
    assert not unreachable, f"the walk does not reach {unreachable}"
    entries = {
        adapted.paths[id(layer)]: re.compile(
            rf"(^|[\s:;,]){re.escape(adapted.paths[id(layer)])} "
            rf"\({type(layer).__name__}\): \S"
        )
        for layer in skipped
    }
    # One record names every skipped layer as `path (ClassName): reason`;
    # other records (a rank above what a layer's update can have) may follow.
    naming = [
        record
        for record in adapted.records
        if any(entry.search(record.getMessage()) for entry in entries.values())
    ]
    assert len(naming) == (1 if skipped else 0), [r.getMessage() for r in naming]
    for record in naming:
        assert record.levelno == logging.WARNING
        for path, entry in entries.items():
            assert entry.search(record.getMessage()), (path, record.getMessage())


def test_targets_none_leaves_outputs_unchanged(adapted):
    assert_outputs_close(adapted.converted_outputs, adapted.base_outputs, atol=1e-6)


def test_attention_targets_wrap_every_projection_and_leave_outputs(name, attention):
    assert len(attention.expected_ids) == EXPECTED_ADAPTED[name]
    assert len(attention.wrapped) == EXPECTED_ADAPTED[name]
    assert set(attention.wrapped.values()) == attention.expected_ids
    assert_outputs_close(attention.converted_outputs, attention.base_outputs, atol=1e-6)


def test_fit_changes_adapters_only(adapted):
    assert adapted.trainable_ids == adapted.adapter_ids
    assert np.isfinite(adapted.losses).all()
    assert_bit_identical(adapted.base_before, adapted.base_after)
    changed = [
        not np.array_equal(old, new)
        for old, new in zip(
            adapted.adapters_before, adapted.adapters_after, strict=True
        )
    ]
    assert sum(changed) >= 1, f"no adapter of {len(changed)} changed"
    assert_outputs_differ(adapted.trained_outputs, adapted.base_outputs)


def test_keras_round_trip_keeps_outputs_and_trainable_variables(adapted, tmp_path):
    lora_model = adapted.model
    lora_model.save(tmp_path / "lora.keras")
    loaded = keras.models.load_model(tmp_path / "lora.keras")

    assert type(loaded) is type(lora_model)
    loaded_outputs = loaded(adapted.inputs)
    assert_outputs_close(flat_numpy(loaded_outputs), adapted.trained_outputs, 1e-6)
    assert list(keras_lora.lora_layers(loaded)) == list(
        keras_lora.lora_layers(lora_model)
    )
    # Layer path and variable name of each trainable variable: Keras' own
    # variable paths lose a nested Sequential's name on reload, LoRA or not.
    expected = trainable_by_layer(lora_model)
    assert trainable_by_layer(loaded) == expected

    # The optimizer a train step builds after loading covers the same
    # variables as one built over the original LoRA model.
    expected_optimizer = optimizer()
    expected_optimizer.build(lora_model.trainable_variables)
    loaded.compile(optimizer=optimizer(), loss="mse", run_eagerly=True)
    targets = regression_targets(loaded_outputs)
    loaded.train_on_batch(adapted.inputs, targets)
    assert len(loaded.optimizer.variables) == len(expected_optimizer.variables)
    assert trainable_by_layer(loaded) == expected


@dataclasses.dataclass
class Reloaded:
    """A fresh model of the same factory, with the `adapted` model's adapter
    saved by `save_adapter` and loaded by `load_adapter`, as recorded."""

    model: keras.Model
    inputs: object
    base_weights: list  # values, before loading
    paths: list  # LoRA layer paths after loading
    outputs: list


@pytest.fixture(scope="module")
def reloaded(name, adapted, tmp_path_factory) -> Reloaded:
    directory = tmp_path_factory.mktemp(name) / "adapter"
    keras_lora.save_adapter(adapted.model, directory)
    fresh, inputs, _ = ZOO[name]()
    base_weights = values(fresh.weights)
    lora_model = keras_lora.load_adapter(fresh, directory)
    return Reloaded(
        model=lora_model,
        inputs=inputs,
        base_weights=base_weights,
        paths=list(keras_lora.lora_layers(lora_model)),
        outputs=outputs(lora_model, inputs),
    )


def test_adapter_files_load_into_a_fresh_model(adapted, reloaded):
    # The factory is deterministic: the same base weights.
    assert_bit_identical(adapted.base_weights, reloaded.base_weights)
    assert reloaded.paths == list(keras_lora.lora_layers(adapted.model))
    assert_outputs_close(reloaded.outputs, adapted.trained_outputs, atol=1e-6)


def test_merge_and_unload_gives_the_lora_outputs(adapted, reloaded):
    # The fitted adapter moves the outputs 10x the tolerance or more, so
    # a merge that lost or mis-scaled it could not pass.
    assert_outputs_differ(reloaded.outputs, adapted.base_outputs, minimum=1e-4)

    served = keras_lora.merge_and_unload(reloaded.model)

    # Merged kernels sum in another order than the factorised path: 1e-5.
    assert_outputs_close(outputs(served, reloaded.inputs), reloaded.outputs, 1e-5)
    assert_no_keras_lora_class(served)
    assert not keras_lora.lora_layers(served)
