"""Numerics shared by every architecture's decoder layers: float32-accumulated einsum, RMS norm
(Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), the attention visibility rule
of the forward contract, and the slicing of fused projections.

Legend: B batch, T new tokens, S cache capacity.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def f32_einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in float32. XLA:CPU has no bf16 x bf16 -> f32 dot, so
    there the operands are upcast (same result, slower); accelerators keep 16-bit operands."""
    if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, weight_offset: float = 0.0) -> jax.Array:
    """`x / rms(x) * (weight + weight_offset)` over the last axis, computed in float32 and cast
    back to x's dtype. `weight_offset=1` is Gemma's `x * (1 + w)` (a zero weight is the identity)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32)
    if weight_offset:
        w = w + weight_offset
    return (xf * w).astype(x.dtype)


def attention_mask(cache_lengths, positions, capacity, mask=None, window=None, slot_mask=None):
    """visible: bool[B, T, S] — which cache slots each new query may attend to (the one rule).

    Query t of row b sees every committed slot `s < cache_lengths[b]` and the new slot
    `cache_lengths[b] + j` iff `mask[b, t, j]` (default causal, `j <= t`). With `slot_mask:
    bool[B, T, S]` the caller states visibility over all slots directly (the new tokens occupy
    slots `lengths + t`); the prefix rule and `mask` are then not applied. A sliding `window`
    masks keys whose position is `window` or more behind the query's, in both cases (slot
    positions are then taken as slot indices).
    """
    b, t = positions.shape
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    if slot_mask is not None:
        visible = slot_mask.astype(bool)
        if window is not None:
            visible &= (positions[:, :, None] - slots) < window
        return visible
    start = jnp.asarray(cache_lengths, jnp.int32)[:, None, None]  # [B, 1, 1]
    prefix = slots < start
    j = slots - start  # index of the slot within the new block
    in_block = (j >= 0) & (j < t)
    if mask is None:
        block_ok = j <= jnp.arange(t, dtype=jnp.int32)[None, :, None]
    else:
        jc = jnp.clip(j, 0, t - 1)
        block_ok = jnp.take_along_axis(mask.astype(bool), jnp.broadcast_to(jc, (b, t, capacity)), axis=2)
    visible = prefix | (in_block & block_ok)
    if window is not None:
        key_pos = jnp.where(
            prefix,
            slots,
            jnp.take_along_axis(positions[:, None, :], jnp.clip(j, 0, t - 1), axis=2),
        )
        visible &= (positions[:, :, None] - key_pos) < window
    return visible


def split_parts(x: jax.Array, parts: Sequence[tuple[str, int]]) -> tuple[jax.Array, ...]:
    """Static slices of `x: [..., sum(widths)]` along its last axis, one per `(part, width)`."""
    bounds = np.cumsum([0] + [w for _, w in parts])
    if bounds[-1] != x.shape[-1]:
        raise ValueError(f"parts {tuple(parts)} cover {bounds[-1]} columns, the array has {x.shape[-1]}.")
    return tuple(x[..., int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:]))
