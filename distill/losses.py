"""Token-level divergences between a teacher's and a student's next-token distributions.

DistillSpec (Zhou et al. 2023, "DistillSpec: Improving Speculative Decoding via Knowledge
Distillation", sec. 3 and table 1) trains the draft q toward the target p with one of these,
each over the whole vocabulary at every position the loss mask keeps:

  fkl   forward KL   KL(p || q) = sum_v p log(p / q)             (mode covering)
  rkl   reverse KL   KL(q || p) = sum_v q log(q / p)             (mode seeking)
  jsd   JSD(beta)    beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                     (the generalised JSD of Agarwal et al. 2024, GKD, which DistillSpec uses)
  tvd   total variation  TVD(p, q) = 1/2 sum_v |p - q|

Both distributions are softmaxes of the logits divided by one `temperature` (the sampling
temperature the drafter will be verified at). TVD is the one that bounds speculative decoding:
the probability that a token drafted from q is accepted by the target p is exactly
`1 - TVD(p, q)` (Leviathan et al. 2023, Corollary 3.6), so minimising TVD maximises the
acceptance rate at that temperature.

Choices the paper leaves open: beta must lie strictly inside (0, 1) (the ends make JSD vanish);
masked means divide by the number of kept positions (an all-masked batch gives 0, never NaN).

Legend: `...` leading dims (B, T); V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


class UnknownLoss(ValueError):
    """A divergence name that is not one of `DIVERGENCES`."""


@dataclasses.dataclass(frozen=True)
class Divergence:
    """A divergence by name (`fkl`, `rkl`, `jsd`, `tvd`) at a temperature (static, hashable).

    `beta` is JSD's mixture weight of the teacher (ignored by the others).
    """

    name: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5

    def __post_init__(self):
        if self.name not in DIVERGENCES:
            raise UnknownLoss(f"unknown loss {self.name!r}; choose one of {', '.join(DIVERGENCES)} "
                              "(forward KL, reverse KL, JSD(beta), total variation).")
        if not self.temperature > 0:
            raise ValueError(f"Divergence temperature must be > 0, got {self.temperature}.")
        if self.name == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"JSD needs 0 < beta < 1, got beta={self.beta}.")

    def __call__(self, teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
        """float32[...]: the divergence at every position (teacher/student logits [..., V])."""
        return token_divergence(self.name, teacher_logits, student_logits, self.temperature, self.beta)


def _log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis; terms with p = 0 contribute 0 (also where q = 0)."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def forward_kl(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
    """KL(p || q): float32[...]."""
    return _kl(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))


def reverse_kl(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
    """KL(q || p): float32[...]."""
    return _kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature))


def jsd(teacher_logits, student_logits, temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q: float32[...]."""
    logp = _log_softmax(teacher_logits, temperature)
    logq = _log_softmax(student_logits, temperature)
    logm = jnp.logaddexp(jnp.log(beta) + logp, jnp.log1p(-beta) + logq)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def tvd(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
    """Total variation 1/2 sum |p - q|: float32[...].

    Speculative sampling accepts a token drafted from q with probability exactly
    `1 - TVD(p, q)`: the expected acceptance rate at this temperature is 1 - TVD.
    """
    p = jnp.exp(_log_softmax(teacher_logits, temperature))
    q = jnp.exp(_log_softmax(student_logits, temperature))
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def token_divergence(name: str, teacher_logits, student_logits, temperature: float = 1.0,
                     beta: float = 0.5) -> jax.Array:
    """The divergence `name` at every position: float32[...] from logits [..., V]."""
    if name == "fkl":
        return forward_kl(teacher_logits, student_logits, temperature)
    if name == "rkl":
        return reverse_kl(teacher_logits, student_logits, temperature)
    if name == "jsd":
        return jsd(teacher_logits, student_logits, temperature, beta)
    if name == "tvd":
        return tvd(teacher_logits, student_logits, temperature)
    raise UnknownLoss(f"unknown loss {name!r}; choose one of {', '.join(DIVERGENCES)}.")


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of values where mask, number kept): both float32 scalars. values, mask: [...]."""
    m = mask.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * m), jnp.sum(m)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values over the kept positions (0 when none is kept)."""
    total, count = masked_sum(values, mask)
    return total / jnp.maximum(count, 1.0)
