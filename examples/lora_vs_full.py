"""LoRA against full fine-tuning of the same pre-trained CNN on the same task.

A small CNN is pre-trained on digits 0-4 (scikit-learn's bundled 8x8
`load_digits`, no download), then fine-tuned on digits 5-9 twice from the same
weights: once with `keras_lora.convert` (only the adapters train), once fully
(every weight trains). For each the example prints held-out accuracy,
trainable parameters, the median time of a training step (`train_on_batch`,
after a few warm-up steps) and the peak memory of the process during the
fine-tuning, and it writes the learning curves to `lora_vs_full.png`.

About the memory column: it is the process' peak resident set size (Linux
`VmHWM`, reset before each phase through `/proc/self/clear_refs`; elsewhere
`resource.getrusage`, which never resets, so the later phase reports at least
the earlier one's peak). It counts the whole process (Python, TensorFlow's
runtime and allocator caches, the data), so for a model this small the
optimizer state LoRA saves is a few hundred kilobytes lost in that total; the
column shows the measurement, not a LoRA memory saving at this scale. Step
times are similar for the same reason: the frozen base still runs forward and
backward, and LoRA's small extra products can cost more than the updates it
saves. Both savings grow with the model (docs/performance.md).

Run: `python examples/lora_vs_full.py` (add `--smoke` for a few-second run,
`--out DIR` for where the PNG goes; default: the current directory).
"""

import argparse
import os
import resource
import sys
import time

import keras
import matplotlib
import numpy as np
from sklearn.datasets import load_digits

import keras_lora

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

WARMUP_STEPS = 3


def split(images, labels, digits):
    keep = np.isin(labels, digits)
    return images[keep], labels[keep] - min(digits)


def build_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(5),
        ]
    )


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def reset_peak_memory() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def fine_tune(model, train, test, epochs: int, batch_size: int = 32) -> dict:
    """Trains with `train_on_batch`, timing each step; returns the numbers."""
    train_x, train_y = train
    rng = np.random.default_rng(0)
    step_times, losses, accuracies = [], [], []
    reset_peak_memory()
    for _ in range(epochs):
        order = rng.permutation(len(train_x))
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            began = time.perf_counter()
            loss, _ = model.train_on_batch(train_x[batch], train_y[batch])
            step_times.append(time.perf_counter() - began)
            epoch_losses.append(loss)
        losses.append(float(np.mean(epoch_losses)))
        accuracies.append(model.evaluate(*test, verbose=0)[1])
    return {
        "trainable": keras_lora.trainable_parameters(model)[0],
        "accuracy": accuracies[-1],
        "step_ms": 1000 * float(np.median(step_times[WARMUP_STEPS:])),
        "peak_mb": peak_memory_mb(),
        "losses": losses,
        "accuracies": accuracies,
    }


def plot(results: dict, path: str) -> None:
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, result in results.items():
        epochs = range(1, len(result["losses"]) + 1)
        loss_axis.plot(epochs, result["losses"], marker="o", label=method)
        accuracy_axis.plot(epochs, result["accuracies"], marker="o", label=method)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log")
    accuracy_axis.set(xlabel="epoch", ylabel="held-out accuracy", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("Fine-tuning a CNN pre-trained on digits 0-4 on digits 5-9")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(out: str = ".", smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    epochs = 2 if smoke else 15
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    base_x, base_y = split(images, labels, [0, 1, 2, 3, 4])
    task_x, task_y = split(images, labels, [5, 6, 7, 8, 9])
    train = task_x[::2], task_y[::2]
    test = task_x[1::2], task_y[1::2]

    base = build_cnn()
    compile_model(base, 1e-3)
    print("1. Pre-train the CNN on digits 0-4")
    base.fit(base_x, base_y, epochs=epochs, batch_size=32, verbose=0)
    full = keras.models.clone_model(base)
    full.set_weights(base.get_weights())

    print("2. Fine-tune on digits 5-9: LoRA (rank 4), then every weight")
    lora = keras_lora.convert(base, rank=4, alpha=8)
    compile_model(lora, 1e-2)
    compile_model(full, 1e-3)
    results = {
        "LoRA": fine_tune(lora, train, test, epochs),
        "full": fine_tune(full, train, test, epochs),
    }

    total = keras_lora.trainable_parameters(full)[1]
    print(f"3. Results ({epochs} epochs, {total:,d} parameters in the base)")
    header = ("method", "trainable", "accuracy", "step ms", "peak RSS MB")
    print("   {:<8}{:>11}{:>10}{:>9}{:>13}".format(*header))
    for method, r in results.items():
        print(
            f"   {method:<8}{r['trainable']:>11,d}{r['accuracy']:>10.3f}"
            f"{r['step_ms']:>9.2f}{r['peak_mb']:>13.0f}"
        )

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "lora_vs_full.png")
    plot(results, path)
    print(f"4. Learning curves written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    parser.add_argument("--out", default=".", help="where to write the PNG")
    args = parser.parse_args()
    main(args.out, args.smoke)
