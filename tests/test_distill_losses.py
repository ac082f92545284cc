"""Each divergence against a float64 numpy reference: values, gradients, masking, bad names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import losses

RNG = np.random.default_rng(0)
T_LOGITS = RNG.normal(0, 2.0, (3, 5, 11))
S_LOGITS = RNG.normal(0, 2.0, (3, 5, 11))
MASK = (RNG.random((3, 5)) < 0.7).astype(np.float32)


def _softmax(x, temp):
    z = x / temp
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref(name, t, s, temp, beta=0.5):
    p, q = _softmax(t, temp), _softmax(s, temp)
    kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), -1)  # noqa: E731
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * np.abs(p - q).sum(-1)


def ref_loss(name, s, temp, beta):
    return np.sum(ref(name, T_LOGITS, s, temp, beta) * MASK) / MASK.sum()


CASES = [("fkl", 1.0, 0.5), ("rkl", 1.0, 0.5), ("jsd", 1.0, 0.5), ("jsd", 0.7, 0.1), ("jsd", 1.0, 0.9),
         ("tvd", 1.0, 0.5), ("fkl", 0.5, 0.5), ("tvd", 2.0, 0.5)]


@pytest.mark.parametrize("name,temp,beta", CASES)
def test_values_match_numpy(name, temp, beta):
    got = losses.Divergence(name, temp, beta)(jnp.asarray(T_LOGITS, jnp.float32), jnp.asarray(S_LOGITS, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), ref(name, T_LOGITS, S_LOGITS, temp, beta), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name,temp,beta", CASES)
def test_gradients_match_numpy_finite_differences(name, temp, beta):
    """d(masked mean)/d(student logits) against central differences of the float64 reference."""
    div = losses.Divergence(name, temp, beta)

    def f(s):
        return losses.masked_mean(div(jnp.asarray(T_LOGITS, jnp.float32), s), jnp.asarray(MASK))

    grad = np.asarray(jax.grad(f)(jnp.asarray(S_LOGITS, jnp.float32)))
    num = np.zeros_like(S_LOGITS)
    eps = 1e-5
    for idx in np.ndindex(S_LOGITS.shape):
        up, down = S_LOGITS.copy(), S_LOGITS.copy()
        up[idx] += eps
        down[idx] -= eps
        num[idx] = (ref_loss(name, up, temp, beta) - ref_loss(name, down, temp, beta)) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-3, atol=2e-6)
    # masked positions get no gradient
    assert np.all(grad[MASK == 0] == 0)


def test_divergences_vanish_at_equality_and_tvd_is_one_minus_acceptance():
    """Equal distributions: every divergence is 0. TVD = 1 - sum_v min(p, q), the probability
    that speculative sampling accepts a token drafted from q."""
    t = jnp.asarray(T_LOGITS, jnp.float32)
    for name in losses.DIVERGENCES:
        np.testing.assert_allclose(np.asarray(losses.token_divergence(name, t, t)), 0.0, atol=1e-6)
    p, q = _softmax(T_LOGITS, 1.0), _softmax(S_LOGITS, 1.0)
    accept = np.minimum(p, q).sum(-1)
    np.testing.assert_allclose(np.asarray(losses.tvd(t, jnp.asarray(S_LOGITS, jnp.float32))), 1 - accept, rtol=1e-5)


def test_all_masked_gives_zero_not_nan():
    v = losses.tvd(jnp.asarray(T_LOGITS, jnp.float32), jnp.asarray(S_LOGITS, jnp.float32))
    assert float(losses.masked_mean(v, jnp.zeros((3, 5)))) == 0.0


def test_unknown_loss_and_bad_settings_are_clear_errors():
    with pytest.raises(losses.UnknownLoss, match="unknown loss 'kl'.*fkl, rkl, jsd, tvd"):
        losses.Divergence("kl")
    with pytest.raises(losses.UnknownLoss, match="unknown loss"):
        losses.token_divergence("mse", jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        losses.Divergence("jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.Divergence("tvd", temperature=0.0)
