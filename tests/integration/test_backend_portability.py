"""A fine-tune on the current Keras backend carries over to TensorFlow: its
saved adapter, loaded onto the base model, and its merged `.keras` file give
the same outputs in a fresh TensorFlow process, which exports the SavedModel.
This is the documented route to a SavedModel from a torch fine-tune (Keras'
torch backend cannot export one)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

import keras_lora

# Runs in a fresh interpreter on the TensorFlow backend.
RELOAD = textwrap.dedent(
    """
    import json, pathlib, sys
    import keras
    import numpy as np
    import tensorflow as tf
    import keras_lora

    directory = pathlib.Path(sys.argv[1])
    x = np.load(directory / "x.npy")
    base = keras.saving.load_model(directory / "base.keras")
    lora_model = keras_lora.load_adapter(base, directory / "adapter")
    merged = keras.saving.load_model(directory / "merged.keras")
    keras_lora.export(lora_model, directory / "serving", verbose=False)
    loaded = tf.saved_model.load(str(directory / "serving"))
    served = loaded.serve(x)
    outputs = {
        "backend": keras.backend.backend(),
        "adapter": keras.ops.convert_to_numpy(lora_model(x)).tolist(),
        "merged": keras.ops.convert_to_numpy(merged(x)).tolist(),
        "served": served.numpy().tolist(),
    }
    print(json.dumps(outputs))
    """
)


def test_adapter_and_merged_model_reload_and_export_on_tensorflow(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 6)).astype("float32")
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    base.save(tmp_path / "base.keras")
    base_outputs = keras.ops.convert_to_numpy(base(x))
    lora_model = keras_lora.convert(base, rank=2)
    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    lora_model.fit(x, rng.normal(size=(16, 3)), epochs=3, verbose=0)
    expected = keras.ops.convert_to_numpy(lora_model(x))
    keras_lora.save_adapter(lora_model, tmp_path / "adapter")
    keras_lora.merge_and_unload(lora_model).save(tmp_path / "merged.keras")
    np.save(tmp_path / "x.npy", x)

    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded.pop("backend") == "tensorflow"
    # The fit moved the outputs away from the base model's.
    assert not np.allclose(reloaded["adapter"], base_outputs, atol=1e-3)
    for name, outputs in reloaded.items():
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5, err_msg=name)
