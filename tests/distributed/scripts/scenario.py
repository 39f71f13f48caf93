"""What every distributed scenario script shares: a tiny model, its data, the
single-device reference training, and the JSON line the test reads.

Imported by the scripts after they have set up devices, so importing Keras
here is safe; nothing here chooses a backend or a device.
"""

import json

import keras
import numpy as np

import keras_lora

FEATURES = 8
HIDDEN = 16
OUTPUTS = 4
BATCH = 8
STEPS = 3
RANK = 2


def data() -> tuple[np.ndarray, np.ndarray]:
    """`STEPS` batches of `BATCH` samples (inputs, regression targets)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, FEATURES)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, OUTPUTS)).astype("float32")
    return x, y


def build_base() -> keras.Model:
    """Two Dense layers, `up` (its kernel shardable on outputs) and `down`
    (on inputs), with fixed names so that layout rules and adapter paths are
    known in advance."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu", name="up")(inputs)
    outputs = keras.layers.Dense(OUTPUTS, name="down")(hidden)
    return keras.Model(inputs, outputs)


def to_lora(model: keras.Model) -> keras.Model:
    """The LoRA model, both factors random (`init=False`, so that both train
    from the first step), compiled for plain SGD (no optimizer state)."""
    lora_model = keras_lora.convert(model, rank=RANK, init=False)
    lora_model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return lora_model


def fit(lora_model: keras.Model) -> list[float]:
    """`STEPS` steps of `fit`, in order, one batch each; the epoch's loss."""
    x, y = data()
    history = lora_model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return history.history["loss"]


def adapter_weights(lora_model: keras.Model) -> dict[str, np.ndarray]:
    """`{variable path: value}` of every adapter factor."""
    return {
        variable.path: keras.ops.convert_to_numpy(variable)
        for layer in keras_lora.lora_layers(lora_model).values()
        for variable in (layer.lora_a, layer.lora_b)
    }


def base_weights(lora_model: keras.Model) -> list[np.ndarray]:
    """The value of every adapted layer's (frozen) base kernel."""
    return [
        keras.ops.convert_to_numpy(layer.layer.kernel)
        for layer in keras_lora.lora_layers(lora_model).values()
    ]


def reference() -> dict:
    """The single-device run every distributed run must match: initial
    weights, trained adapters and the trained model's predictions."""
    lora_model = to_lora(build_base())
    initial = lora_model.get_weights()
    initial_adapters = adapter_weights(lora_model)
    fit(lora_model)
    return {
        "initial": initial,
        "initial_adapters": initial_adapters,
        "adapters": adapter_weights(lora_model),
        "predictions": lora_model.predict(data()[0], verbose=0),
    }


def largest_difference(left: dict, right: dict) -> float:
    assert left.keys() == right.keys(), (sorted(left), sorted(right))
    return max(float(np.max(np.abs(left[key] - right[key]))) for key in left)


def compare(lora_model: keras.Model, expected: dict, base_before: list) -> dict:
    """The numbers every scenario reports about a trained distributed model."""
    adapters = adapter_weights(lora_model)
    predictions = keras.ops.convert_to_numpy(lora_model.predict(data()[0], verbose=0))
    return {
        "adapter_difference": largest_difference(adapters, expected["adapters"]),
        "prediction_difference": float(
            np.max(np.abs(predictions - expected["predictions"]))
        ),
        "adapter_change": largest_difference(adapters, expected["initial_adapters"]),
        "base_change": max(
            float(np.max(np.abs(after - before)))
            for after, before in zip(base_weights(lora_model), base_before, strict=True)
        ),
    }


def report(**results) -> None:
    """Prints the one JSON line the test parses."""
    print("RESULT " + json.dumps(results), flush=True)
