"""The table of model kinds that every generic check runs over.

Each factory builds a small, built Keras model and returns `(model, inputs)`;
the kinds are the shapes of model `keras_lora.convert` must handle: a
Sequential, a Functional model with several inputs and outputs, models nested
in a model, a layer called at two places, a subclassed model whose subclassed
blocks own layers (`MultiHeadAttention`, whose projections are `EinsumDense`),
and a Functional subclass that builds its graph in `__init__`, as keras-hub
backbones do.

This module imports Keras only, never keras_lora, so that a process that never
imports keras_lora can load the plain models `merge_and_unload` returns.
"""

import keras
import numpy as np

PACKAGE = "keras_lora_tests"
WIDTH = 8
SEQUENCE = 3
SAMPLES = 8
BATCH = 4
VOCABULARY = 16


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeedForward(keras.layers.Layer):
    """Two Dense layers with a residual connection."""

    def __init__(self, width=WIDTH, hidden=2 * WIDTH, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.hidden = hidden
        self.dense_1 = keras.layers.Dense(hidden, activation="relu", name="dense_1")
        self.dense_2 = keras.layers.Dense(width, name="dense_2")

    def call(self, inputs):
        return inputs + self.dense_2(self.dense_1(inputs))

    def get_config(self):
        config = {"width": self.width, "hidden": self.hidden}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Self-attention and a feed-forward block, each followed by a norm."""

    def __init__(self, width=WIDTH, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.heads = heads
        self.self_attention = keras.layers.MultiHeadAttention(
            heads, width // heads, name="self_attention"
        )
        self.attention_norm = keras.layers.LayerNormalization(name="attention_norm")
        self.ffn = FeedForward(width, name="ffn")
        self.ffn_norm = keras.layers.LayerNormalization(name="ffn_norm")

    def call(self, inputs):
        x = self.attention_norm(inputs + self.self_attention(inputs, inputs))
        return self.ffn_norm(self.ffn(x))

    def get_config(self):
        config = {"width": self.width, "heads": self.heads}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TinyTransformer(keras.Model):
    """A subclassed model: transformer blocks, pooling and a head."""

    def __init__(self, width=WIDTH, blocks=1, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.num_blocks = blocks
        self.classes = classes
        self.blocks = [
            TransformerBlock(width, name=f"block_{i}") for i in range(blocks)
        ]
        self.pool = keras.layers.GlobalAveragePooling1D(name="pool")
        self.head = keras.layers.Dense(classes, name="head")

    def call(self, inputs):
        x = inputs
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))

    def features(self, inputs):
        """A method the class adds; the converted model must keep it."""
        x = inputs
        for block in self.blocks:
            x = block(x)
        return x

    def get_config(self):
        config = {"width": self.width, "blocks": self.num_blocks}
        return {**super().get_config(), **config, "classes": self.classes}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TinyBackbone(keras.Model):
    """A Functional subclass in the keras-hub style: layers are attributes
    created first, the graph is built in `__init__`, and `get_config` returns
    the constructor arguments only."""

    def __init__(self, vocabulary_size=VOCABULARY, width=WIDTH, blocks=1, **kwargs):
        # === Layers ===
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, width, name="token_embedding"
        )
        self.transformer_layers = [
            TransformerBlock(width, name=f"transformer_layer_{i}")
            for i in range(blocks)
        ]
        self.output_dense = keras.layers.Dense(width, name="output_dense")

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        x = self.token_embedding(token_ids)
        for layer in self.transformer_layers:
            x = layer(x)
        outputs = self.output_dense(x)
        super().__init__(inputs=token_ids, outputs=outputs, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.width = width
        self.blocks = blocks

    def __setattr__(self, name, value):
        # As keras-hub's Backbone: under the torch backend a Keras layer is a
        # torch.nn.Module, which refuses a sub-layer attribute before
        # `super().__init__()` runs; the graph tracks every layer anyway.
        if keras.backend.backend() == "torch":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def embed(self, token_ids):
        """A method the class adds; the converted model must keep it."""
        return self.token_embedding(token_ids)

    def get_config(self):
        return {
            "vocabulary_size": self.vocabulary_size,
            "width": self.width,
            "blocks": self.blocks,
            "name": self.name,
            "trainable": self.trainable,
        }


def _floats(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def sequential():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((WIDTH,)),
            keras.layers.Dense(WIDTH, activation="relu", name="dense"),
            keras.layers.BatchNormalization(name="batch_norm"),
            keras.layers.Dense(4, name="head"),
        ],
        name="sequential",
    )
    return model, _floats(SAMPLES, WIDTH)


def functional_multi_io():
    keras.utils.set_random_seed(2)
    image = keras.Input((4, 4, 2), name="image")
    features = keras.Input((WIDTH,), name="features")
    sequence = keras.Input((5, 2), name="sequence")
    conv = keras.layers.Conv2D(WIDTH, 3, padding="same", name="conv")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(conv)
    conv_1d = keras.layers.Conv1D(WIDTH, 3, padding="causal", name="conv_1d")(sequence)
    pooled_1d = keras.layers.GlobalAveragePooling1D(name="pool_1d")(conv_1d)
    dense = keras.layers.Dense(WIDTH, activation="relu", name="features_dense")(
        features
    )
    x = keras.layers.Concatenate(name="concat")([pooled, pooled_1d, dense])
    x = keras.layers.Dense(WIDTH, activation="relu", name="trunk")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    score = keras.layers.Dense(1, name="score")(x)
    label = keras.layers.Dense(3, name="label")(x)
    model = keras.Model(
        {"image": image, "features": features, "sequence": sequence},
        [score, label],
        name="multi_io",
    )
    inputs = {
        "image": _floats(SAMPLES, 4, 4, 2, seed=1),
        "features": _floats(SAMPLES, WIDTH, seed=2),
        "sequence": _floats(SAMPLES, 5, 2, seed=3),
    }
    return model, inputs


def nested():
    keras.utils.set_random_seed(3)
    encoder = keras.Sequential(
        [
            keras.Input((WIDTH,)),
            keras.layers.Dense(WIDTH, activation="relu", name="dense"),
            keras.layers.Dense(WIDTH, name="dense_1"),
        ],
        name="encoder",
    )
    tower_input = keras.Input((WIDTH,))
    tower = keras.Model(
        tower_input,
        keras.layers.Dense(WIDTH, activation="tanh", name="proj")(tower_input),
        name="tower",
    )
    inputs = keras.Input((WIDTH,), name="x")
    x = tower(encoder(inputs))
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name="nested")
    return model, _floats(SAMPLES, WIDTH)


def shared_layer():
    keras.utils.set_random_seed(4)
    left = keras.Input((WIDTH,), name="left")
    right = keras.Input((WIDTH,), name="right")
    shared = keras.layers.Dense(WIDTH, activation="relu", name="shared")
    left_head = keras.layers.Dense(2, name="left_head")(shared(left))
    right_head = keras.layers.Dense(2, name="right_head")(shared(right))
    model = keras.Model([left, right], [left_head, right_head], name="shared")
    inputs = [_floats(SAMPLES, WIDTH, seed=1), _floats(SAMPLES, WIDTH, seed=2)]
    return model, inputs


def subclassed():
    keras.utils.set_random_seed(5)
    model = TinyTransformer(name="tiny_transformer")
    inputs = _floats(SAMPLES, SEQUENCE, WIDTH)
    model(inputs[:1])
    return model, inputs


def functional_subclass():
    keras.utils.set_random_seed(6)
    model = TinyBackbone(name="tiny_backbone")
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, VOCABULARY, size=(SAMPLES, SEQUENCE)).astype("int32")
    return model, inputs


MODEL_KINDS = {
    "sequential": sequential,
    "functional_multi_io": functional_multi_io,
    "nested": nested,
    "shared_layer": shared_layer,
    "subclassed": subclassed,
    "functional_subclass": functional_subclass,
}
"""Model kind name -> factory returning `(model, inputs)`."""


def outputs(model, inputs) -> list[np.ndarray]:
    """The model's outputs on `inputs` (inference mode), as NumPy arrays."""
    return [
        np.asarray(keras.ops.convert_to_numpy(output))
        for output in keras.tree.flatten(model(inputs))
    ]


def fit_targets(model, inputs, seed=7):
    """Random regression targets shaped like the model's outputs."""
    rng = np.random.default_rng(seed)
    targets = [
        rng.normal(size=output.shape).astype("float32")
        for output in outputs(model, inputs)
    ]
    return targets[0] if len(targets) == 1 else targets


def train(model, inputs, targets, graph=False):
    """A real `fit`: `SAMPLES / BATCH` Adam steps on an MSE loss.

    Eager by default, which is several times faster than tracing for models
    this small; `graph=True` traces the train step as `fit` does by default.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), loss="mse", run_eagerly=not graph
    )
    return model.fit(inputs, targets, batch_size=BATCH, verbose=0)


def every_layer(root) -> list:
    """Every layer reachable from `root` through its attributes (public or
    private, plain, list, tuple or dict), `root` included, once each."""
    found, seen, stack = [], set(), [root]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        for value in vars(layer).values():
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, keras.layers.Layer):
                items = [value]
            elif not isinstance(value, (list, tuple, dict)):
                continue
            stack.extend(item for item in items if isinstance(item, keras.layers.Layer))
    return found


def assert_outputs_close(actual, expected, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def assert_outputs_differ(actual, expected, minimum=1e-4):
    difference = max(
        float(np.max(np.abs(a - e))) for a, e in zip(actual, expected, strict=True)
    )
    assert difference > minimum, difference
