"""LoRA against full fine-tuning of the same pre-trained CNN on the same task.

A small CNN is pre-trained on digits 0-4 (scikit-learn's bundled 8x8
`load_digits`, no download), then fine-tuned on digits 5-9 from the same
weights, with `keras_lora.convert` (only the adapters train) and fully (every
weight trains). The two may want different learning rates (LoRA's is often
larger), so each method is fine-tuned at each of `LEARNING_RATES` and keeps
the rate with the best accuracy on a validation split; the test split picks
nothing. For each method, at its rate, the example prints test accuracy,
trainable parameters, the median time of a training step (`train_on_batch`,
after a few warm-up steps) and the peak memory of the process during the
fine-tuning, and it writes the learning curves (from epoch 0, before any
training) to `lora_vs_full.png` and `lora_vs_full.csv` under `--out`.

About the memory column: it is the process' peak resident set size (Linux
`VmHWM`, reset before each fine-tuning through `/proc/self/clear_refs`;
elsewhere `resource.getrusage`, which never resets, so a later fine-tuning
reports at least the peak of those before it). It counts the whole process
(Python, TensorFlow's runtime and allocator caches, the data), so for a model
this small the optimizer state LoRA saves is a few hundred kilobytes lost in
that total; the column shows the measurement, not a LoRA memory saving at this
scale. Step times are similar for the same reason: the frozen base still runs
forward and backward, and LoRA's small extra products can cost more than the
updates it saves. Both savings grow with the model (docs/performance.md).

Run: `python examples/lora_vs_full.py` (add `--smoke` for a few-second run,
`--out DIR` for where the PNG and CSV go; default `runs/lora_vs_full`).
"""

import argparse
import csv
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
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Both methods' best rates fall inside this grid (full fine-tuning diverges at
# the largest); a best rate on an edge would call for a wider grid.
LEARNING_RATES = (3e-3, 1e-2, 3e-2)
WARMUP_STEPS = 3


def split(images, labels, digits):
    keep = np.isin(labels, digits)
    return images[keep], labels[keep] - min(digits)


def train_validation_test(images, labels) -> dict:
    """Half the examples for the test, the rest split 2:1 into train and validation."""
    rest_x, rest_y = images[::2], labels[::2]
    validation = np.arange(len(rest_x)) % 3 == 0
    return {
        "train": (rest_x[~validation], rest_y[~validation]),
        "validation": (rest_x[validation], rest_y[validation]),
        "test": (images[1::2], labels[1::2]),
    }


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


def fine_tune(model, data: dict, epochs: int, batch_size: int = 32) -> dict:
    """Trains with `train_on_batch`, timing each step; returns the numbers.

    The curves have a point per epoch and one for epoch 0, before any
    training: the loss on the training split, the accuracy on the test split.
    """
    train_x, train_y = data["train"]
    rng = np.random.default_rng(0)
    step_times = []
    losses = [model.evaluate(*data["train"], verbose=0)[0]]
    accuracies = [model.evaluate(*data["test"], verbose=0)[1]]
    reset_peak_memory()
    for _ in range(epochs):
        order = rng.permutation(len(train_x))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            began = time.perf_counter()
            model.train_on_batch(train_x[batch], train_y[batch])
            step_times.append(time.perf_counter() - began)
        losses.append(model.evaluate(*data["train"], verbose=0)[0])
        accuracies.append(model.evaluate(*data["test"], verbose=0)[1])
    return {
        "trainable": keras_lora.trainable_parameters(model)[0],
        "validation": model.evaluate(*data["validation"], verbose=0)[1],
        "accuracy": accuracies[-1],
        "step_ms": 1000 * float(np.median(step_times[WARMUP_STEPS:])),
        "peak_mb": peak_memory_mb(),
        "losses": losses,
        "accuracies": accuracies,
    }


def sweep(make_model, data: dict, rates, epochs: int) -> dict:
    """Fine-tunes a fresh `make_model()` at each rate; returns {rate: numbers}."""
    runs = {}
    for rate in rates:
        keras.utils.set_random_seed(0)  # the same initial adapters at every rate
        model = make_model()
        compile_model(model, rate)
        runs[rate] = fine_tune(model, data, epochs)
    return runs


