"""keras-hub task models through `keras_lora.convert`: a converted `CausalLM`,
`TextClassifier` or `ImageClassifier` keeps its class and methods, trains only
its adapters with `fit` (on token ids, images, or raw strings through its
preprocessor), generates through the adapters, and saves and loads.

Every model is built from a tiny random config (no preset, no download) after
`keras.utils.set_random_seed(SEED)`, so two builds hold the same base weights;
tokenizers are built from vocabularies written here. Backbones are named as
`from_preset` names them: a layer's path starts at the backbone's name, which
Keras would otherwise number per process (`gpt2_backbone_1`), and adapter files
are matched by path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import pytest
from integration.inspection import (
    adapter_variables,
    assert_no_keras_lora_class,
    trainable_by_layer,
)

import keras_lora

keras_hub = pytest.importorskip("keras_hub")

SEED = 0
VOCABULARY = 64
SEQUENCE = 8
PROMPT = 4
BATCH = 4
HIDDEN = 16
INTERMEDIATE = 32
IMAGE = 16
CLASSES = 3
TARGETS = ["query", "value"]
# init=False draws both factors at random (peft's debugging init); a large
# scale makes the adapters change greedy decoding of a random tiny model.
VISIBLE_ADAPTER = {"rank": 4, "alpha": 32, "init": False}


def vocabulary_size(preprocessor) -> int:
    """The tokenizer's vocabulary, or `VOCABULARY` for models fed token ids."""
    return (
        VOCABULARY if preprocessor is None else preprocessor.tokenizer.vocabulary_size()
    )


def gpt2_causal_lm(preprocessor=None):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size(preprocessor),
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=2 * SEQUENCE,
        name="gpt2_backbone",
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def llama_causal_lm(preprocessor=None):
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size(preprocessor),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        name="llama_backbone",
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=preprocessor)


def gemma_causal_lm(preprocessor=None):
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size(preprocessor),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        head_dim=HIDDEN // 2,
        name="gemma_backbone",
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=preprocessor)


def bert_text_classifier(preprocessor=None):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size(preprocessor),
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
        name="bert_backbone",
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=CLASSES, preprocessor=preprocessor, dropout=0.0
    )


def vit_image_classifier(preprocessor=None):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        mlp_dim=INTERMEDIATE,
        name="vit_backbone",
    )
    return keras_hub.models.ViTImageClassifier(
        backbone, num_classes=CLASSES, preprocessor=preprocessor
    )


