"""LoraReversibleEmbedding: the lookup and the reverse (tied) projection
against NumPy, with `logit_soft_cap` and `reverse_dtype`, untied weights,
training from the reverse direction, merging, saving, adapter files, routing,
quantized bases, keras-hub's class, and what it refuses."""

import ast
import pathlib
import sys
import types

import keras
import numpy as np
import pytest
from testing.layer_checks import (
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
    same_variables,
)
from testing.model_checks import assert_fit_changes_only, save_and_load
from testing.references import numpy, numpy_weights

import keras_lora
from keras_lora import LoraEmbedding, LoraReversibleEmbedding
from keras_lora.layers import registry

ReversibleEmbedding = getattr(keras.layers, "ReversibleEmbedding", None)

# Keras 3.12 lacks the class; an older keras-hub's own class still works there.
needs_keras_class = pytest.mark.skipif(
    ReversibleEmbedding is None,
    reason="keras.layers.ReversibleEmbedding is missing (added in Keras 3.13)",
)

VOCABULARY, WIDTH, RANK = 10, 6, 4
# A (1, 2, 6) batch gives 20 logits, fewer than the 60 kernel entries: the
# factorised path. A (2, 3, 6) batch gives 60: an inference call folds.
FEW, MANY = (1, 2, WIDTH), (2, 3, WIDTH)


def ids(shape=(2, 5), seed=0):
    values = np.random.default_rng(seed).integers(1, VOCABULARY, size=shape)
    values[:, -1] = 0
    return values.astype("int32")


def hidden(shape=FEW, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def wrap(randomize=True, **base_kwargs):
    base = ReversibleEmbedding(VOCABULARY, WIDTH, name="token_embedding", **base_kwargs)
    base.build()
    wrapper = LoraReversibleEmbedding(base, rank=RANK, alpha=2.0)
    if randomize:
        randomize_adapter(wrapper)
    return wrapper


def soft_cap(logits, cap):
    return logits if cap is None else np.tanh(logits / cap) * cap


def reverse_reference(wrapper, x, cap=None):
    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    x = x.astype("float64")
    return soft_cap(x @ embeddings.T + scale * (x @ lora_b.T) @ lora_a.T, cap)


def base_model(seed=0, **base_kwargs):
    """ids -> embedding -> Dense -> embedding(reverse=True): one layer used in
    both directions, as a keras-hub causal LM uses its token embedding."""
    keras.utils.set_random_seed(seed)
    embedding = ReversibleEmbedding(
        VOCABULARY, WIDTH, name="token_embedding", **base_kwargs
    )
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Dense(WIDTH, name="mix")(embedding(inputs))
    return keras.Model(inputs, embedding(x, reverse=True))


# -- the math ------------------------------------------------------------------


@needs_keras_class
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_lookup_is_rows_of_e_plus_scaled_rows_of_a_times_b(tie_weights):
    wrapper = wrap(tie_weights=tie_weights)
    x = ids()
    outputs = run_layer_test(wrapper, x)
    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    expected = embeddings[x] + scale * lora_a[x] @ lora_b
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


@needs_keras_class
@pytest.mark.parametrize("shape", [FEW, MANY], ids=["factorised", "folded"])
@pytest.mark.parametrize("cap", [None, 1.5], ids=["no_cap", "soft_cap"])
def test_tied_reverse_is_x_et_plus_scaled_x_bt_at_then_soft_cap(shape, cap):
    wrapper = wrap(logit_soft_cap=cap)
    x = hidden(shape)
    assert wrapper._folding_is_cheaper(
        keras.ops.convert_to_tensor(x), reverse=True
    ) == (shape == MANY)
    expected = reverse_reference(wrapper, x, cap)
    # training=True always takes the factorised path (there is no dropout).
    for training in (False, True):
        outputs = numpy(wrapper(x, reverse=True, training=training))
        assert outputs.shape == shape[:-1] + (VOCABULARY,)
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    symbolic = wrapper(keras.Input(batch_shape=shape), reverse=True)
    assert tuple(symbolic.shape) == shape[:-1] + (VOCABULARY,)


@needs_keras_class
@pytest.mark.parametrize("shape", [FEW, MANY], ids=["factorised", "folded"])
@pytest.mark.parametrize("cap", [None, 1.5], ids=["no_cap", "soft_cap"])
def test_reverse_dtype_computes_the_adapter_term_as_the_base_computes_logits(
    shape, cap
):
    wrapper = wrap(reverse_dtype="float16", logit_soft_cap=cap)
    x = hidden(shape)
    # The base layer holding E + scale * A @ B computes what the wrapper must.
    merged = ReversibleEmbedding(
        VOCABULARY, WIDTH, reverse_dtype="float16", logit_soft_cap=cap
    )
    merged.build()
    merged.embeddings.assign(wrapper.merged_kernel())
    expected = numpy(merged(x, reverse=True))
    for training in (False, True):
        outputs = wrapper(x, reverse=True, training=training)
        assert keras.backend.standardize_dtype(outputs.dtype) == "float16"
        # float16 logits of size ~5: a few float16 steps (2**-8) apart.
        np.testing.assert_allclose(numpy(outputs), expected, rtol=0, atol=1e-2)
        np.testing.assert_allclose(
            numpy(outputs), reverse_reference(wrapper, x, cap), rtol=0, atol=2e-2
        )


@needs_keras_class
@pytest.mark.parametrize("shape", [FEW, MANY], ids=["factorised", "folded"])
def test_reverse_dtype_float32_under_mixed_bfloat16_keeps_float32_logits(
    shape, dtype_policy
):
    dtype_policy("mixed_bfloat16")
    wrapper = wrap(reverse_dtype="float32", logit_soft_cap=3.0)
    # Inside a model, as in keras-hub: called alone under a mixed policy, a
    # Keras Embedding (and so the wrapper) reads its variables in bfloat16.
    inputs = keras.Input(batch_shape=shape)
    model = keras.Model(inputs, wrapper(inputs, reverse=True))
    x = hidden(shape)
    for training in (False, True):
        outputs = model(x, training=training)
        assert keras.backend.standardize_dtype(outputs.dtype) == "float32"
        # All in float32: a bfloat16 adapter term would be ~1e-3 off.
        np.testing.assert_allclose(
            numpy(outputs), reverse_reference(wrapper, x, 3.0), rtol=0, atol=1e-5
        )


@needs_keras_class
def test_untied_reverse_is_the_base_projection_unadapted():
    wrapper = wrap(tie_weights=False, logit_soft_cap=2.0)
    x = hidden(MANY)
    reverse_kernel = numpy(wrapper.layer.reverse_embeddings).astype("float64")
    expected = soft_cap(x.astype("float64") @ reverse_kernel, 2.0)
    for training in (False, True):
        outputs = numpy(wrapper(x, reverse=True, training=training))
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)


