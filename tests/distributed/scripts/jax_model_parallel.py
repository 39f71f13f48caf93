"""JAX `keras.distribution.ModelParallel` on a 2-device mesh: a `LayoutMap`
shards both base kernels (`up` on its outputs, `down` on its inputs),
`keras_lora.add_adapter_layouts` adds the matching adapter rules, and the
sharded LoRA model trains to the one-device result.

Run by tests/distributed/test_jax.py with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import keras
import scenario

import keras_lora

KERNEL_RULES = {"up/kernel": (None, "model"), "down/kernel": ("model", None)}


def axes(variable) -> list:
    """The mesh axis of each dimension of `variable` as it lies on devices."""
    spec = tuple(variable.value.sharding.spec)
    return list(spec) + [None] * (len(variable.shape) - len(spec))


def main() -> None:
    expected = scenario.reference()
    mesh = keras.distribution.DeviceMesh(
        (1, 2), ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, rule in KERNEL_RULES.items():
        layout_map[pattern] = rule
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model = scenario.build_base()
        added = keras_lora.add_adapter_layouts(model, layout_map)
        lora_model = scenario.to_lora(model)
        lora_model.set_weights(expected["initial"])
        base_before = scenario.base_weights(lora_model)
        scenario.fit(lora_model)
        results = scenario.compare(lora_model, expected, base_before)
        layouts = {
            variable.path: axes(variable)
            for variable in lora_model.weights
            if variable.path.endswith(("kernel", "lora_a", "lora_b"))
        }
        # Merging writes the sharded kernels in place.
        x = scenario.data()[0]
        unmerged = lora_model.predict(x, verbose=0)
        keras_lora.merge(lora_model)
        merge_difference = float(abs(lora_model.predict(x, verbose=0) - unmerged).max())
        merged = [layer.merged for layer in keras_lora.lora_layers(lora_model).values()]
        merged_layouts = {
            variable.path: axes(variable)
            for variable in lora_model.weights
            if variable.path.endswith("kernel")
        }
    scenario.report(
        rules=sorted(added),
        layouts=layouts,
        merged_layouts=merged_layouts,
        merged=merged,
        merge_difference=merge_difference,
        **results,
    )


if __name__ == "__main__":
    main()
