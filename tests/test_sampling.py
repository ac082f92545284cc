"""Sampling settings: the processed distribution against numpy and Hugging Face warpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from decoding import Greedy, Sampling, make_sampling
from decoding.sampling import entropy_bits

V = 50


def random_logits(seed, shape=(V,), scale=3.0):
    return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# numpy reference of temperature -> top-k -> top-p (float64)
# ------------------------------------------------------------------------------------------


def np_processed_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0):
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    order = np.argsort(-x, kind="stable")  # most likely first, ties: lowest id first
    if top_k and top_k < len(x):
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1.0:
        p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        p /= p.sum()
        mass_before = 0.0
        for tok in order:
            if not keep[tok]:
                continue
            if mass_before >= top_p:
                keep[tok] = False  # the smallest prefix reaching top_p is already complete
            mass_before += p[tok]
    y = np.where(keep, x, -np.inf)
    return y - np.log(np.sum(np.exp(y[keep] - y[keep].max()))) - y[keep].max()


def kept(logprobs):
    return np.isfinite(np.asarray(logprobs))


# ------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------


def test_greedy_logprobs_is_one_hot_on_the_argmax():
    logits = random_logits(0, (4, V))
    lp = np.asarray(Greedy().logprobs(jnp.asarray(logits)))
    for row, lg in zip(lp, logits):
        assert row[np.argmax(lg)] == 0.0
        assert np.sum(np.isfinite(row)) == 1
        assert np.all(row[np.arange(V) != np.argmax(lg)] == -np.inf)
    np.testing.assert_array_equal(np.asarray(Greedy().sample(jax.random.PRNGKey(0), jnp.asarray(logits))),
                                  np.argmax(logits, axis=-1))


def test_greedy_ties_go_to_the_lowest_id():
    logits = np.zeros(V, np.float32)
    logits[[7, 3, 41]] = 2.5
    lp = np.asarray(Greedy().logprobs(jnp.asarray(logits)))
    assert lp[3] == 0.0 and np.sum(np.isfinite(lp)) == 1
    assert int(Greedy().sample(jax.random.PRNGKey(0), jnp.asarray(logits))) == 3


# ------------------------------------------------------------------------------------------
# Sampling.logprobs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_scaling_is_exact(temperature):
    logits = random_logits(1, (3, V))
    got = np.asarray(Sampling(temperature=temperature).logprobs(jnp.asarray(logits)))
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, np.stack([np_processed_logprobs(row, temperature) for row in logits]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 5, 17, V - 1])
def test_top_k_keeps_exactly_the_k_largest(k):
    batch = np.stack([random_logits(100 + seed) for seed in range(20)])
    lps = np.asarray(Sampling(top_k=k).logprobs(jnp.asarray(batch)))
    for logits, lp in zip(batch, lps):
        keep = kept(lp)
        assert keep.sum() == k
        assert set(np.flatnonzero(keep)) == set(np.argsort(-logits)[:k])
        np.testing.assert_allclose(np.exp(lp).sum(), 1.0, atol=1e-5)
        np.testing.assert_allclose(lp, np_processed_logprobs(logits, top_k=k), atol=1e-5)


def test_top_k_ties_at_the_boundary_keep_the_lowest_ids():
    logits = np.full(V, -1.0, np.float32)
    logits[[30, 2]] = 5.0  # two clear winners
    logits[[44, 9, 17, 3]] = 1.0  # four-way tie for the last two places
    lp = np.asarray(Sampling(top_k=4).logprobs(jnp.asarray(logits)))
    assert set(np.flatnonzero(kept(lp))) == {2, 30, 3, 9}
    # A tie spanning the whole vocabulary: exactly k survive, the lowest ids.
    lp = np.asarray(Sampling(top_k=5).logprobs(jnp.zeros(V)))
    assert set(np.flatnonzero(kept(lp))) == set(range(5))


def test_top_k_at_least_vocab_is_no_filter():
    logits = random_logits(2)
    np.testing.assert_allclose(np.asarray(Sampling(top_k=V).logprobs(jnp.asarray(logits))),
                               np.asarray(jax.nn.log_softmax(jnp.asarray(logits))), atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    batch = np.stack([random_logits(200 + seed) for seed in range(40)])
    lps = np.asarray(Sampling(top_p=p).logprobs(jnp.asarray(batch)))
    for logits, lp in zip(batch, lps):
        keep = kept(lp)
        want = np_processed_logprobs(logits, top_p=p)
        np.testing.assert_array_equal(keep, kept(want))
        np.testing.assert_allclose(lp[keep], want[keep], atol=1e-5)
        # Defining property: the kept set is a top prefix whose mass reaches p, and dropping
        # its least likely member would fall short of p (the crossing token is kept).
        probs = np.exp(np_processed_logprobs(logits))
        order = np.argsort(-logits)
        m = keep.sum()
        assert set(np.flatnonzero(keep)) == set(order[:m])
        assert probs[order[:m]].sum() >= p - 1e-6
        assert probs[order[: m - 1]].sum() < p + 1e-6


def test_top_p_always_keeps_the_top_token():
    logits = np.zeros(V, np.float32)
    logits[11] = 20.0  # the top token alone has mass ~1 > any p
    lp = np.asarray(Sampling(top_p=0.01).logprobs(jnp.asarray(logits)))
    assert np.flatnonzero(kept(lp)).tolist() == [11]
    assert lp[11] == pytest.approx(0.0, abs=1e-6)


def hf_processed(logits, temperature=1.0, top_k=0, top_p=1.0):
    """HF generate's warper chain (temperature, then top-k, then top-p) as log-probs."""
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.log_softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 10, 1.0), (1.0, 0, 0.8), (0.7, 20, 0.9), (1.5, 5, 0.6), (0.5, 0, 0.95), (1.0, 3, 0.2),
])
def test_processed_distribution_matches_hf_warpers(temperature, top_k, top_p):
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    batch = np.stack([random_logits(300 + seed) for seed in range(40)])
    ours = np.asarray(s.logprobs(jnp.asarray(batch)))  # batched over leading dims
    for row, logits in zip(ours, batch):
        hf = hf_processed(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(kept(row), kept(hf))
        np.testing.assert_allclose(row[kept(row)], hf[kept(hf)], atol=1e-5)
        np.testing.assert_allclose(row, np_processed_logprobs(logits, temperature, top_k, top_p), atol=1e-5)


def test_sample_frequencies_match_the_processed_distribution():
    logits = random_logits(7, (12,), scale=1.0)
    s = Sampling(temperature=0.8, top_k=9, top_p=0.95)
    probs = np.exp(np.asarray(s.logprobs(jnp.asarray(logits)), np.float64))
    n = 20000
    draws = np.asarray(s.sample(jax.random.PRNGKey(1234), jnp.broadcast_to(jnp.asarray(logits), (n, 12))))
    assert draws.shape == (n,) and draws.dtype == np.int32
    counts = np.bincount(draws, minlength=12)
    support = probs > 0
    assert 2 <= support.sum() < 12  # the filters removed something, several tokens remain
    assert counts[~support].sum() == 0  # filtered tokens are never drawn
    chi2 = stats.chisquare(counts[support], n * probs[support] / probs[support].sum())
    assert chi2.pvalue > 1e-3, chi2
    # The test has power: the unprocessed softmax is clearly rejected by the same draws.
    raw = np.exp(np.asarray(jax.nn.log_softmax(jnp.asarray(logits))), dtype=np.float64)
    assert stats.chisquare(counts, n * raw / raw.sum()).pvalue < 1e-6


# ------------------------------------------------------------------------------------------
# Construction and errors
# ------------------------------------------------------------------------------------------


def test_make_sampling():
    assert make_sampling(0.0) == Greedy()
    assert make_sampling(0, top_k=5) == Greedy()
    assert make_sampling(0.7, top_k=5, top_p=0.9) == Sampling(temperature=0.7, top_k=5, top_p=0.9)
    assert Greedy.is_greedy and not Sampling.is_greedy
    hash(Sampling(0.7, 5, 0.9))  # frozen: usable as a jit static argument


def test_negative_temperature_via_make_sampling():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -0\.5"):
        make_sampling(-0.5)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_sampling_refuses_non_positive_temperature_and_points_to_greedy(t):
    with pytest.raises(ValueError, match=r"temperature must be > 0.*Greedy\(\)"):
        Sampling(temperature=t)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.01, 2.0])
def test_top_p_out_of_range(p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got " + str(p)):
        Sampling(top_p=p)


def test_negative_top_k():
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 disables it\), got -1"):
        Sampling(top_k=-1)


def test_entropy_bits_matches_numpy():
    logits = random_logits(8, (5, V))
    logits[1, :40] = -np.inf  # masked entries contribute nothing
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0), axis=-1)
    got = np.asarray(entropy_bits(jnp.asarray(logits)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(entropy_bits(jnp.zeros(64))) == pytest.approx(6.0, abs=1e-5)  # uniform: log2 V
    assert float(entropy_bits(jnp.array([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(0.0, abs=1e-6)
