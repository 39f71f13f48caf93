"""Factors computed from the layer: PiSSA, OLoRA and orthogonal initialisation.

These are peft's `init_lora_weights="pissa" | "pissa_niter_K" | "olora" |
"orthogonal"` (`pissa_init`, `olora_init`, `orthogonal_init` in
`src/peft/tuners/lora/layer.py`). Each works on the layer's kernel as the
`(fan_in, fan_out)` matrix `W` of `LoraLayer.kernel_matrix`, on which the update
is `scale * A @ B`. peft's weight is the transpose, `(out, in)`: its `lora_A`
`(r, in)` is our `A.T` and its `lora_B` `(out, r)` our `B.T`.

- `"pissa"`: `W = U S Vh`; `A = U_r sqrt(S_r / scale)`, `B = sqrt(S_r / scale)
  Vh_r`, so `scale * A @ B` is the top-r part of `W`; the kernel becomes the
  residual `W - scale * A @ B` (Meng et al. 2024, arXiv 2404.02948).
- `"pissa_niter_K"`: the same from a randomized SVD with K subspace iterations
  (Halko et al. 2009, algorithms 4.4 and 5.1, as `torch.svd_lowrank`).
- `"olora"`: `W.T = Q R` (peft's weight); `A = R_r.T`, `B = Q_r.T`; the kernel
  becomes `W - scale * A @ B` (Büyükakyüz 2024, arXiv 2406.01775).
- `"orthogonal"`: from an orthogonal `r x r` matrix, `A` takes the even rows
  and `B` the odd ones, each times a Gaussian matrix and divided by 10, so
  both are non-zero and `A @ B = 0`; the kernel is untouched.

PiSSA and OLoRA keep the factors they start from (`initial_lora_a`,
`initial_lora_b`): the adapter's update over the original kernel is
`scale * (A @ B - A_0 @ B_0)`, which `original_base_state` writes as a plain
adapter of rank `2r`, as peft's `path_initial_model_for_weight_conversion`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import keras
from keras import ops

from keras_lora.layers.settings import (
    computes_factors,
    pissa_iterations,
    rewrites_kernel,
)

_DEFERRED = contextvars.ContextVar("deferred_initialization", default=False)


@contextlib.contextmanager
def deferred_initialization() -> Iterator[None]:
    """Adapters created inside get placeholder factors, and their base
    kernel is left alone, whatever their init.

    For a computed init the values then come from elsewhere: from a saved
    model (`LoraLayer.restore`, whose kernel is already the residual), from an
    adapter file, or from `initialize` called later (`keras_lora.convert` runs
    it once every layer is wrapped, so that a refused layer leaves the others
    untouched). The check that a kernel-rewriting adapter comes first on its
    layer is skipped too; the other checks of `check_init` still run.

    Yields:
        Nothing.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def check_init(layer, adapter) -> None:
    """Refuses an adapter whose init cannot apply to `layer`, before anything
    is created.

    Args:
        layer: the `LoraLayer` the adapter is added to.
        adapter: the new `LoraAdapter`, not yet added.

    Raises:
        ValueError: if the init needs a matrix view the layer lacks (grouped
            convolution), rewrites the kernel of a quantized base or of a
            layer that already has adapters (their updates were made for the
            kernel as it is), or (PiSSA, OLoRA) the rank exceeds the kernel
            matrix's smaller side.
    """
    init = adapter.init
    if not computes_factors(init):
        return
    layer.check_matrix_view(f"init={init!r}")
    if not rewrites_kernel(init):
        return
    mode = getattr(layer.layer, "quantization_mode", None)
    if mode:
        raise ValueError(
            f"Layer '{layer.name}' wraps an {mode}-quantized base; init={init!r} "
            "rewrites the base kernel, which would need re-quantizing. Initialise "
            f"the float model, then quantize it. Received: init={init!r}"
        )
    if layer.adapter_names and not _DEFERRED.get():
        raise ValueError(
            f"init={init!r} replaces the base kernel of layer '{layer.name}' by a "
            f"residual, which would change what its adapters "
            f"{list(layer.adapter_names)} compute. Use it on a model without "
            "adapters (`keras_lora.convert`), or load a converted adapter (see "
            "`keras_lora.save_adapter(..., for_original_base=True)`). "
            f"Received: init={init!r}"
        )
    if layer.built:
        _check_rank_fits(layer, adapter)


