import os

# Before TensorFlow is first imported: keep its C++ start-up chatter out of
# test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def dtype_policy():
    """Sets Keras' global dtype policy for one test, then restores float32."""
    try:
        yield keras.mixed_precision.set_dtype_policy
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
