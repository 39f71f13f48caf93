"""TensorFlow's tf.distribute strategies with keras_lora, each scenario in
fresh processes (see `runner.py`): MirroredStrategy over two logical CPU
devices, and MultiWorkerMirroredStrategy across two local worker processes."""

import json

import keras
import numpy as np
from backends import tensorflow_distribute

import keras_lora
from distributed import runner
from distributed.scripts import scenario

pytestmark = tensorflow_distribute

# Replicas sum the same float32 gradients in another order: the adapters after
# three SGD steps agree with one device to a few float32 ulps.
ADAPTER_TOLERANCE = 1e-6
PREDICTION_TOLERANCE = 1e-5


def assert_trained_like_one_device(result):
    assert result["replicas"] == 2
    assert result["adapter_change"] > 1e-2  # the adapters did train
    assert result["adapter_difference"] < ADAPTER_TOLERANCE
    assert result["prediction_difference"] < PREDICTION_TOLERANCE
    assert result["base_change"] == 0.0


def test_mirrored_strategy_trains_mirrored_adapters_as_one_device(
    tmp_path, record_property
):
    [result], wall = runner.run(
        tmp_path, "tf_mirrored.py", [runner.environment("tensorflow")], timeout=180
    )
    record_property("wall_s", round(wall, 1))
    assert result["factor_types"] == ["MirroredVariable"]
    assert result["factor_copies"] == [2]
    assert_trained_like_one_device(result)


def test_two_workers_train_and_the_chief_saves_one_adapter(tmp_path, record_property):
    ports = runner.free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    envs = [
        runner.environment(
            "tensorflow",
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        )
        for index in range(2)
    ]
    out = tmp_path / "out"
    out.mkdir()
    results, wall = runner.run(
        tmp_path, "tf_multi_worker.py", envs, str(out), timeout=240
    )
    record_property("wall_s", round(wall, 1))

    assert [(r["worker"], r["chief"]) for r in results] == [(0, True), (1, False)]
    for result in results:
        assert_trained_like_one_device(result)
    chief, other = (result["adapters"] for result in results)
    assert chief == other  # the replicas stayed in sync
    # One adapter was kept: the chief's, which loads with the chief's weights.
    assert [path.name for path in out.iterdir()] == ["adapter"]
    loaded = keras_lora.load_adapter(scenario.build_base(), out / "adapter")
    layers = keras_lora.lora_layers(loaded)
    assert sorted(layers) == ["down", "up"]
    for layer in layers.values():
        for variable in (layer.lora_a, layer.lora_b):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), np.array(chief[variable.path])
            )