def initialize(layer, adapter) -> None:
    """Computes the factors of an adapter with a computed init and, for PiSSA
    and OLoRA, replaces the base kernel by the residual and keeps the initial
    factors. Other inits are left as created, and so is every init inside
    `deferred_initialization` (which still checks that the init applies).

    Args:
        layer: a built `LoraLayer`.
        adapter: its `LoraAdapter`, with factors created.

    Raises:
        ValueError: as `check_init`, before anything is assigned.
    """
    init, rank = adapter.init, adapter.rank
    if not computes_factors(init):
        return
    layer.check_matrix_view(f"init={init!r}")
    if rewrites_kernel(init):
        _check_rank_fits(layer, adapter)
    if _DEFERRED.get():
        return
    if init == "orthogonal":
        a, b = orthogonal_factors(*_matrix_shape(layer, rank), rank)
        adapter.set_factors(*factors_from_matrices(layer, a, b))
        return
    kernel = ops.cast(layer.kernel_variable, "float32")
    matrix = layer.kernel_matrix(kernel)
    if init == "olora":
        a, b = olora_factors(matrix, rank)
    else:
        a, b = pissa_factors(matrix, rank, adapter.scale, pissa_iterations(init))
    lora_a, lora_b = factors_from_matrices(layer, a, b)
    adapter.set_factors(lora_a, lora_b)
    # Copies: JAX variables would otherwise share one buffer, which a jitted
    # train step refuses to donate twice.
    adapter.initial_lora_a.assign(ops.copy(lora_a))
    adapter.initial_lora_b.assign(ops.copy(lora_b))
    residual = kernel - layer.delta(lora_a, lora_b) * adapter.scale
    layer.kernel_variable.assign(ops.cast(residual, layer.kernel_variable.dtype))


def original_base_state(layer, adapter) -> tuple[dict, dict]:
    """The settings and parameters of an adapter that applies `adapter`'s
    update to the original kernel, the one its init rewrote.

    `W_res + scale * A @ B = W + scale * (A @ B - A_0 @ B_0)`, and the
    difference is one adapter of rank `2r`: `[A, A_0]` and `[B, -B_0]`, with
    `alpha` doubled (times `sqrt(2)` with rsLoRA) so that the scale is
    unchanged, as peft's `subtract_mutated_init`. Its init is `"default"`,
    so loading it leaves the base kernel as it is.

    Args:
        layer: a `LoraLayer`.
        adapter: one of its adapters, with a kernel-rewriting init.

    Returns:
        `(settings, parameters)`: keyword arguments of `add_adapter`, and the
        arrays by `LoraAdapter.parameters` name (a DoRA magnitude unchanged).

    Raises:
        ValueError: if the adapter's init did not rewrite the kernel.
    """
    if not rewrites_kernel(adapter.init):
        raise ValueError(
            f"Adapter '{adapter.name}' of layer '{layer.name}' has "
            f"init={adapter.init!r}, which leaves the base kernel as it is: it "
            "is valid on the original kernel already; save it without "
            "`for_original_base`."
        )
    a, b = factor_matrices(adapter.lora_a, adapter.lora_b)
    a_0, b_0 = factor_matrices(adapter.initial_lora_a, adapter.initial_lora_b)
    lora_a, lora_b = factors_from_matrices(
        layer, ops.concatenate([a, a_0], axis=1), ops.concatenate([b, -b_0], axis=0)
    )
    settings = dataclasses.replace(
        adapter.adapter_settings,
        rank=2 * adapter.rank,
        alpha=adapter.alpha * (math.sqrt(2) if adapter.use_rslora else 2),
        init="default",
    )
    parameters = {**adapter.parameters, "lora_a": lora_a, "lora_b": lora_b}
    return settings.to_dict(), parameters


def factor_matrices(lora_a, lora_b):
    """The factors as the `(fan_in, rank)` and `(rank, fan_out)` matrices
    whose product is the update on `LoraLayer.kernel_matrix`'s matrix (for a
    layer whose `check_matrix_view` passes).

    Args:
        lora_a: an adapter's `lora_a` (rank last).
        lora_b: its `lora_b`.

    Returns:
        `(a, b)` matrices.
    """
    rank = lora_a.shape[-1]
    return ops.reshape(lora_a, (-1, rank)), ops.reshape(lora_b, (rank, -1))


def factors_from_matrices(layer, a, b):
    """The inverse of `factor_matrices`: `lora_a` and `lora_b` shaped for
    `layer` at the rank of `a`.

    Args:
        layer: a built `LoraLayer`.
        a: a `(fan_in, rank)` matrix.
        b: a `(rank, fan_out)` matrix.

    Returns:
        `(lora_a, lora_b)` in the layer's factor shapes.
    """
    a_shape, b_shape = layer.factor_shapes(a.shape[-1])
    return ops.reshape(a, a_shape), ops.reshape(b, b_shape)


def pissa_factors(matrix, rank: int, scale: float, iterations: int | None = None):
    """PiSSA's factors of `matrix`: `scale * a @ b` is its top-`rank` part.

    Args:
        matrix: a float32 `(fan_in, fan_out)` matrix.
        rank: the number of singular values kept.
        scale: the adapter's scale.
        iterations: `None` for the exact SVD, else the subspace iterations of
            a randomized SVD (`randomized_svd`).

    Returns:
        `(a, b)`: `(fan_in, rank)` and `(rank, fan_out)`.
    """
    if iterations is None:
        u, s, vh = ops.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(matrix, rank, iterations)
    root = ops.sqrt(s / scale)
    return u * root, root[:, None] * vh


