"""TensorFlow MultiWorkerMirroredStrategy: this process is one of two local
workers (`TF_CONFIG` names the cluster and this worker's index). Both train;
the chief (worker 0) saves the adapter under the directory given as the only
argument, the other worker saves to a temporary directory and deletes it, as
TensorFlow's multi-worker Keras guide does (every worker takes part in the
save, only the chief's copy is kept).

Training is a custom loop (`strategy.run`), as in TensorFlow's multi-worker
custom-loop guide: with two workers on TensorFlow 2.21, Keras 3.15's `fit`
fails before the first step and `train_on_batch` after it, for plain Keras
models too (Keras reduces the input batch and the logs with `strategy.reduce`
calls that the collective strategy refuses).

Run by tests/distributed/test_tensorflow.py with KERAS_BACKEND=tensorflow.
"""

import json
import os
import shutil
import sys
import tempfile

import tensorflow as tf

# Before any other TensorFlow op, as the strategy requires.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import scenario  # noqa: E402

import keras_lora  # noqa: E402


def train(lora_model: keras.Model) -> None:
    """`scenario.STEPS` SGD steps on batches of `scenario.BATCH` samples split
    across the workers; each replica's loss is its share of the global-batch
    mean, so the all-reduced gradient is the one-device gradient."""
    loss_fn = keras.losses.MeanSquaredError(reduction="sum")
    variables = lora_model.trainable_variables
    lora_model.optimizer.build(variables)

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, lora_model(x, training=True)) / scenario.BATCH
            gradients = tape.gradient(loss, variables)
            lora_model.optimizer.apply(gradients, variables)

        strategy.run(replica_step, args=(x, y))

    dataset = tf.data.Dataset.from_tensor_slices(scenario.data()).batch(scenario.BATCH)
    for x, y in strategy.experimental_distribute_dataset(dataset):
        step(x, y)


def main(directory: str) -> None:
    expected = scenario.reference()
    with strategy.scope():
        lora_model = scenario.to_lora(scenario.build_base())
        lora_model.set_weights(expected["initial"])
    base_before = scenario.base_weights(lora_model)
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    train(lora_model)

    chief = worker == 0
    scratch = None if chief else tempfile.mkdtemp()
    keras_lora.save_adapter(
        lora_model, os.path.join(directory if chief else scratch, "adapter")
    )
    if scratch is not None:
        shutil.rmtree(scratch)
    scenario.report(
        worker=worker,
        chief=chief,
        replicas=strategy.num_replicas_in_sync,
        adapters={
            path: value.tolist()
            for path, value in scenario.adapter_weights(lora_model).items()
        },
        **scenario.compare(lora_model, expected, base_before),
    )


if __name__ == "__main__":
    main(sys.argv[1])
