"""Sampling settings as small frozen dataclasses that define the *processed* distribution.

Speculative and tree verification are lossless only if the draft's proposal distribution and
the target's verification distribution are processed exactly as plain sampling processes them
(Leviathan et al. 2023, sec. 3; Chen et al. 2023). So every setting exposes one method,
`logprobs(logits) -> log p_processed`, and sampling, drafting and verification all use it.

- `Greedy()`: the distribution is one-hot on the argmax (ties go to the lowest token id, as
  `jnp.argmax` breaks them), so greedy verification is "accept while argmax matches".
- `Sampling(temperature, top_k, top_p)`: temperature, then top-k, then top-p (nucleus), in the
  order Hugging Face `generate` applies them. top-p keeps the smallest set of most likely
  tokens whose mass reaches `top_p` (the token that crosses the threshold is kept); ties at
  the top-k boundary keep the lowest ids. `temperature=0` is refused: use `Greedy()`.

Legend: V vocab; `...` any leading batch dims.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Deterministic argmax decoding."""

    is_greedy = True

    def logprobs(self, logits: jax.Array) -> jax.Array:
        """float32[..., V]: 0 at the argmax, -inf elsewhere (a one-hot distribution)."""
        top = jnp.argmax(logits, axis=-1)
        return jnp.where(jax.nn.one_hot(top, logits.shape[-1], dtype=bool), 0.0, NEG_INF)

    def sample(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Ancestral sampling from the temperature / top-k / top-p processed distribution."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    is_greedy = False

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ValueError(
                f"temperature must be > 0 for sampling, got {self.temperature}; "
                "use decoding.Greedy() for temperature 0 (argmax decoding)."
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

    def logprobs(self, logits: jax.Array) -> jax.Array:
        """float32[..., V]: log of the processed distribution (-inf on filtered tokens)."""
        x = logits.astype(jnp.float32) / self.temperature
        vocab = x.shape[-1]
        if self.top_k and self.top_k < vocab:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            # Keep the lowest ids among ties at the boundary so exactly k tokens survive.
            above = x > kth
            at = x == kth
            room = self.top_k - jnp.sum(above, axis=-1, keepdims=True)
            keep = above | (at & (jnp.cumsum(at, axis=-1) <= room))
            x = jnp.where(keep, x, NEG_INF)
        if self.top_p < 1.0:
            order = jnp.argsort(-x, axis=-1, stable=True)
            sorted_x = jnp.take_along_axis(x, order, axis=-1)
            probs = jax.nn.softmax(sorted_x, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep_sorted = mass_before < self.top_p
            keep_sorted = keep_sorted.at[..., 0].set(True)
            keep = jnp.zeros_like(keep_sorted)
            keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
            x = jnp.where(keep, x, NEG_INF)
        return jax.nn.log_softmax(x, axis=-1)

    def sample(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        return jax.random.categorical(key, self.logprobs(logits), axis=-1).astype(jnp.int32)


def make_sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """`Greedy()` for temperature 0, else `Sampling(...)`; negative temperatures are refused."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature == 0:
        return Greedy()
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p)


def entropy_bits(logits: jax.Array) -> jax.Array:
    """Shannon entropy (bits) of softmax(logits) over the last axis, before any processing."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1) / jnp.log(2.0)
