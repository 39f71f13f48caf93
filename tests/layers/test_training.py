"""Every wrapper type trained by a real `fit` on the current Keras backend:
under mixed precision (float16 with loss scaling, bfloat16, a bfloat16 base)
and compiled with XLA (`jit_compile=True`)."""

import keras
import numpy as np
import pytest
from backends import xla_fit
from testing.cases import RANK, TYPE_CASES, case_id
from testing.model_checks import fit_briefly, model_around
from testing.references import numpy

type_cases = pytest.mark.parametrize("case", TYPE_CASES, ids=case_id)

# Under mixed_float16 the first steps may be skipped while the dynamic loss
# scale comes down from 2**15; four steps leave room for both factors to move
# (B moves on the first applied step, A on the next one).
STEPS = 4


def factors(wrapper):
    adapter = wrapper.adapters[wrapper.active_adapter]
    return [adapter.lora_a, adapter.lora_b]


# -- Mixed precision -----------------------------------------------------------


@type_cases
@pytest.mark.parametrize(
    "policy", ["mixed_float16", "mixed_bfloat16", "bfloat16_base_layer"]
)
def test_mixed_precision_keeps_float32_factors_and_trains(case, policy, dtype_policy):
    if policy == "bfloat16_base_layer":
        base = case.base(dtype="bfloat16")
        compute_dtype = "bfloat16"
    else:
        dtype_policy(policy)
        base = case.base()
        compute_dtype = policy.removeprefix("mixed_")
    x = case.inputs()
    expected = base(x)
    dropout = 0.1 if case.supports_dropout else 0.0
    wrapper = case.wrapper(base, rank=RANK, dropout=dropout)

    outputs = wrapper(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
    assert wrapper.compute_dtype == compute_dtype
    for variable in factors(wrapper):
        assert variable.dtype == "float32"
    np.testing.assert_allclose(
        numpy(keras.ops.cast(outputs, "float32")),
        numpy(keras.ops.cast(expected, "float32")),
        rtol=0,
        atol=1e-6,
    )

    model = model_around(wrapper, case)
    base_before = [numpy(variable) for variable in wrapper.layer.weights]
    factors_before = [numpy(variable) for variable in factors(wrapper)]
    losses = fit_briefly(model, x, steps=STEPS)
    # `compile` adds loss scaling for a mixed_float16 model, and only then.
    loss_scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert loss_scaled is (policy == "mixed_float16")
    assert np.all(np.isfinite(losses))
    for variable, before in zip(wrapper.layer.weights, base_before, strict=True):
        assert np.array_equal(numpy(variable), before), variable.path
    for variable, before in zip(factors(wrapper), factors_before, strict=True):
        assert variable.dtype == "float32"
        assert not np.array_equal(numpy(variable), before), variable.path


# -- XLA -----------------------------------------------------------------------


def fit_once(case, jit_compile):
    """A fresh wrapper in a model, fitted for three steps; the same weights and
    targets on every call."""
    keras.utils.set_random_seed(0)
    wrapper = case.wrap()
    model = model_around(wrapper, case)
    initial = [numpy(variable) for variable in factors(wrapper)]
    losses = fit_briefly(model, case.inputs(), jit_compile=jit_compile)
    return model, wrapper, initial, losses


@xla_fit
@type_cases
def test_xla_fit_trains_as_the_uncompiled_fit(case):
    model, wrapper, initial, losses = fit_once(case, jit_compile=True)
    # Keras turns XLA off at compile when it cannot use it; it must stay on.
    assert model.jit_compile is True
    plain_model, plain_wrapper, _, plain_losses = fit_once(case, jit_compile=False)
    assert plain_model.jit_compile is False

    assert losses[-1] < losses[0]
    # Float32 with XLA's fused kernels: the same numbers up to rounding.
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    trained = zip(factors(wrapper), factors(plain_wrapper), initial, strict=True)
    for variable, plain_variable, before in trained:
        assert not np.array_equal(numpy(variable), before), variable.path
        np.testing.assert_allclose(
            numpy(variable), numpy(plain_variable), rtol=0, atol=1e-5
        )
    x = case.inputs(seed=1)
    np.testing.assert_allclose(
        numpy(model(x)), numpy(plain_model(x)), rtol=0, atol=1e-5
    )
