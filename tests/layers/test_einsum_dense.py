"""LoraEinsumDense: the (contracted axes) x (output axes) low-rank update
against NumPy for several equations, and the equations it refuses."""

import keras
import numpy as np
import pytest
from testing import numpy_weights, randomize_adapter, run_layer_test

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


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def make_wrapper(name, **lora_kwargs):
    equation, output_shape, bias_axes, input_shape = EQUATIONS[name]
    base = keras.layers.EinsumDense(
        equation, output_shape=output_shape, bias_axes=bias_axes
    )
    x = np.random.default_rng(0).uniform(-1, 1, input_shape).astype("float32")
    return LoraEinsumDense(base, **lora_kwargs), x


def numpy_delta(equation, lora_a, lora_b):
    """`A @ B` over the (contracted) x (output) matrix, in the kernel's layout."""
    inputs, outputs = equation.split("->")
    x_spec, kernel_spec = inputs.split(",")
    contracted = [axis for axis in kernel_spec if axis in x_spec]
    kept = [axis for axis in kernel_spec if axis in outputs]
    rank = lora_a.shape[-1]
    matrix = lora_a.reshape(-1, rank) @ lora_b.reshape(rank, -1)
    delta = matrix.reshape(lora_a.shape[:-1] + lora_b.shape[1:])
    order = contracted + kept
    return delta.transpose([order.index(axis) for axis in kernel_spec])


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("name", list(EQUATIONS))
def test_output_matches_numpy_einsum_with_the_low_rank_update(name, use_rslora):
    wrapper, x = make_wrapper(name, rank=3, alpha=5.0, use_rslora=use_rslora)
    wrapper.build(x.shape)
    randomize_adapter(wrapper)
    outputs = run_layer_test(wrapper, x)

    equation = EQUATIONS[name][0]
    kernel, bias, lora_a, lora_b, scale = numpy_weights(wrapper)
    assert scale == (5.0 / np.sqrt(3) if use_rslora else 5.0 / 3)
    delta = numpy_delta(equation, lora_a, lora_b)
    expected = np.einsum(equation, x, kernel) + np.einsum(equation, x, scale * delta)
    if bias is not None:
        expected = expected + bias
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        numpy(wrapper.get_delta_weight()), scale * delta, rtol=0, atol=1e-6
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