def randomized_svd(matrix, rank: int, iterations: int):
    """An approximate top-`rank` SVD of `matrix` (Halko et al. 2009: a random
    range finder refined by `iterations` subspace iterations, algorithms 4.4
    and 5.1), as `torch.svd_lowrank(weight, rank, niter=iterations)` computes
    it on peft's `(out, in)` weight. The Gaussian test matrix comes from
    `keras.random` with a fresh seed generator (`_seed_generator`), so
    `keras.utils.set_random_seed` makes it repeatable.

    Args:
        matrix: a float32 `(m, n)` matrix, `rank <= min(m, n)`.
        rank: the number of singular triplets.
        iterations: the subspace iterations (0 or more).

    Returns:
        `(u, s, vh)`: `(m, rank)`, `(rank,)`, `(rank, n)`.
    """
    test = keras.random.normal(
        (matrix.shape[1], rank), dtype="float32", seed=_seed_generator()
    )
    basis, _ = ops.qr(ops.matmul(matrix, test))
    for _ in range(iterations):
        basis, _ = ops.qr(ops.matmul(ops.transpose(matrix), basis))
        basis, _ = ops.qr(ops.matmul(matrix, basis))
    u, s, vh = ops.svd(ops.matmul(ops.transpose(basis), matrix), full_matrices=False)
    return ops.matmul(basis, u), s, vh


def olora_factors(matrix, rank: int):
    """OLoRA's factors of `matrix`: from the QR decomposition of peft's
    `(out, in)` weight `matrix.T = Q R`, `a = R_r.T` and `b = Q_r.T`.

    Args:
        matrix: a float32 `(fan_in, fan_out)` matrix.
        rank: the number of columns of `Q` kept.

    Returns:
        `(a, b)`: `(fan_in, rank)` and `(rank, fan_out)`.
    """
    q, r = ops.qr(ops.transpose(matrix))
    return ops.transpose(r[:rank]), ops.transpose(q[:, :rank])


def orthogonal_factors(fan_in: int, fan_out: int, rank: int):
    """peft's orthogonal factors: with `Q` the orthogonal factor of a Gaussian
    `rank x rank` matrix, `a = G_a @ Q[0::2] / 10` and `b = Q[1::2].T @ G_b / 10`
    for Gaussian `G_a` `(fan_in, rank / 2)` and `G_b` `(rank / 2, fan_out)`, so
    `a @ b = 0` (the rows of `Q` are orthogonal) while neither is zero. The
    Gaussian matrices come from a fresh seed generator (`_seed_generator`).

    Args:
        fan_in: rows of `a`.
        fan_out: columns of `b`.
        rank: an even rank.

    Returns:
        `(a, b)`: `(fan_in, rank)` and `(rank, fan_out)`.
    """
    seed = _seed_generator()
    q, _ = ops.qr(keras.random.normal((rank, rank), dtype="float32", seed=seed))
    half = rank // 2
    g_a = keras.random.normal((fan_in, half), dtype="float32", seed=seed)
    g_b = keras.random.normal((half, fan_out), dtype="float32", seed=seed)
    a = ops.matmul(g_a, q[0::2])
    b = ops.matmul(ops.transpose(q[1::2]), g_b)
    return a / 10.0, b / 10.0


def _seed_generator():
    """A new `keras.random.SeedGenerator`, its seed drawn from Python's
    `random`, which `keras.utils.set_random_seed` seeds on every Keras
    version: the draws repeat under the same seed, as a Keras initializer's.
    The global generator of an unseeded `keras.random` call does not: Keras
    3.12's `set_random_seed` leaves it as it is (3.15's replaces it), so each
    init would go on from where the last one left it."""
    return keras.random.SeedGenerator()


def _matrix_shape(layer, rank: int) -> tuple[int, int]:
    """`(fan_in, fan_out)` of the layer's kernel matrix, from the factor
    shapes (no kernel read)."""
    a_shape, b_shape = layer.factor_shapes(rank)
    return math.prod(a_shape[:-1]), math.prod(b_shape) // rank


def _check_rank_fits(layer, adapter) -> None:
    fan_in, fan_out = _matrix_shape(layer, adapter.rank)
    if adapter.rank > min(fan_in, fan_out):
        raise ValueError(
            f"init={adapter.init!r} takes `rank` singular (or QR) components of "
            f"the kernel of layer '{layer.name}', a {fan_in} x {fan_out} matrix, "
            f"which has {min(fan_in, fan_out)}. Use a rank of at most "
            f"{min(fan_in, fan_out)}. Received: rank={adapter.rank}"
        )