def plot(results: dict, path: str) -> None:
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, (rate, result) in results.items():
        label = f"{method}, learning rate {rate:g}"
        epochs = range(len(result["losses"]))
        loss_axis.plot(epochs, result["losses"], marker="o", label=label)
        accuracy_axis.plot(epochs, result["accuracies"], marker="o", label=label)
    loss_axis.set(ylabel="training loss", yscale="log")
    accuracy_axis.set(ylabel="test accuracy", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.set(xlabel="epoch (0: before fine-tuning)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(
        "Fine-tuning a CNN pre-trained on digits 0-4 on digits 5-9,\n"
        "each method at its best learning rate on a validation split"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_curves(results: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "learning_rate", "epoch", "loss", "accuracy"])
        for method, (rate, result) in results.items():
            curves = zip(result["losses"], result["accuracies"], strict=True)
            for epoch, (loss, accuracy) in enumerate(curves):
                writer.writerow([method, rate, epoch, f"{loss:.5f}", f"{accuracy:.4f}"])


def pick_rates(runs: dict) -> dict:
    """Prints validation accuracy by rate; returns {method: (best rate, numbers)}.

    Ties go to the smaller rate.
    """
    rates = list(next(iter(runs.values())))
    print("   {:<8}".format("method"), end="")
    print("".join(f"{rate:>8g}" for rate in rates), "   best")
    best = {}
    for method, by_rate in runs.items():
        rate = max(rates, key=lambda rate: by_rate[rate]["validation"])
        best[method] = rate, by_rate[rate]
        print(f"   {method:<8}", end="")
        print("".join(f"{by_rate[r]['validation']:>8.3f}" for r in rates), end="")
        print(f"{rate:>8g}")
    return best


def main(out: str = "runs/lora_vs_full", smoke: bool = False) -> None:
    keras.utils.set_random_seed(0)
    # The smoke run tries the two ends of the grid: each run pays for tracing.
    epochs, rates = (2, LEARNING_RATES[::2]) if smoke else (15, LEARNING_RATES)
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    base_x, base_y = split(images, labels, [0, 1, 2, 3, 4])
    data = train_validation_test(*split(images, labels, [5, 6, 7, 8, 9]))
    sizes = {name: len(y) for name, (_, y) in data.items()}

    base = build_cnn()
    compile_model(base, 1e-3)
    print("1. Pre-train the CNN on digits 0-4")
    base.fit(base_x, base_y, epochs=epochs, batch_size=32, verbose=0)

    def copy_of_base() -> keras.Model:
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        return model

    def lora() -> keras.Model:
        return keras_lora.convert(copy_of_base(), rank=4, alpha=8)

    print(
        f"2. Fine-tune on digits 5-9 ({sizes['train']} examples, {epochs} epochs): "
        "LoRA (rank 4) and every weight, each at learning rates "
        + ", ".join(f"{rate:g}" for rate in rates)
    )
    runs = {
        "LoRA": sweep(lora, data, rates, epochs),
        "full": sweep(copy_of_base, data, rates, epochs),
    }
    print(f"3. Validation accuracy ({sizes['validation']} examples) by learning rate")
    results = pick_rates(runs)

    total = keras_lora.trainable_parameters(base)[1]
    print(
        f"4. At each method's best rate: test accuracy ({sizes['test']} examples), "
        f"parameters ({total:,d} in the base), speed, memory"
    )
    header = ("method", "rate", "trainable", "accuracy", "step ms", "peak RSS MB")
    print("   {:<8}{:>7}{:>11}{:>10}{:>9}{:>13}".format(*header))
    for method, (rate, r) in results.items():
        print(
            f"   {method:<8}{rate:>7g}{r['trainable']:>11,d}{r['accuracy']:>10.3f}"
            f"{r['step_ms']:>9.2f}{r['peak_mb']:>13.0f}"
        )

    os.makedirs(out, exist_ok=True)
    png, table = (os.path.join(out, f"lora_vs_full.{ext}") for ext in ("png", "csv"))
    plot(results, png)
    write_curves(results, table)
    print("5. Learning curves from epoch 0 (before fine-tuning):")
    print(f"   {png}\n   {table}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few-second run")
    parser.add_argument(
        "--out",
        default="runs/lora_vs_full",
        help="where to write the PNG and CSV (default: runs/lora_vs_full)",
    )
    args = parser.parse_args()
    main(args.out, args.smoke)
