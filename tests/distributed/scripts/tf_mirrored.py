"""TensorFlow MirroredStrategy over two logical CPU devices: convert inside
`strategy.scope()`, fit, and compare with the same training on one device.

Run by tests/distributed/test_tensorflow.py with KERAS_BACKEND=tensorflow.
"""

import scenario
import tensorflow as tf

import keras_lora


def main() -> None:
    # Before TensorFlow initialises its devices (importing Keras does not).
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    expected = scenario.reference()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        lora_model = scenario.to_lora(scenario.build_base())
        lora_model.set_weights(expected["initial"])
    base_before = scenario.base_weights(lora_model)
    scenario.fit(lora_model)
    factors = [
        variable
        for layer in keras_lora.lora_layers(lora_model).values()
        for variable in (layer.lora_a, layer.lora_b)
    ]
    scenario.report(
        replicas=strategy.num_replicas_in_sync,
        factor_types=sorted({type(variable.value).__name__ for variable in factors}),
        factor_copies=sorted({len(variable.value.values) for variable in factors}),
        **scenario.compare(lora_model, expected, base_before),
    )


if __name__ == "__main__":
    main()