@needs_keras_class
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_a_fresh_adapter_leaves_both_directions_unchanged(tie_weights):
    wrapper = wrap(randomize=False, tie_weights=tie_weights, logit_soft_cap=1.5)
    base = wrapper.layer
    x = ids()
    np.testing.assert_array_equal(numpy(wrapper(x)), numpy(base(x)))
    for shape in (FEW, MANY):
        h = hidden(shape)
        for training in (False, True):
            np.testing.assert_array_equal(
                numpy(wrapper(h, reverse=True, training=training)),
                numpy(base(h, reverse=True)),
            )


# -- training --------------------------------------------------------------------


@needs_keras_class
def test_the_reverse_direction_alone_trains_a_and_b_not_e():
    wrapper = wrap(randomize=False, logit_soft_cap=3.0)
    inputs = keras.Input(FEW[1:])
    model = keras.Model(inputs, wrapper(inputs, reverse=True))
    assert same_variables(model.trainable_weights, [wrapper.lora_a, wrapper.lora_b])
    # A starts at zero, so B gets its first gradient at the second step.
    assert_fit_changes_only(
        model,
        hidden((4, 2, WIDTH)),
        trained=[wrapper.lora_a, wrapper.lora_b],
        frozen=[wrapper.layer.embeddings],
    )


@needs_keras_class
def test_merged_layer_refuses_training_in_reverse():
    wrapper = wrap()
    wrapper.merge()
    with pytest.raises(ValueError, match="cannot be trained.*unmerge"):
        wrapper(hidden(), reverse=True, training=True)


# -- merging -----------------------------------------------------------------------


