"""Quickstart: fine-tune a small CNN with LoRA, save the adapter, merge, serve.

A small convolutional network learns to tell digits 0-4 apart (scikit-learn's
bundled 8x8 `load_digits`, no download). `keras_lora.convert` adds rank-4
adapters to its Conv2D and Dense layers; a normal `fit` then teaches it digits
5-9 while the base weights stay frozen. The adapter is saved on its own (a few
kilobytes), the adapters are merged into a plain Keras model, and that model is
exported as a TensorFlow SavedModel, reloaded, and checked to predict what the
LoRA model predicts.

Run: `python examples/quickstart.py` (add `--smoke` for a few-second run,
`--out DIR` to keep the adapter and the SavedModel; by default they go to a
temporary folder deleted when the example ends).
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_lora


def split(images, labels, digits):
    keep = np.isin(labels, digits)
    return images[keep], labels[keep] - min(digits)


def build_cnn(num_classes: int) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def main(out: str, smoke: bool = False, temporary: bool = False) -> None:
    keras.utils.set_random_seed(0)
    epochs = 2 if smoke else 20
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    base_x, base_y = split(images, labels, [0, 1, 2, 3, 4])
    task_x, task_y = split(images, labels, [5, 6, 7, 8, 9])
    train_x, train_y = task_x[::2], task_y[::2]
    test_x, test_y = task_x[1::2], task_y[1::2]

    model = build_cnn(num_classes=5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    print("1. Train the base CNN on digits 0-4")
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

    adapter_dir = os.path.join(out, "adapter")
    keras_lora.save_adapter(lora_model, adapter_dir)
    size = sum(
        os.path.getsize(os.path.join(adapter_dir, name))
        for name in os.listdir(adapter_dir)
    )
    print(f"4. Saved the adapter to {adapter_dir} ({size:,d} bytes)")

    lora_predictions = lora_model.predict(test_x, verbose=0)
    served = keras_lora.merge_and_unload(lora_model)
    gap = np.abs(served.predict(test_x, verbose=0) - lora_predictions).max()
    print(f"5. Merged into a plain Keras model; max output difference {gap:.2e}")

    serving_dir = os.path.join(out, "serving")
    served.export(serving_dir, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(serving_dir)
    gap = np.abs(reloaded.serve(test_x).numpy() - lora_predictions).max()
    print(
        f"6. Exported and reloaded a SavedModel ({serving_dir}); "
        f"max output difference {gap:.2e}"
    )
    if temporary:
        print(
            f"   {out} is a temporary folder, deleted as this example ends; "
            "run it with --out DIR to keep the adapter and the SavedModel"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    parser.add_argument(
        "--out",
        help="where to write the adapter and the SavedModel "
        "(default: a temporary folder, deleted when the example ends)",
    )
    args = parser.parse_args()
    if args.out:
        main(args.out, args.smoke)
    else:
        with tempfile.TemporaryDirectory() as out:
            main(out, args.smoke, temporary=True)
