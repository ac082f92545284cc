"""Rotary position embeddings (Su et al. 2021, "RoFormer") with the scaling variants in use.

Frequencies are computed once on the host (numpy, float64) from the static config; inside jit
only `cos/sin(positions * inv_freq)` is evaluated, so explicit per-token positions (chains,
trees, ragged rows) cost nothing extra.

Variants (as transformers defines them in `modeling_rope_utils`):
- default: inv_freq = theta^(-2i/Dh).
- linear (position interpolation): inv_freq / factor.
- llama3: wavelengths longer than original_max/low_freq_factor are divided by `factor`, shorter
  than original_max/high_freq_factor kept, smooth interpolation in between.
- yarn (Peng et al. 2023): NTK-by-parts blend of interpolated and extrapolated frequencies, and
  an attention scaling (0.1 ln(factor) + 1 by default) applied to cos and sin.
Dynamic NTK scaling depends on the current sequence length and is refused by the config.

The rotation is the "rotate half" layout used by Hugging Face checkpoints (first half of the
head dimension pairs with the second half).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, max_pos: int):
    """Return (inv_freq: float64[Dh/2], attention_factor: float) for a rope configuration."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if not scaling:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        original = float(scaling.get("original_max_position_embeddings", max_pos))
        beta_fast = float(scaling.get("beta_fast", 32.0))
        beta_slow = float(scaling.get("beta_slow", 1.0))
        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            mscale = float(scaling.get("mscale", 1.0) or 1.0)
            attn_factor = 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0
        dim = head_dim

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo = correction_dim(beta_fast)
        hi = correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation_factor = 1 - ramp
        interpolation = inv_freq / factor
        inv = interpolation * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
        return inv, float(attn_factor)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_tables(positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0):
    """cos, sin: float32[B, T, Dh] for `positions: int32[B, T]`."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x: [B, T, N, Dh]` by `cos, sin: [B, T, Dh]` (rotate-half layout)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