@needs_keras_class
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_merge_and_unmerge_keep_both_directions(tie_weights):
    wrapper = wrap(tie_weights=tie_weights, logit_soft_cap=1.5)
    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    inputs = [(ids(), {}), (hidden(FEW), {"reverse": True})]
    inputs.append((hidden(MANY), {"reverse": True}))
    before = [numpy(wrapper(x, **kwargs)) for x, kwargs in inputs]

    wrapper.merge()
    np.testing.assert_allclose(
        numpy(wrapper.layer.embeddings),
        embeddings + scale * lora_a @ lora_b,
        rtol=0,
        atol=1e-6,
    )
    for (x, kwargs), expected in zip(inputs, before, strict=True):
        np.testing.assert_allclose(numpy(wrapper(x, **kwargs)), expected, atol=1e-5)

    wrapper.unmerge()
    np.testing.assert_allclose(
        numpy(wrapper.layer.embeddings), embeddings, rtol=0, atol=1e-6
    )
    for (x, kwargs), expected in zip(inputs, before, strict=True):
        np.testing.assert_allclose(numpy(wrapper(x, **kwargs)), expected, atol=1e-5)


# -- saving ------------------------------------------------------------------------


@needs_keras_class
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_get_config_round_trip_computes_the_same_in_both_directions(tie_weights):
    wrapper = wrap(tie_weights=tie_weights, logit_soft_cap=1.5)
    config = wrapper.get_config()
    restored = LoraReversibleEmbedding.from_config(config)
    restored.build()
    restored.set_weights(wrapper.get_weights())
    assert restored.get_config() == config
    assert restored.layer.tie_weights is tie_weights
    np.testing.assert_array_equal(numpy(restored(ids())), numpy(wrapper(ids())))
    h = hidden()
    np.testing.assert_array_equal(
        numpy(restored(h, reverse=True)), numpy(wrapper(h, reverse=True))
    )


def converted_model(seed=0, **base_kwargs):
    model = base_model(seed, **base_kwargs)
    lora_model = keras_lora.convert(
        model, rank=RANK, alpha=2.0, targets=["token_embedding"]
    )
    return lora_model, lora_model.get_layer("token_embedding")


@needs_keras_class
def test_convert_adapts_both_directions_of_the_shared_layer():
    lora_model, wrapper = converted_model(logit_soft_cap=2.0)
    assert isinstance(wrapper, LoraReversibleEmbedding)
    assert same_variables(
        lora_model.trainable_weights, [wrapper.lora_a, wrapper.lora_b]
    )
    x = ids()
    plain = base_model(logit_soft_cap=2.0)
    np.testing.assert_array_equal(numpy(lora_model(x)), numpy(plain(x)))

    randomize_adapter(wrapper)
    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    adapted = embeddings + scale * lora_a @ lora_b
    mix = lora_model.get_layer("mix")
    h = adapted[x] @ numpy(mix.kernel) + numpy(mix.bias)
    expected = soft_cap(h @ adapted.T, 2.0)
    np.testing.assert_allclose(numpy(lora_model(x)), expected, rtol=0, atol=1e-5)


@needs_keras_class
def test_keras_file_round_trip_keeps_outputs_and_trainable_variables(tmp_path):
    lora_model, wrapper = converted_model(logit_soft_cap=2.0)
    randomize_adapter(wrapper)
    x = ids()
    loaded = save_and_load(lora_model, tmp_path)
    assert isinstance(loaded.get_layer("token_embedding"), LoraReversibleEmbedding)
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(lora_model(x)))
    assert [v.path for v in loaded.trainable_weights] == [
        v.path for v in lora_model.trainable_weights
    ]


@needs_keras_class
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    lora_model, wrapper = converted_model(logit_soft_cap=2.0)
    randomize_adapter(wrapper)
    x = ids()
    expected = numpy(lora_model(x))
    served = keras_lora.merge_and_unload(lora_model)
    embedding = served.get_layer("token_embedding")
    assert type(embedding) is ReversibleEmbedding
    np.testing.assert_allclose(numpy(served(x)), expected, rtol=0, atol=1e-5)


@needs_keras_class
def test_adapter_file_loads_into_a_fresh_model_exactly(tmp_path):
    lora_model, wrapper = converted_model(logit_soft_cap=2.0)
    randomize_adapter(wrapper)
    x = ids()
    keras_lora.save_adapter(lora_model, tmp_path / "adapter")
    loaded = keras_lora.load_adapter(
        base_model(logit_soft_cap=2.0), tmp_path / "adapter"
    )
    assert isinstance(loaded.get_layer("token_embedding"), LoraReversibleEmbedding)
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(lora_model(x)))


