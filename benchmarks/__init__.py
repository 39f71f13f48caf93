"""The keras_lora performance suite (issue #5); run it with `python -m benchmarks`.

Not part of the test command. See docs/performance.md for the method and the
results.
"""
