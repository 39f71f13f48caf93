"""PiSSA, OLoRA and orthogonal initialisation (`keras_lora.layers.initialization`):
NumPy references of peft's formulas on the Keras `(fan_in, fan_out)` matrix,
the output unchanged at init for every wrapper type that supports them, and
refusals that change nothing. The model-level life cycle (training, merging,
`.keras` files, adapters for the original base) is in
`tests/integration/test_pissa_olora.py`."""

import math

import keras
import numpy as np
import pytest
from testing.cases import CASES, RANK, TYPE_CASES, Case, case_id
from testing.layer_checks import (
    assert_unchanged,
    layer_state,
    randomize_adapter,
    run_layer_test,
)
from testing.references import float64

from keras_lora import LoraConfig, LoraConv2D, LoraDense, LoraEinsumDense

layers = keras.layers
COMPUTED_INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
MATRIX_CASES = [case for case in CASES if case.id != "conv2d_groups"]
GROUPED_CASE = next(case for case in CASES if case.id == "conv2d_groups")
ALPHA = 2.0 * RANK  # scale 2, so that the formulas' `/ scale` is tested

matrix_cases = pytest.mark.parametrize("case", MATRIX_CASES, ids=case_id)
computed_inits = pytest.mark.parametrize("init", COMPUTED_INITS)


def built_base(case):
    base = case.base()
    base.build(case.input_shape)
    return base


def kernel_of(base):
    return base.embeddings if isinstance(base, layers.Embedding) else base.kernel


def as_matrix(case, array):
    """The NumPy matrix view: CASES' EinsumDense kernels list their contracted
    axes first, so every case's matrix is its kernel as `(fan_in, -1)`."""
    return array.reshape(math.prod(case.a_shape[:-1]), -1)


def factor_matrices(wrapper, adapter_name="default"):
    adapter = wrapper.adapters[adapter_name]
    a, b = float64(adapter.lora_a), float64(adapter.lora_b)
    return a.reshape(-1, a.shape[-1]), b.reshape(a.shape[-1], -1)


def top_part(matrix, rank):
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# -- The hook every computed init relies on ---------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        *MATRIX_CASES,
        # Kernel axes (d, c, e): the contracted axis is not first.
        Case(
            "einsum_interleaved",
            LoraEinsumDense,
            lambda: layers.EinsumDense("abc,dce->abde", output_shape=(None, 2, 3)),
            (2, 3, 5),
            (5, RANK),
            (RANK, 2, 3),
        ),
    ],
    ids=case_id,
)
def test_kernel_matrix_is_the_matrix_on_which_the_update_is_a_product(case):
    wrapper = case.wrap(init=False)
    a, b = factor_matrices(wrapper)
    delta = wrapper.delta(wrapper.lora_a, wrapper.lora_b)
    np.testing.assert_allclose(float64(wrapper.kernel_matrix(delta)), a @ b, atol=1e-6)


# -- Output at init --------------------------------------------------------------


@matrix_cases
@computed_inits
def test_output_at_init_equals_the_base_output(case, init):
    base = built_base(case)
    x = case.inputs()
    expected = keras.ops.convert_to_numpy(base(x))
    wrapper = case.wrapper(base, rank=RANK, alpha=ALPHA, init=init)
    np.testing.assert_allclose(run_layer_test(wrapper, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", TYPE_CASES, ids=case_id)
@computed_inits
def test_dora_adapter_with_a_computed_init_starts_at_the_base_output(case, init):
    base = built_base(case)
    x = case.inputs()
    expected = keras.ops.convert_to_numpy(base(x))
    wrapper = case.wrapper(base, rank=RANK, alpha=ALPHA, init=init, use_dora=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(wrapper(x)), expected, rtol=0, atol=1e-5
    )


@matrix_cases
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kernel_becomes_the_residual_and_the_initial_factors_are_kept(case, init):
    base = built_base(case)
    kernel = float64(kernel_of(base))
    wrapper = case.wrapper(base, rank=RANK, alpha=ALPHA, init=init)
    adapter = wrapper.adapters["default"]
    residual = float64(wrapper.kernel_variable)
    update = float64(wrapper.get_delta_weight())
    np.testing.assert_allclose(residual + update, kernel, rtol=0, atol=1e-5)
    # The removed part (the top-r, or first-r QR, components) is large.
    assert np.linalg.norm(residual - kernel) > 0.3 * np.linalg.norm(kernel)
    np.testing.assert_array_equal(
        float64(adapter.initial_lora_a), float64(adapter.lora_a)
    )
    np.testing.assert_array_equal(
        float64(adapter.initial_lora_b), float64(adapter.lora_b)
    )
    assert not adapter.initial_lora_a.trainable
    assert not adapter.initial_lora_b.trainable


@matrix_cases
def test_pissa_update_is_the_top_singular_part_of_the_kernel(case):
    base = built_base(case)
    matrix = as_matrix(case, float64(kernel_of(base)))
    wrapper = case.wrapper(base, rank=RANK, alpha=ALPHA, init="pissa")
    a, b = factor_matrices(wrapper)
    scale = ALPHA / RANK
    np.testing.assert_allclose(scale * a @ b, top_part(matrix, RANK), atol=1e-5)
    # A = U_r sqrt(S_r / scale) and B = sqrt(S_r / scale) Vh_r, whatever the
    # signs the SVD picks: A.T A = B B.T = diag(S_r / scale).
    singular = np.linalg.svd(matrix, compute_uv=False)[:RANK]
    np.testing.assert_allclose(a.T @ a, np.diag(singular / scale), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(singular / scale), atol=1e-5)


@matrix_cases
def test_olora_factors_come_from_the_qr_of_peft_weight(case):
    base = built_base(case)
    matrix = as_matrix(case, float64(kernel_of(base)))
    wrapper = case.wrapper(base, rank=RANK, alpha=ALPHA, init="olora")
    a, b = factor_matrices(wrapper)
    # peft: weight (out, in) = Q R, lora_A = R_r, lora_B = Q_r; QR leaves one
    # sign per component free, which Q_r R_r and |R_r| do not see.
    q, r = np.linalg.qr(matrix.T)
    np.testing.assert_allclose((a @ b).T, q[:, :RANK] @ r[:RANK], atol=1e-5)
    np.testing.assert_allclose(np.abs(a), np.abs(r[:RANK].T), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.eye(RANK), atol=1e-5)


@matrix_cases
def test_orthogonal_factors_are_non_zero_with_a_zero_product(case):
    base = built_base(case)
    kernel = float64(kernel_of(base))
    wrapper = case.wrapper(base, rank=RANK, init="orthogonal")
    a, b = factor_matrices(wrapper)
    # peft draws standard normal matrices and divides by 10: entries of
    # order 0.1 (each factor's squared norm sums rank / 2 unit-norm rows).
    assert np.linalg.norm(a) > 0.01 and np.linalg.norm(b) > 0.01
    np.testing.assert_allclose(a @ b, 0.0, atol=1e-6)
    np.testing.assert_array_equal(float64(kernel_of(base)), kernel)
    assert wrapper.adapters["default"].initial_lora_a is None


def spectrum_dense():
    """A 20 -> 12 Dense whose kernel has the singular values 10, 8, 6, 4 and
    then 0.1 and below: a top-4 part well separated from the rest."""
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(20, 12)))
    v, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    singular = np.array([10, 8, 6, 4, *np.linspace(0.1, 0.01, 8)])
    kernel = (u * singular) @ v.T
    base = layers.Dense(12, kernel_initializer=keras.initializers.Constant(kernel))
    base.build((None, 20))
    return base, kernel


