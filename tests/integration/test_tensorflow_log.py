"""TensorFlow's graph optimisers succeed on adapted layers: a LoRA model's
`fit` and `predict` print no TensorFlow error or warning that the same plain
Keras model does not print."""

import os
import re
import subprocess
import sys

from backends import tensorflow_graph_optimizers

# For relu, gelu and linear: builds a stack of Conv2D and Dense layers,
# converts it or not, and runs `fit` and `predict` (a large and a small batch:
# folded and factorised inference).
SCRIPT = """
import sys
import keras
import numpy as np
import keras_lora

keras.utils.set_random_seed(0)
x = np.random.rand(64, 8, 8, 3).astype("float32")
for activation in ("relu", "gelu", "linear"):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, activation=activation),
        keras.layers.Conv2D(8, 3, activation=activation),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation=activation),
        keras.layers.Dense(16, activation=activation),
        keras.layers.Dense(4),
    ])
    if sys.argv[1] == "lora":
        model = keras_lora.convert(model, rank=4)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.random.rand(64, 4).astype("float32"), epochs=2, verbose=0)
    model.predict(x, verbose=0)
    model.predict(x[:3], verbose=0)
"""

# "E0000 00:00:1796093782.64 27041 file.cc:135] message": the level, then
# the message without the time stamp and thread id.
LOG_LINE = re.compile(r"^([EW])\d{4} [\d:.]+\s+\d+ (.*)$")


def tensorflow_problems(kind: str) -> set[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "empty op name" not in result.stderr
    return {
        f"{match[1]} {match[2]}"
        for match in map(LOG_LINE.match, result.stderr.splitlines())
        if match
    }


@tensorflow_graph_optimizers
def test_lora_layers_add_no_tensorflow_error_or_warning():
    # The plain models' lines (e.g. "failed call to cuInit" on a machine
    # without a GPU) are TensorFlow's own, whatever the model.
    assert tensorflow_problems("lora") <= tensorflow_problems("plain")