# -- per-example adapters ------------------------------------------------------------


@needs_keras_class
def test_per_example_adapters_route_both_directions():
    wrapper = wrap(logit_soft_cap=1.5)
    wrapper.add_adapter("second", rank=2, alpha=3.0)
    randomize_adapter(wrapper, "second", seed=1)
    names = ["second", "__base__", "default"]
    x, h = ids((3, 5)), hidden((3, 2, WIDTH))
    lookup = numpy(wrapper(x, adapter_names=names))
    logits = numpy(wrapper(h, reverse=True, adapter_names=names))
    for row, name in enumerate(names):
        if name == "__base__":
            wrapper.disable_adapters()
        else:
            wrapper.set_adapter(name)
        np.testing.assert_allclose(lookup[row], numpy(wrapper(x))[row], atol=1e-6)
        np.testing.assert_allclose(
            logits[row], numpy(wrapper(h, reverse=True))[row], atol=1e-6
        )
        wrapper.enable_adapters()
    with pytest.raises(ValueError, match="inference only"):
        wrapper(h, reverse=True, training=True, adapter_names=names)


# -- what it refuses -----------------------------------------------------------------


@needs_keras_class
def test_dora_is_refused_with_tied_weights():
    base = ReversibleEmbedding(VOCABULARY, WIDTH, name="tied_embedding")
    with pytest.raises(ValueError, match="'tied_embedding' cannot take a DoRA"):
        LoraReversibleEmbedding(base, rank=RANK, use_dora=True)

    wrapper = wrap()
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match="tied to the output projection"):
        wrapper.add_adapter("dora", rank=2, use_dora=True)
    assert_unchanged(wrapper, state)


@needs_keras_class
def test_dora_with_untied_weights_is_the_embedding_dora():
    wrapper = wrap(randomize=False, tie_weights=False)
    wrapper.add_adapter("dora", rank=2, use_dora=True, init=False)
    wrapper.set_adapter("dora")
    plain = keras.layers.Embedding(VOCABULARY, WIDTH)
    plain.build()
    plain.embeddings.assign(wrapper.layer.embeddings)
    reference = LoraEmbedding(plain, rank=2, use_dora=True, adapter_name="dora")
    for mine, theirs in zip(
        wrapper.adapters["dora"].parameters.values(),
        reference.adapters["dora"].parameters.values(),
        strict=True,
    ):
        theirs.assign(mine)
    x = ids()
    np.testing.assert_allclose(
        numpy(wrapper(x)), numpy(reference(x)), rtol=0, atol=1e-6
    )
    h = hidden()
    np.testing.assert_array_equal(
        numpy(wrapper(h, reverse=True)), numpy(wrapper.layer(h, reverse=True))
    )


@needs_keras_class
def test_a_plain_embedding_and_dropout_are_refused():
    refused = "wraps keras.layers.ReversibleEmbedding layers.*LoraEmb"
    with pytest.raises(TypeError, match=refused):
        LoraReversibleEmbedding(keras.layers.Embedding(VOCABULARY, WIDTH))
    with pytest.raises(ValueError, match="takes no dropout"):
        LoraReversibleEmbedding(ReversibleEmbedding(VOCABULARY, WIDTH), dropout=0.1)


class ScaledReversibleEmbedding(ReversibleEmbedding or keras.layers.Embedding):
    def call(self, inputs, reverse=False, scale=1.0):
        return super().call(inputs, reverse=reverse) * scale


@needs_keras_class
def test_subclass_with_another_call_signature_has_no_wrapper():
    layer = ScaledReversibleEmbedding(VOCABULARY, WIDTH)
    assert registry.wrapper_for(layer) is None
    with pytest.raises(TypeError, match="changes the call signature"):
        LoraReversibleEmbedding(layer)


# -- quantized bases -------------------------------------------------------------------


@needs_keras_class
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tied_base_adds_the_adapter_term_and_refuses_merging(mode):
    base = ReversibleEmbedding(VOCABULARY, WIDTH, logit_soft_cap=2.0)
    base.build()
    base.quantize(mode)
    wrapper = LoraReversibleEmbedding(base, rank=RANK, alpha=2.0)
    randomize_adapter(wrapper)
    _, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    x, h = ids(), hidden(MANY)
    np.testing.assert_allclose(
        numpy(wrapper(x)) - numpy(base(x)), scale * lora_a[x] @ lora_b, atol=1e-5
    )
    # The cap applies to the quantized logits plus the adapter term.
    base.logit_soft_cap = None
    uncapped = numpy(base(h, reverse=True))
    base.logit_soft_cap = 2.0
    expected = soft_cap(uncapped + scale * (h @ lora_b.T) @ lora_a.T, 2.0)
    np.testing.assert_allclose(
        numpy(wrapper(h, reverse=True)), expected, rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="quantized base"):
        wrapper.merge()