def test_pissa_niter_is_close_to_exact_pissa():
    exact_base, kernel = spectrum_dense()
    approximate_base, _ = spectrum_dense()
    exact = LoraDense(exact_base, rank=4, init="pissa")
    approximate = LoraDense(approximate_base, rank=4, init="pissa_niter_4")
    np.testing.assert_allclose(
        float64(approximate.get_delta_weight()), top_part(kernel, 4), atol=1e-4
    )
    np.testing.assert_allclose(
        float64(approximate_base.kernel), float64(exact_base.kernel), atol=1e-4
    )
    assert exact.adapters["default"].initial_lora_a is not None


@pytest.mark.parametrize("init", ["pissa_niter_1", "orthogonal"])
def test_random_inits_repeat_under_set_random_seed(init):
    def factors(seed):
        keras.utils.set_random_seed(seed)
        wrapper = LoraDense(spectrum_dense()[0], rank=4, init=init)
        return float64(wrapper.lora_a), float64(wrapper.lora_b)

    first, again, other = factors(1), factors(1), factors(2)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert np.abs(first[0] - other[0]).max() > 1e-3


# -- Refusals --------------------------------------------------------------------


@computed_inits
def test_grouped_convolution_is_refused_by_name(init):
    base = built_base(GROUPED_CASE)
    kernel = float64(base.kernel)
    match = f"'{base.name}' has groups=2.*init={init!r}"
    with pytest.raises(ValueError, match=match):
        LoraConv2D(base, rank=RANK, init=init)
    np.testing.assert_array_equal(float64(base.kernel), kernel)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_rank_beyond_the_kernel_matrix_is_refused(init):
    base = layers.Dense(3)
    base.build((None, 5))
    kernel = float64(base.kernel)
    match = "a 5 x 3 matrix, which has 3.*Received: rank=4"
    with pytest.raises(ValueError, match=match):
        LoraDense(base, rank=4, init=init)
    np.testing.assert_array_equal(float64(base.kernel), kernel)


def test_orthogonal_needs_an_even_rank():
    match = "init='orthogonal' needs an even `rank`.*Received: rank=3"
    with pytest.raises(ValueError, match=match):
        LoraDense(layers.Dense(4), rank=3, init="orthogonal")
    with pytest.raises(ValueError, match=match):
        LoraConfig(rank=3, init="orthogonal")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kernel_rewriting_init_is_refused_on_a_layer_with_adapters(init):
    wrapper = MATRIX_CASES[0].wrap()
    randomize_adapter(wrapper)
    state = layer_state(wrapper)
    with pytest.raises(ValueError, match=f"init={init!r} replaces the base kernel"):
        wrapper.add_adapter("second", rank=2, init=init)
    assert_unchanged(wrapper, state)


def test_kernel_rewriting_init_is_refused_on_a_quantized_base():
    base = layers.Dense(6)
    base.build((None, 5))
    base.quantize("int8")
    with pytest.raises(ValueError, match="int8-quantized base; init='pissa'"):
        LoraDense(base, rank=2, init="pissa")