def next_token_batch(seed=SEED):
    """Counting sequences from random starts; the label is the next token."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(1, VOCABULARY, size=(BATCH, 1))
    tokens = (starts + np.arange(SEQUENCE + 1)) % (VOCABULARY - 1) + 1
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((BATCH, SEQUENCE), "int32"),
    }
    return x, tokens[:, 1:].astype("int32")


def token_classification_batch(seed=SEED):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCABULARY, (BATCH, SEQUENCE)).astype("int32"),
        "segment_ids": np.zeros((BATCH, SEQUENCE), "int32"),
        "padding_mask": np.ones((BATCH, SEQUENCE), "int32"),
    }
    return x, rng.integers(0, CLASSES, BATCH).astype("int32")


def image_batch(seed=SEED):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype("float32")
    return images, rng.integers(0, CLASSES, BATCH).astype("int32")


@dataclasses.dataclass(frozen=True)
class Task:
    """A task model factory, a batch of model inputs and labels for it, and
    the paths `targets=TARGETS` adapts."""

    id: str
    build: Callable[..., keras.Model]
    batch: Callable[..., tuple]
    attention: tuple[str, ...]

    def adapted_paths(self) -> list[str]:
        return [f"{block}/{name}" for block in self.attention for name in TARGETS]


def blocks(prefix: str, attention: str, first: int = 0) -> tuple[str, ...]:
    return tuple(f"{prefix}_{index}/{attention}" for index in (first, first + 1))


TASKS = [
    Task(
        "gpt2",
        gpt2_causal_lm,
        next_token_batch,
        blocks("gpt2_backbone/transformer_layer", "self_attention"),
    ),
    Task(
        "llama",
        llama_causal_lm,
        next_token_batch,
        blocks("llama_backbone/transformer_layer", "self_attention"),
    ),
    Task(
        "gemma",
        gemma_causal_lm,
        next_token_batch,
        blocks("gemma_backbone/decoder_block", "attention"),
    ),
    Task(
        "bert",
        bert_text_classifier,
        token_classification_batch,
        blocks("bert_backbone/transformer_layer", "self_attention_layer"),
    ),
    Task(
        "vit",
        vit_image_classifier,
        image_batch,
        blocks("vit_backbone/vit_encoder/transformer_block", "mha", first=1),
    ),
]
CAUSAL_LMS = [task for task in TASKS if task.id in ("gpt2", "llama", "gemma")]


def build(task: Task, preprocessor=None) -> keras.Model:
    """A fresh task model; every build holds the same base weights."""
    keras.utils.set_random_seed(SEED)
    return task.build(preprocessor)


def by_id(tasks):
    return pytest.mark.parametrize("task", tasks, ids=[task.id for task in tasks])


def prompt():
    """The first `PROMPT` tokens of two counting sequences, padded to
    `SEQUENCE`: greedy decoding fills the rest."""
    x, _ = next_token_batch()
    padding_mask = np.zeros((2, SEQUENCE), "int32")
    padding_mask[:, :PROMPT] = 1
    return {
        "token_ids": x["token_ids"][:2] * padding_mask,
        "padding_mask": padding_mask,
    }


def generate(model: keras.Model, inputs=None) -> np.ndarray:
    """Greedy decoding of `prompt()` (or of `inputs`, strings through the
    model's preprocessor)."""
    model.compile(sampler="greedy")
    if inputs is not None:
        return np.asarray(
            model.generate(inputs, max_length=2 * SEQUENCE, stop_token_ids=None)
        )
    return np.asarray(model.generate(prompt(), stop_token_ids=None)["token_ids"])


def logits(model: keras.Model, inputs) -> np.ndarray:
    return model.predict(inputs, verbose=0)


def fit(model: keras.Model, x, y=None, steps: int = 5) -> list[float]:
    """`steps` steps of Adam, over `steps` copies of the batch in one epoch (a
    preprocessor's tf.data pipeline costs seconds per epoch). Returns the loss
    of the first step, then the epoch's running mean after each later one."""

    def repeat(data):
        if isinstance(data, dict):
            return {key: repeat(value) for key, value in data.items()}
        if isinstance(data, list):
            return data * steps
        return None if data is None else np.concatenate([data] * steps)

    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(
        repeat(x),
        repeat(y),
        batch_size=BATCH,
        shuffle=False,
        callbacks=[record],
        verbose=0,
    )
    assert len(losses) == steps
    return losses


def values(model: keras.Model) -> list[tuple[object, np.ndarray]]:
    return [(v, np.array(keras.ops.convert_to_numpy(v))) for v in model.weights]


def assert_only_adapters_changed(model: keras.Model, before) -> None:
    """Every adapter factor moved; every other weight is bit-identical."""
    adapters = adapter_variables(model)
    assert {id(v) for v in model.trainable_weights} == set(adapters)
    for variable, old in before:
        new = keras.ops.convert_to_numpy(variable)
        if id(variable) in adapters:
            assert not np.array_equal(new, old), variable.path
        else:
            np.testing.assert_array_equal(new, old, err_msg=variable.path)


@by_id(TASKS)
def test_convert_keeps_the_task_class_and_its_base_weights(task):
    model = build(task)
    base_weights = model.weights
    lora_model = keras_lora.convert(model, rank=4, targets=TARGETS)
    assert type(lora_model) is type(model)
    assert isinstance(lora_model.backbone, keras_hub.models.Backbone)
    assert list(keras_lora.lora_layers(lora_model)) == task.adapted_paths()
    # Shared, not copied, and frozen.
    lora_weights = {id(v) for v in lora_model.weights}
    assert all(id(v) in lora_weights for v in base_weights)
    assert not any(v.trainable for v in base_weights)
    served = keras_lora.merge_and_unload(lora_model)
    assert type(served) is type(model)
    assert_no_keras_lora_class(served)


@by_id(TASKS)
def test_fit_on_model_inputs_trains_only_the_adapters(task):
    lora_model = keras_lora.convert(build(task), rank=4, targets=TARGETS)
    x, y = task.batch()
    before = values(lora_model)
    losses = fit(lora_model, x, y)
    assert losses[-1] < losses[0]
    assert_only_adapters_changed(lora_model, before)


GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "a t", "Ġ c", "Ġc at", "Ġ s", "Ġs at"]
GPT2_MERGES += ["o n", "Ġ on", "Ġ m", "Ġm at", "Ġ d", "o g", "Ġd og"]
SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the cat.",
    "a cat ran to the dog.",
    "the mat sat on a dog.",
]
WORDS = "the a cat dog sat ran on to mat . good bad film was very not".split()


def gpt2_tokenizer():
    """Byte-level BPE over lowercase letters, '.', and the space marker 'Ġ',
    with merges for a few words."""
    tokens = [*"abcdefghijklmnopqrstuvwxyz.Ġ"]
    # Last, as in GPT-2: the preprocessor pads with id 0.
    tokens += ["".join(merge.split()) for merge in GPT2_MERGES] + ["<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=GPT2_MERGES)


def gpt2_with_preprocessor():
    tokenizer = gpt2_tokenizer()
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE
    )
    return build(TASKS[0], preprocessor)


