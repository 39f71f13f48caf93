"""One base model, two adapters: train, switch, save and load them separately.

A small network is pre-trained on scikit-learn's bundled digits (no download)
to answer "does the digit have a closed loop (0, 4, 6, 8, 9)?". Two adapters
then teach the same frozen base two other yes/no questions: "task_a" whether
the digit is odd, "task_b" whether it is 5 or more. `keras_lora.convert`
creates the first, `keras_lora.add_adapter` the second, and
`keras_lora.set_adapter` switches between them, for training and for
prediction. Each adapter is saved in its own directory with
`keras_lora.save_adapter`, then both are loaded with `keras_lora.load_adapter`
onto a fresh copy of the base, which predicts exactly what the original did.

Run: `python examples/multi_adapter.py` (add `--smoke` for a few-second run,
`--out DIR` to keep the adapter directories).
"""

import argparse
import os
import tempfile

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_lora

TASKS = {
    "task_a": ("is the digit odd?", lambda digits: digits % 2),
    "task_b": ("is the digit 5 or more?", lambda digits: digits >= 5),
}


def build_base() -> keras.Model:
    # Adapters are matched to layers by path, so the layers are named: a second
    # copy built in the same process would otherwise get new automatic names.
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden_1"),
            keras.layers.Dense(64, activation="relu", name="hidden_2"),
            keras.layers.Dense(2, name="head"),
        ]
    )


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def main(out: str, smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    epochs = 2 if smoke else 20
    images, digits = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32")
    train_x, test_x, train_digits, test_digits = train_test_split(
        images, digits, test_size=0.5, random_state=0
    )

    base = build_base()
    compile_model(base, 1e-3)
    print("1. Pre-train the base: does the digit have a closed loop?")
    has_loop = np.isin(train_digits, [0, 4, 6, 8, 9]).astype("int32")
    base.fit(train_x, has_loop, epochs=epochs, batch_size=32, verbose=0)
    base_weights = base.get_weights()

    model = keras_lora.convert(base, rank=4, alpha=8, adapter_name="task_a")
    keras_lora.add_adapter(model, "task_b", keras_lora.LoraConfig(rank=4, alpha=8))
    print("2. Train each adapter on its own task; the base stays frozen")
    predictions = {}
    for name, (question, label) in TASKS.items():
        keras_lora.set_adapter(model, name)
        compile_model(model, 1e-2)
        test_y = label(test_digits).astype("int32")
        before = model.evaluate(test_x, test_y, verbose=0)[1]
        model.fit(
            train_x,
            label(train_digits).astype("int32"),
            epochs=epochs,
            batch_size=32,
            verbose=0,
        )
        after = model.evaluate(test_x, test_y, verbose=0)[1]
        trainable, total = keras_lora.trainable_parameters(model)
        print(
            f"   {name} ({question}): {trainable:,d} of {total:,d} parameters "
            f"trained; accuracy before {before:.3f}, after {after:.3f}"
        )
        predictions[name] = model.predict(test_x, verbose=0)

    print("3. Switch with set_adapter: the two adapters answer differently")
    for name in TASKS:
        keras_lora.set_adapter(model, name)
        answers = model.predict(test_x[:10], verbose=0).argmax(axis=1)
        print(f"   {name} on digits {test_digits[:10]}: {answers}")

    print("4. Save each adapter in its own directory")
    for name in TASKS:
        directory = os.path.join(out, name)
        keras_lora.save_adapter(model, directory, adapter=name)
        print(f"   {directory}: {sorted(os.listdir(directory))}")

    fresh = build_base()
    fresh.set_weights(base_weights)
    reloaded = keras_lora.load_adapter(fresh, os.path.join(out, "task_a"))
    reloaded = keras_lora.load_adapter(reloaded, os.path.join(out, "task_b"))
    print("5. Load both onto a fresh copy of the base")
    for name in TASKS:
        keras_lora.set_adapter(reloaded, name)
        gap = np.abs(reloaded.predict(test_x, verbose=0) - predictions[name]).max()
        print(f"   {name}: max output difference {gap:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    parser.add_argument(
        "--out", help="where to write the adapter directories (default: temp)"
    )
    args = parser.parse_args()
    if args.out:
        main(args.out, args.smoke)
    else:
        with tempfile.TemporaryDirectory() as out:
            main(out, args.smoke)
