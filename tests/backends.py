"""The tests that need a feature one Keras backend lacks, marked in one place.

The suite runs under `KERAS_BACKEND=tensorflow`, `jax` and `torch`
(`.ci/run` runs all three). keras_lora itself uses `keras.ops` only; these
markers skip the few tests of Keras features that are not on every backend,
and the distributed scenarios that run once, in one backend's pass; each
reason names the feature.
"""

import keras
import pytest

BACKEND = keras.backend.backend()

saved_model_export = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="SavedModel export (`model.export`, `keras.export.ExportArchive`) needs "
    "the TensorFlow or JAX backend: Keras' torch backend exports through "
    "torch_xla",
)

tfsm_layer = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="`keras.layers.TFSMLayer` (a SavedModel reloaded as a Keras layer) "
    "needs the TensorFlow backend",
)

tensorflow_benchmarks = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the benchmark suite measures the TensorFlow backend only "
    "(`python -m benchmarks` refuses the others); it runs in the TensorFlow pass",
)

xla_fit = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="`jit_compile=True` in `fit` is XLA on TensorFlow and JAX; Keras' torch "
    "backend runs torch.compile instead, which trains too but compiles for "
    "15-45 s per model on 2 CPU cores",
)

symbolic_tracing = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="traced with a symbolic tensor argument: `tf.function` on TensorFlow, "
    f"`jax.jit` on JAX; the {BACKEND} backend runs these tests eagerly",
)

tensorflow_distribute = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="runs once, in the TensorFlow-backend run (the scenario starts its own "
    "TensorFlow processes)",
)

# Where jax is installed: the outer Keras backend is JAX (Keras imports it).
jax_distribution = pytest.mark.skipif(
    BACKEND != "jax",
    reason="runs once, in the JAX-backend run (the scenario starts its own JAX "
    "process with two host devices)",
)

tensorflow_graph_optimizers = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="TensorFlow's graph optimisers (grappler) and their C++ log run on the "
    "TensorFlow backend only",
)

applications_zoo = pytest.mark.skipif(
    BACKEND == "jax",
    reason="the keras.applications CNNs of the model zoo run in the TensorFlow and "
    "torch passes: on JAX each eager op compiles anew for each model's shapes, "
    "about 7 minutes for the four on 2 cores; the keras-hub models run on JAX",
)
