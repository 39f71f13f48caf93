"""JAX `keras.distribution.DataParallel` over two host devices: convert and
fit under the distribution, and compare with the same training on one device.

Run by tests/distributed/test_jax.py with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import keras
import scenario

import keras_lora


def main() -> None:
    expected = scenario.reference()
    devices = keras.distribution.list_devices()
    distribution = keras.distribution.DataParallel(devices=devices)
    with distribution.scope():
        lora_model = scenario.to_lora(scenario.build_base())
        lora_model.set_weights(expected["initial"])
        base_before = scenario.base_weights(lora_model)
        scenario.fit(lora_model)
        results = scenario.compare(lora_model, expected, base_before)
    factors = [
        variable
        for layer in keras_lora.lora_layers(lora_model).values()
        for variable in (layer.lora_a, layer.lora_b)
    ]
    scenario.report(
        devices=len(devices),
        factor_devices=sorted({len(f.value.sharding.device_set) for f in factors}),
        factors_replicated=all(f.value.sharding.is_fully_replicated for f in factors),
        **results,
    )


if __name__ == "__main__":
    main()