def bert_with_preprocessor():
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=SEQUENCE
    )
    return build(TASKS[3], preprocessor)


def test_causal_lm_fits_and_generates_strings_through_its_preprocessor():
    lora_model = keras_lora.convert(gpt2_with_preprocessor(), rank=4, targets=TARGETS)
    before = values(lora_model)
    # The preprocessor turns each string into token ids, labels and weights.
    losses = fit(lora_model, SENTENCES)
    assert losses[-1] < losses[0]
    assert_only_adapters_changed(lora_model, before)
    text = generate(lora_model, ["the cat"])
    # Decoding runs to `max_length`: the prompt, then new text.
    assert text[0].startswith("the cat") and len(text[0]) > len("the cat")
    merged = keras_lora.merge_and_unload(lora_model)
    np.testing.assert_array_equal(generate(merged, ["the cat"]), text)


def test_text_classifier_fits_on_strings_through_its_preprocessor():
    lora_model = keras_lora.convert(bert_with_preprocessor(), rank=4, targets=TARGETS)
    texts = ["the film was good", "the film was bad", "a very good dog", "not good"]
    before = values(lora_model)
    losses = fit(lora_model, texts, np.array([0, 1, 2, 1]))
    assert losses[-1] < losses[0]
    assert_only_adapters_changed(lora_model, before)


@by_id(CAUSAL_LMS)
def test_generate_decodes_through_the_adapters_as_the_merged_model(task):
    model = build(task)
    base_tokens = generate(model)
    lora_model = keras_lora.convert(model, targets=TARGETS, **VISIBLE_ADAPTER)
    lora_tokens = generate(lora_model)
    assert not np.array_equal(lora_tokens, base_tokens)
    # Greedy decoding of the prompt keeps the prompt.
    np.testing.assert_array_equal(
        lora_tokens[:, :PROMPT], prompt()["token_ids"][:, :PROMPT]
    )
    merged = keras_lora.merge_and_unload(lora_model)
    np.testing.assert_array_equal(generate(merged), lora_tokens)


@by_id(CAUSAL_LMS)
def test_loaded_adapter_reproduces_generate_and_logits(task, tmp_path):
    lora_model = keras_lora.convert(build(task), targets=TARGETS, **VISIBLE_ADAPTER)
    x, _ = task.batch()
    expected_logits, expected_tokens = logits(lora_model, x), generate(lora_model)
    keras_lora.save_adapter(lora_model, tmp_path / "adapter")

    loaded = keras_lora.load_adapter(build(task), tmp_path / "adapter")
    assert type(loaded) is type(lora_model)
    np.testing.assert_allclose(logits(loaded, x), expected_logits, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(generate(loaded), expected_tokens)


@by_id([CAUSAL_LMS[0], CAUSAL_LMS[1]])
def test_token_embedding_adapter_decodes_as_merged_and_reloaded(task, tmp_path):
    """GPT-2 ties its token embedding to the LM head, Llama does not: tied,
    the adapter changes the lookup and the logits; untied, the lookup only."""
    targets = [*TARGETS, "token_embedding"]
    lora_model = keras_lora.convert(build(task), targets=targets, **VISIBLE_ADAPTER)
    assert isinstance(
        lora_model.backbone.token_embedding, keras_lora.LoraReversibleEmbedding
    )
    x, _ = task.batch()
    expected_logits, expected_tokens = logits(lora_model, x), generate(lora_model)
    keras_lora.save_adapter(lora_model, tmp_path / "adapter")

    loaded = keras_lora.load_adapter(build(task), tmp_path / "adapter")
    np.testing.assert_allclose(logits(loaded, x), expected_logits, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(generate(loaded), expected_tokens)
    merged = keras_lora.merge_and_unload(lora_model)
    # Merged: the same sums in another order, so each logit may move by a few
    # float32 steps of the largest one (a few hundred), not of its own size.
    atol = 1e-6 * np.abs(expected_logits).max()
    np.testing.assert_allclose(logits(merged, x), expected_logits, rtol=0, atol=atol)
    np.testing.assert_array_equal(generate(merged), expected_tokens)


@by_id(TASKS)
def test_keras_file_keeps_class_outputs_and_trainable_variables(task, tmp_path):
    lora_model = keras_lora.convert(build(task), targets=TARGETS, **VISIBLE_ADAPTER)
    x, _ = task.batch()
    path = str(tmp_path / "model.keras")
    lora_model.save(path)

    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(lora_model)
    assert list(keras_lora.lora_layers(loaded)) == task.adapted_paths()
    assert trainable_by_layer(loaded) == trainable_by_layer(lora_model)
    assert {v.path for v in loaded.trainable_weights} == {
        v.path for v in lora_model.trainable_weights
    }
    np.testing.assert_allclose(
        logits(loaded, x), logits(lora_model, x), rtol=0, atol=1e-6
    )
