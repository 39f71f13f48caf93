"""`run_layer_test`-style checks of one wrapper, the state a failed call must
leave as it was, and random adapter values."""

from __future__ import annotations

import keras
import numpy as np

from keras_lora.layers import LoraLayer


def run_layer_test(layer: LoraLayer, inputs, training=False) -> np.ndarray:
    """Calls `layer` eagerly and symbolically and checks the wrapper contract.

    Checks: the output shape is `compute_output_shape`'s, a symbolic call gives
    the same shape, every variable is listed once, the trainable variables are
    exactly the active adapters' parameters (factors, DoRA magnitude), and the
    base variables are frozen.

    Returns:
        The eager output as a NumPy array.
    """
    outputs = layer(inputs, training=training)
    # EinsumDense reports the `None` of its `output_shape` argument, not the
    # actual size, so `None` matches any size.
    assert_shape_matches(outputs.shape, layer.compute_output_shape(inputs.shape))
    symbolic = layer(keras.Input(batch_shape=inputs.shape, dtype=inputs.dtype))
    assert_shape_matches(outputs.shape, symbolic.shape)
    assert_listed_once(layer.weights)
    active = [
        variable
        for name in layer.active_adapters
        for variable in layer.adapters[name].parameters.values()
    ]
    assert same_variables(layer.trainable_weights, active)
    assert not layer.layer.trainable
    assert all(
        any(variable is frozen for frozen in layer.non_trainable_weights)
        for variable in layer.layer.weights
    )
    return keras.ops.convert_to_numpy(outputs)


def assert_shape_matches(shape, expected) -> None:
    assert len(shape) == len(expected), (shape, expected)
    assert all(e is None or e == s for s, e in zip(shape, expected, strict=True))


def assert_listed_once(variables) -> None:
    ids = [id(variable) for variable in variables]
    assert len(ids) == len(set(ids)), [variable.path for variable in variables]


def same_variables(left, right) -> bool:
    """Whether two lists hold the same variables (by identity), in any order."""
    return sorted(map(id, left)) == sorted(map(id, right))


def layer_state(layer: LoraLayer) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "adapter_names": layer.adapter_names,
        "active_adapters": layer.active_adapters,
        "merged_adapters": layer.merged_adapters,
        "adapters_enabled": layer.adapters_enabled,
        "settings": {name: a.settings() for name, a in layer.adapters.items()},
        "trainable": [variable.path for variable in layer.trainable_weights],
        "weights": [(v.path, keras.ops.convert_to_numpy(v)) for v in layer.weights],
    }


def assert_unchanged(layer: LoraLayer, state: dict) -> None:
    now, expected = layer_state(layer), dict(state)
    weights, expected_weights = now.pop("weights"), expected.pop("weights")
    assert now == expected
    assert [path for path, _ in weights] == [path for path, _ in expected_weights]
    for (_, value), (_, expected_value) in zip(weights, expected_weights, strict=True):
        np.testing.assert_array_equal(value, expected_value)


def randomize_adapter(layer: LoraLayer, adapter_name=None, seed=0) -> None:
    """Gives an adapter's factors random non-zero values (std 0.5)."""
    adapter = layer.adapters[adapter_name or layer.active_adapter]
    rng = np.random.default_rng(seed)
    for variable in (adapter.lora_a, adapter.lora_b):
        variable.assign(rng.normal(0.0, 0.5, size=variable.shape).astype("float32"))
