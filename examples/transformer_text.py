"""LoRA on the query and value projections of a small transformer.

A one-block transformer (token and position embeddings, a
`keras.layers.MultiHeadAttention`, a feed-forward layer, mean pooling, a Dense
head) is pre-trained on generated token sequences to answer "does token 1 come
before token 2?". `keras_lora.convert(..., targets=["query", "value"])` then
adds adapters to the attention's query and value projections only, as in the
LoRA paper, and the frozen model learns a new task with the same shape: "does
token 3 come before token 4?". The example prints the adapted layers' paths,
the trainable parameters per layer, and the accuracy on the new task before and
after fine-tuning.

Run: `python examples/transformer_text.py` (add `--smoke` for a few-second run:
shorter sequences and fewer examples, so that a few seconds of training show
the same effect).
"""

import argparse

import keras
import numpy as np
from keras import ops

import keras_lora

VOCAB_SIZE = 32


def make_task(rng, size: int, length: int, first: int, second: int):
    """Random sequences holding `first` and `second` once each, in random order.

    The label is 1 when `first` comes before `second`. Filler tokens are drawn
    from 5 and above, so the marker tokens 1-4 of both tasks stay distinct.
    """
    tokens = rng.integers(5, VOCAB_SIZE, size=(size, length))
    labels = rng.integers(0, 2, size=size)
    for row, label in zip(tokens, labels, strict=True):
        early, late = np.sort(rng.choice(length, size=2, replace=False))
        row[early], row[late] = (first, second) if label else (second, first)
    return tokens.astype("int32"), labels.astype("int32")


class TextClassifier(keras.Model):
    """Embeddings, one transformer block, mean pooling, a Dense head."""

    def __init__(self, length: int, dim: int = 32, heads: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.dim = dim
        self.heads = heads
        self.token_embedding = keras.layers.Embedding(VOCAB_SIZE, dim)
        self.position_embedding = keras.layers.Embedding(length, dim)
        self.attention = keras.layers.MultiHeadAttention(
            heads, dim // heads, name="attention"
        )
        self.attention_norm = keras.layers.LayerNormalization()
        self.feed_forward = keras.layers.Dense(dim, activation="relu")
        self.output_norm = keras.layers.LayerNormalization()
        self.pooling = keras.layers.GlobalAveragePooling1D()
        self.head = keras.layers.Dense(2)

    def call(self, tokens):
        positions = ops.arange(ops.shape(tokens)[1])
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        x = self.attention_norm(x + self.attention(x, x))
        x = self.output_norm(x + self.feed_forward(x))
        return self.head(self.pooling(x))


def main(smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    # Shorter sequences are an easier task, and smaller batches take more steps
    # on less data: enough for the smoke run to show the adapters learn.
    length, size, epochs, batch_size = (8, 768, 3, 16) if smoke else (16, 4096, 15, 64)
    pretrain_x, pretrain_y = make_task(rng, size, length, first=1, second=2)
    train_x, train_y = make_task(rng, size, length, first=3, second=4)
    test_x, test_y = make_task(rng, 1024, length, first=3, second=4)

    model = TextClassifier(length)
    model(train_x[:1])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"]
    )
    print(
        f"1. Pre-train on {size} sequences of {length} tokens, {epochs} epochs: "
        "does token 1 come before token 2?"
    )
    model.fit(pretrain_x, pretrain_y, epochs=epochs, batch_size=batch_size, verbose=0)
    accuracy = model.evaluate(pretrain_x, pretrain_y, verbose=0)[1]
    print(f"   accuracy on its training data: {accuracy:.3f}")

    lora_model = keras_lora.convert(model, rank=4, alpha=8, targets=["query", "value"])
    print("2. Convert with targets=['query', 'value']; adapted layers:")
    for path in keras_lora.lora_layers(lora_model):
        print(f"   {path}")
    keras_lora.print_trainable_parameters(lora_model, per_layer=True)

    lora_model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=["accuracy"]
    )
    before = lora_model.evaluate(test_x, test_y, verbose=0)[1]
    print("3. Fine-tune LoRA: does token 3 come before token 4?")
    lora_model.fit(train_x, train_y, epochs=epochs, batch_size=batch_size, verbose=2)
    after = lora_model.evaluate(test_x, test_y, verbose=0)[1]
    print(f"   accuracy on the new task: before {before:.3f}, after {after:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    main(parser.parse_args().smoke)
