"""LoraEinsumDense: each equation against the matrix product it is, written
out by hand, with peft's Linear update on that matrix (which
tests/layers/test_peft_fixtures.py pins for LoraDense); and the equations it
refuses."""

import keras
import numpy as np
import pytest
from testing.layer_checks import randomize_adapter, run_layer_test
from testing.references import numpy, numpy_weights

from keras_lora import LoraEinsumDense

EQUATIONS = {
    # Attention's query/key/value projection.
    "attention": ("abc,cde->abde", (None, 2, 3), "de", (2, 3, 5)),
    # Attention's output projection: two contracted axes.
    "output_projection": ("abcd,cde->abe", (None, 6), "e", (2, 3, 2, 3)),
    "matmul": ("ab,bc->ac", 6, "c", (2, 5)),
    # Output axis before the contracted one in the kernel.
    "transposed_kernel": ("ab,cb->ac", 6, None, (2, 5)),
    "ellipsis": ("...b,bc->...c", 6, "c", (2, 3, 5)),
}


def make_wrapper(name, **lora_kwargs):
    equation, output_shape, bias_axes, input_shape = EQUATIONS[name]
    base = keras.layers.EinsumDense(
        equation, output_shape=output_shape, bias_axes=bias_axes
    )
    x = np.random.default_rng(0).uniform(-1, 1, input_shape).astype("float32")
    return LoraEinsumDense(base, **lora_kwargs), x


# Each equation as a matrix product, by hand: `rows(x)` is the input as
# (rows, fan_in), `matrix(kernel)` the kernel as (fan_in, fan_out). The
# outputs are `rows(x) @ matrix(kernel)` reshaped, and LoRA on the layer is
# peft's Linear on that product: lora_a is (contracted axes..., rank) and
# lora_b (rank, output axes...), each flattened to a matrix.
MATRIX_VIEWS = {
    "attention": (lambda x: x.reshape(6, 5), lambda kernel: kernel.reshape(5, 6)),
    "output_projection": (
        lambda x: x.reshape(6, 6),
        lambda kernel: kernel.reshape(6, 6),
    ),
    "matmul": (lambda x: x, lambda kernel: kernel),
    "transposed_kernel": (lambda x: x, lambda kernel: kernel.T),
    "ellipsis": (lambda x: x.reshape(6, 5), lambda kernel: kernel),
}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("name", list(EQUATIONS))
def test_output_is_the_low_rank_update_of_the_equivalent_matrix_product(
    name, use_rslora
):
    wrapper, x = make_wrapper(name, rank=3, alpha=5.0, use_rslora=use_rslora)
    wrapper.build(x.shape)
    randomize_adapter(wrapper)
    outputs = run_layer_test(wrapper, x)

    rows, matrix = MATRIX_VIEWS[name]
    kernel, bias, lora_a, lora_b, scale = numpy_weights(wrapper)
    assert scale == (5.0 / np.sqrt(3) if use_rslora else 5.0 / 3)
    update = scale * lora_a.reshape(-1, 3) @ lora_b.reshape(3, -1)
    expected = rows(x) @ (matrix(kernel) + update)
    if bias is not None:
        expected = expected + bias.reshape(-1)
    np.testing.assert_allclose(
        outputs.reshape(expected.shape), expected, rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        matrix(numpy(wrapper.get_delta_weight())), update, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "name, a_shape, b_shape",
    [
        ("attention", (5, 3), (3, 2, 3)),
        ("output_projection", (2, 3, 3), (3, 6)),
        ("matmul", (5, 3), (3, 6)),
        ("transposed_kernel", (5, 3), (3, 6)),
        ("ellipsis", (5, 3), (3, 6)),
    ],
)
def test_factors_split_the_kernel_into_contracted_and_output_axes(
    name, a_shape, b_shape
):
    wrapper, x = make_wrapper(name, rank=3)
    wrapper(x)
    assert tuple(wrapper.lora_a.shape) == a_shape
    assert tuple(wrapper.lora_b.shape) == b_shape


@pytest.mark.parametrize(
    "equation, output_shape",
    [
        ("abc,bcd->abd", (3, 4)),  # b is in the input, the kernel and the output
        ("ab,b->a", ()),  # nothing kept from the kernel
        ("abc,cde->abd", (3, 4)),  # e is summed over inside the kernel
        ("ab,abc->ac", (4,)),  # a batch-like kernel axis
    ],
)
def test_equations_that_are_not_a_matrix_are_refused(equation, output_shape):
    base = keras.layers.EinsumDense(equation, output_shape=output_shape)
    with pytest.raises(
        ValueError,
        match="every kernel axis must be either contracted with the input or kept "
        "in the output",
    ):
        LoraEinsumDense(base, rank=2)
