"""Shared test helpers, one module per topic.

- `cases`: the table of wrapper cases every generic layer test runs over.
- `layer_checks`: `run_layer_test`-style checks of one wrapper, its state
  before and after a failed call, and random adapter values.
- `model_checks`: models around a wrapper: fitting, saving, tracing.
- `references`: NumPy conversions and references for DESIGN.md's formulas.
- `peft_fixtures`: peft's own numbers (tests/fixtures/peft/) in Keras layouts.

Tolerances are stated where they are used.
"""