@needs_keras_class
def test_quantized_untied_base_is_refused():
    base = ReversibleEmbedding(VOCABULARY, WIDTH, tie_weights=False, name="untied")
    base.build()
    base.quantize("int8")
    with pytest.raises(ValueError, match="'untied' is an int8-quantized.*untied"):
        LoraReversibleEmbedding(base)


# -- masks -----------------------------------------------------------------------------


@needs_keras_class
def test_mask_zero_masks_the_lookup_as_the_base_does():
    # Keras' ReversibleEmbedding attaches its mask in `call`; the wrapper too,
    # through Keras' private `set_keras_mask` (this fails if it moves).
    wrapper = wrap(mask_zero=True)
    x = ids()
    pooled = keras.layers.GlobalAveragePooling1D()(wrapper(x))
    vectors = numpy(wrapper(x))
    mask = (x != 0)[..., None]
    expected = (vectors * mask).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(numpy(pooled), expected, rtol=0, atol=1e-6)

    inputs = keras.Input((5,), dtype="int32")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(wrapper(inputs)))
    np.testing.assert_allclose(numpy(model(x)), expected, rtol=0, atol=1e-6)


# -- registration ----------------------------------------------------------------------


@needs_keras_class
def test_keras_and_keras_hub_classes_are_registered():
    assert registry.wrapper_for(ReversibleEmbedding(4, 2)) is LoraReversibleEmbedding
    assert ReversibleEmbedding in registry.supported_classes()
    keras_hub = pytest.importorskip("keras_hub")
    layer = keras_hub.layers.ReversibleEmbedding(VOCABULARY, WIDTH)
    assert registry.wrapper_for(layer) is LoraReversibleEmbedding
    layer.build()
    wrapper = LoraReversibleEmbedding(layer, rank=RANK, alpha=2.0)
    randomize_adapter(wrapper)
    h = hidden()
    np.testing.assert_allclose(
        numpy(wrapper(h, reverse=True)), reverse_reference(wrapper, h), atol=1e-5
    )


class OwnReversibleEmbedding(keras.layers.Embedding):
    """keras-hub's ReversibleEmbedding as older releases define it: its own
    Embedding subclass, not Keras' class."""

    def __init__(self, input_dim, output_dim, tie_weights=True, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.tie_weights = tie_weights

    def call(self, inputs, reverse=False):
        if reverse:
            return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
        return super().call(inputs)


def test_an_older_keras_hub_class_is_found_once_keras_hub_is_imported(monkeypatch):
    layer = OwnReversibleEmbedding(VOCABULARY, WIDTH)
    monkeypatch.delitem(sys.modules, "keras_hub", raising=False)
    assert registry.wrapper_for(layer) is None

    fake = types.SimpleNamespace(
        layers=types.SimpleNamespace(ReversibleEmbedding=OwnReversibleEmbedding)
    )
    monkeypatch.setitem(sys.modules, "keras_hub", fake)
    assert registry.wrapper_for(layer) is LoraReversibleEmbedding
    assert OwnReversibleEmbedding in registry.supported_classes()
    layer.build()
    wrapper = LoraReversibleEmbedding(layer, rank=RANK, alpha=2.0)
    randomize_adapter(wrapper)
    x, h = ids(), hidden()
    embeddings, _, lora_a, lora_b, scale = numpy_weights(wrapper)
    np.testing.assert_allclose(
        numpy(wrapper(x)), embeddings[x] + scale * lora_a[x] @ lora_b, atol=1e-5
    )
    np.testing.assert_allclose(
        numpy(wrapper(h, reverse=True)), reverse_reference(wrapper, h), atol=1e-5
    )


def test_keras_lora_never_imports_keras_hub():
    # keras-hub is optional and slow to import: its class is looked up in
    # `sys.modules` only. (A subprocess import check costs a TensorFlow start.)
    package = pathlib.Path(keras_lora.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "keras_hub" for m in modules), path
