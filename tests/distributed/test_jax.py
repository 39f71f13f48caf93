"""JAX's keras.distribution with keras_lora, each scenario in a fresh process
with two host devices (see `runner.py`): DataParallel, and ModelParallel with
a LayoutMap that shards the base kernels and, through
`keras_lora.add_adapter_layouts`, the matching adapter factors."""

from backends import jax_distribution

from distributed import runner

pytestmark = jax_distribution

# Two devices add partial products in another order than one: after three SGD
# steps the adapters agree to a few float32 ulps.
ADAPTER_TOLERANCE = 1e-6
PREDICTION_TOLERANCE = 1e-5


def run_on_two_host_devices(tmp_path, script, record_property) -> dict:
    env = runner.environment(
        "jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    [result], wall = runner.run(tmp_path, script, [env], timeout=180)
    record_property("wall_s", round(wall, 1))
    assert result["adapter_change"] > 1e-2  # the adapters did train
    assert result["adapter_difference"] < ADAPTER_TOLERANCE
    assert result["prediction_difference"] < PREDICTION_TOLERANCE
    assert result["base_change"] == 0.0
    return result


def test_data_parallel_trains_replicated_adapters_as_one_device(
    tmp_path, record_property
):
    result = run_on_two_host_devices(tmp_path, "jax_data_parallel.py", record_property)
    assert result["devices"] == 2
    assert result["factor_devices"] == [2]
    assert result["factors_replicated"]


def test_model_parallel_shards_each_adapter_like_its_kernel(tmp_path, record_property):
    result = run_on_two_host_devices(tmp_path, "jax_model_parallel.py", record_property)
    assert result["rules"] == ["^down/[^/]+/lora_a$", "^up/[^/]+/lora_b$"]
    # `up` is sharded on its outputs: so is lora_b (rank, out), lora_a is
    # replicated. `down` is sharded on its inputs: so is lora_a (in, rank).
    assert result["layouts"] == {
        "up/kernel": [None, "model"],
        "up/default/lora_a": [None, None],
        "up/default/lora_b": [None, "model"],
        "down/kernel": ["model", None],
        "down/default/lora_a": ["model", None],
        "down/default/lora_b": [None, None],
    }
    # Merging writes the sharded kernels in place, keeping their layout.
    assert result["merged"] == [True, True]
    assert result["merged_layouts"] == {
        "up/kernel": [None, "model"],
        "down/kernel": ["model", None],
    }
    assert result["merge_difference"] < PREDICTION_TOLERANCE
