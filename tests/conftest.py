import os

# Before TensorFlow is first imported: keep its C++ start-up chatter out of
# test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's own CPU Conv2D kernel takes only NHWC; its oneDNN kernels also
# take NCHW (`data_format="channels_first"`). TensorFlow turns oneDNN on by
# itself only on CPUs with AVX-512, so the suite asks for it on every machine.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def dtype_policy():
    """Sets Keras' global dtype policy for one test, then restores float32."""
    try:
        yield keras.mixed_precision.set_dtype_policy
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
