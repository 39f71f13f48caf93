"""Quickstart: fine-tune a small Keras model with LoRA, then merge it.

A small network learns to tell digits 0-4 apart (scikit-learn's bundled
`load_digits`, no download). `keras_lora.convert` adds rank-4 adapters to its
Dense layers; a normal `fit` then teaches it digits 5-9 while the base weights
stay frozen. Finally the adapters are merged into a plain Keras model that
predicts exactly what the LoRA model predicts.

Run: `python examples/quickstart.py` (add `--smoke` for a few-second run).
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_lora


def split(images, labels, digits):
    keep = np.isin(labels, digits)
    return images[keep], labels[keep] - min(digits)


def main(smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    epochs = 2 if smoke else 30
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32")
    base_x, base_y = split(images, labels, [0, 1, 2, 3, 4])
    task_x, task_y = split(images, labels, [5, 6, 7, 8, 9])
    train_x, train_y, test_x, test_y = (
        task_x[::2],
        task_y[::2],
        task_x[1::2],
        task_y[1::2],
    )

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(5),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    print("1. Train the base model on digits 0-4")
    model.fit(base_x, base_y, epochs=epochs, batch_size=32, verbose=0)

    lora_model = keras_lora.convert(model, rank=4, alpha=8)
    print("2. Convert: only the adapters train")
    keras_lora.print_trainable_parameters(lora_model, per_layer=True)
    lora_model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=["accuracy"]
    )
    before = lora_model.evaluate(test_x, test_y, verbose=0)[1]
    print("3. Fine-tune LoRA on digits 5-9")
    lora_model.fit(train_x, train_y, epochs=epochs, batch_size=32, verbose=2)
    after = lora_model.evaluate(test_x, test_y, verbose=0)[1]
    print(f"   accuracy on held-out digits 5-9: before {before:.3f}, after {after:.3f}")

    lora_predictions = lora_model.predict(test_x, verbose=0)
    served = keras_lora.merge_and_unload(lora_model)
    gap = np.abs(served.predict(test_x, verbose=0) - lora_predictions).max()
    print(f"4. Merged into a plain Keras model; max output difference {gap:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    main(parser.parse_args().smoke)
