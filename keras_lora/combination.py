"""add_weighted_adapter(): a new adapter from a weighted sum of adapters.

As peft's `LoraModel.add_weighted_adapter` (`src/peft/tuners/lora/model.py`),
per layer, with weights `w_i` and each adapter's scale `s_i`:

- `"cat"`: `A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]` and `B = [B_1; B_2; ...]`
  (concatenated along the rank, the weight and scale folded into `A` as peft
  does), so `A @ B = sum(w_i s_i A_i @ B_i)` exactly; rank `sum(r_i)`.
- `"svd"`: the weighted update `sum(w_i s_i A_i @ B_i)` on the kernel matrix,
  truncated by SVD to `rank` (default: the largest of the ranks): `A = U_r`,
  `B = S_r Vh_r`; exact when `rank` reaches the update's rank.
- `"linear"`: equal ranks; `A = sum(sign(w_i s_i) sqrt|w_i s_i| A_i)` and
  `B = sum(sqrt|w_i s_i| B_i)`. Not the weighted sum of the updates: the
  product has the cross terms `A_i @ B_j`.

The new adapter has `alpha = rank` (scale 1), no rsLoRA, the first adapter's
dropout, and is inactive, as `keras_lora.add_adapter` leaves a new one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import keras
from keras import ops

from keras_lora.adapters import (
    check_adapter_names,
    check_model,
    lora_layers,
    record_config,
)
from keras_lora.checkpoint.describe import adapter_config, config_for_layers
from keras_lora.compiled_state import reset_traced_functions
from keras_lora.layers.initialization import factor_matrices, factors_from_matrices
from keras_lora.layers.settings import rewrites_kernel

COMBINATIONS = ("svd", "cat", "linear")


def add_weighted_adapter(
    model: keras.Model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    rank: int | None = None,
) -> None:
    """Adds an adapter whose update combines the updates of `adapters`,
    weighted by `weights`, on every LoRA layer that holds them.

    `"cat"` is exact: the new adapter alone computes what `adapters` active
    together compute, each update times its weight. `"svd"` is the best
    approximation of that at `rank`. `"linear"` mixes the factors themselves
    and is not exact (see the module docstring). Every check runs before the
    model changes.

    Args:
        model: an unmerged LoRA model.
        adapters: names of adapters of the model, each held by the same layers.
        weights: one real number per adapter (negative ones subtract).
        adapter_name: the new adapter's name, new to the model.
        combination: `"svd"` (peft's default), `"cat"` or `"linear"`.
        rank: with `"svd"`, the new rank; `None` means the largest rank of
            `adapters` on each layer.

    Raises:
        TypeError: if `model` is not a Keras model, or `adapters` or
            `weights` is not a list.
        ValueError: if a name is unknown, the lengths differ, a weight is not
            a finite number, `adapter_name` exists, `combination` is unknown,
            `rank` is not a positive integer or comes without `"svd"`, a layer
            holds only some of `adapters` or is merged, an adapter is DoRA or
            rewrote the base kernel (PiSSA, OLoRA: its factors hold part of the
            base weights, not an update), `"linear"` meets unequal ranks, or a
            layer's update is not one matrix (grouped conv, `"svd"`/`"cat"`).
            The model is left unchanged.

    Example:

    >>> keras_lora.add_weighted_adapter(
    ...     lora_model, ["task_a", "task_b"], [0.5, 0.5], "mix", combination="cat"
    ... )
    >>> keras_lora.set_adapter(lora_model, "mix")
    """
    check_model(model)
    layers = lora_layers(model)
    adapters, weights = _check_arguments(model, layers, adapters, weights, rank)
    _check_name(model, layers, adapter_name)
    if combination not in COMBINATIONS:
        raise ValueError(
            f"`combination` must be one of {COMBINATIONS}. "
            f"Received: combination={combination!r}"
        )
    if rank is not None and combination != "svd":
        raise ValueError(
            f"`rank` applies to combination='svd' only; combination="
            f"{combination!r} sets the rank itself. Received: rank={rank!r}"
        )
    holders = _holders(layers, adapters)
    first = adapter_config(model, adapters[0])
    combined = {
        path: _combined_factors(layer, adapters, weights, combination, rank)
        for path, layer in holders.items()
    }
    added = []
    try:
        for path, (lora_a, lora_b) in combined.items():
            layer = holders[path]
            new_rank = lora_a.shape[-1]
            layer.add_adapter(
                adapter_name,
                rank=new_rank,
                alpha=float(new_rank),
                dropout=layer.adapters[adapters[0]].dropout,
            )
            added.append(layer)
            layer.adapters[adapter_name].set_factors(lora_a, lora_b)
    except Exception:
        for layer in added:
            layer.delete_adapter(adapter_name)
        raise
    settings = {
        path: layer.adapters[adapter_name].settings() for path, layer in holders.items()
    }
    record_config(
        model, config_for_layers(settings, adapter_name, first.bias, first.train)
    )
    reset_traced_functions(model)


def _check_arguments(model, layers, adapters, weights, rank):
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(
            "`adapters` must be a list of adapter names. "
            f"Received: adapters={adapters!r}"
        )
    check_adapter_names(model, layers, "adapters", adapters, adapters)
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(
            f"`weights` must be a list of numbers. Received: weights={weights!r}"
        )
    if len(weights) != len(adapters):
        raise ValueError(
            f"`weights` must hold one number per adapter ({len(adapters)}). "
            f"Received: weights={weights!r}"
        )
    if not all(_is_finite_number(weight) for weight in weights):
        raise ValueError(
            f"`weights` must be finite real numbers. Received: weights={weights!r}"
        )
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0
    ):
        raise ValueError(
            f"`rank` must be a positive integer or None. Received: rank={rank!r}"
        )
    return list(adapters), [float(weight) for weight in weights]


def _check_name(model, layers, adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name:
        raise ValueError(
            "`adapter_name` must be a non-empty string without '/'. "
            f"Received: adapter_name={adapter_name!r}"
        )
    if any(adapter_name in layer.adapters for layer in layers.values()):
        raise ValueError(
            f"Model '{model.name}' already has an adapter named '{adapter_name}'; "
            f"pick another name. Received: adapter_name={adapter_name!r}"
        )


def _holders(layers, adapters):
    """The layers holding `adapters`, after refusing those holding only some
    of them, merged ones and adapters a weighted sum cannot combine."""
    holders = {
        path: layer
        for path, layer in layers.items()
        if any(name in layer.adapters for name in adapters)
    }
    partial = [
        path
        for path, layer in holders.items()
        if not all(name in layer.adapters for name in adapters)
    ]
    if partial:
        raise ValueError(
            f"Layers {partial} hold only some of the adapters; every layer must "
            f"hold all of them or none. Received: adapters={adapters!r}"
        )
    merged = [path for path, layer in holders.items() if layer.merged]
    if merged:
        raise ValueError(
            f"Layers {merged} are merged. Call `keras_lora.unmerge(model)` first."
        )
    for path, layer in holders.items():
        for name in adapters:
            adapter = layer.adapters[name]
            if adapter.use_dora or rewrites_kernel(adapter.init):
                kind = "is DoRA" if adapter.use_dora else f"has init={adapter.init!r}"
                raise ValueError(
                    f"Adapter '{name}' of layer '{path}' {kind}: its factors are "
                    "not an update added to the base kernel, so weighting them "
                    "does not weight its effect. Combine plain LoRA adapters "
                    "(save a PiSSA/OLoRA one with `for_original_base=True` and "
                    f"load it back). Received: adapters={adapters!r}"
                )
    return holders


def _combined_factors(layer, adapters, weights, combination, rank):
    """The `(lora_a, lora_b)` of the combined adapter on one layer."""
    states = [layer.adapters[name] for name in adapters]
    # Each adapter's weight times its scale: what its A @ B is multiplied by.
    factors = [w * state.scale for w, state in zip(weights, states, strict=True)]
    if combination == "linear":
        ranks = [state.rank for state in states]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"combination='linear' sums the factors, so the adapters must have "
                f"one rank; on layer '{layer.name}' they have {ranks}. Use 'cat' "
                f"or 'svd'. Received: adapters={adapters!r}"
            )
        # The sign goes to A only, or it would cancel in A @ B.
        roots = [math.sqrt(abs(factor)) for factor in factors]
        signs = [math.copysign(1.0, factor) for factor in factors]
        pairs = list(zip(roots, signs, states, strict=True))
        lora_a = sum(sign * root * state.lora_a for root, sign, state in pairs)
        lora_b = sum(root * state.lora_b for root, _, state in pairs)
        return ops.convert_to_tensor(lora_a), ops.convert_to_tensor(lora_b)
    layer.check_matrix_view(f"combination={combination!r}")
    matrices = [factor_matrices(state.lora_a, state.lora_b) for state in states]
    weighted = [
        (factor * a, b) for factor, (a, b) in zip(factors, matrices, strict=True)
    ]
    if combination == "cat":
        a = ops.concatenate([a for a, _ in weighted], axis=1)
        b = ops.concatenate([b for _, b in weighted], axis=0)
        return factors_from_matrices(layer, a, b)
    delta = sum(ops.matmul(a, b) for a, b in weighted)
    rank = rank or max(state.rank for state in states)
    u, s, vh = ops.svd(delta, full_matrices=False)
    kept = min(rank, s.shape[0])
    # A rank beyond the update's own is padded with zero columns (exact).
    a = ops.pad(u[:, :kept], [[0, 0], [0, rank - kept]])
    b = ops.pad(s[:kept, None] * vh[:kept], [[0, rank - kept], [0, 0]])
    return factors_from_matrices(layer, a, b)


def _is_finite_number(value) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
