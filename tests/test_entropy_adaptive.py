"""Entropy-adaptive decoding (decoding.entropy_adaptive) end to end on tiny random models.

- End points: threshold=+inf is the small model's own greedy decoding and threshold=-inf the
  large model's, token for token on every row of a ragged batch.
- In between: the output, which model produced each token, the switch count and the catch-up
  token count equal a naive reference written here in plain Python (full sequences recomputed
  with the float64 numpy forward of `tiny.py` at every step, the same rule: entropy of the
  active model's raw logits, rolling window, minimum dwell). The rows stop at different times
  (an EOS id), and the catch-up width is small so that backlogs longer than it occur.
- catch_up alone: next-token logits after catching a lagging cache up equal a fresh forward
  over the whole context, and so do the logits of the next token decoded from that cache.
- Sampling: reproducible per seed; at threshold=-inf it is the large model's own sampling
  (same seed, same key schedule).
- Mismatched vocabularies / tokenizers are refused with a clear error.

The models: large = 2 layers, d 32; small = 1 layer, d 16; both vocab 96. Their entropies
(bits) are about 5.5 (small) and 4.9 (large), so THRESHOLD = 5.41 makes rows switch often (it is chosen
so that no rolling mean of the reference lies within 1e-3 bits of it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from decoding import Autoregressive, Context, Greedy, Sampling, generate, stream
from decoding.entropy_adaptive import EntropyAdaptive, catch_up, cost_ratio
from decoding.tokens import StopRule
from decoding.model import forward
from tiny import compile_events, numpy_forward, numpy_greedy, tiny_model

PROMPTS = [[5] * 9, [7], [4, 5, 6, 7], [9, 30, 30, 30, 30, 30, 59, 63, 44, 61, 59, 3, 3]]
N = 21
THRESHOLD = 5.41
MID = EntropyAdaptive(threshold=THRESHOLD, window=5, min_dwell=3, catchup_width=4)
INF = float("inf")


@functools.cache
def large():
    return tiny_model(seed=0)


@functools.cache
def small():
    return tiny_model(seed=1, num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)


def entropy_bits_np(logits) -> float:
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p * np.log2(np.where(p > 0, p, 1.0))).sum())


def reference_ead(prompt, max_new, threshold, window, min_dwell, eos_ids=(), width=None):
    """Naive EAD: recompute every sequence from scratch each step (see the module doc).

    Also counts what an incremental implementation would feed each model: catch-up tokens
    (tokens processed beyond the one a decoding step needs) and forward calls (one per step,
    plus a whole block per `width` tokens of a backlog longer than `width`)."""
    width = MID.catchup_width if width is None else width
    models = {False: small(), True: large()}
    seen = {False: len(prompt), True: len(prompt)}  # tokens each model has processed (prefill)
    catchup = {False: 0, True: 0}
    calls = {False: 0, True: 0}

    def next_logits(use_large, seq):
        m = models[use_large]
        return numpy_forward(m.config, m.params, seq)[0][-1]

    seq = list(prompt)
    h0 = entropy_bits_np(next_logits(False, seq))  # the small model starts: its entropy decides
    entropies, margins = [h0], [abs(h0 - threshold)]
    use_large = h0 > threshold
    switches = int(use_large)
    since = 0 if use_large else min_dwell
    out, by_large = [], []
    logits = next_logits(use_large, seq)
    calls[use_large] += 1  # the prompt prefill of the model that samples token 0
    while True:
        tok = int(np.argmax(logits))
        out.append(tok)
        by_large.append(use_large)
        seq.append(tok)
        since += 1
        if len(out) == max_new or tok in eos_ids:
            break
        mean = float(np.mean(entropies[-window:]))  # after token 0: [h0], which already decided
        margins.append(abs(mean - threshold))
        want = mean > threshold
        if want != use_large and since >= min_dwell:
            use_large, since, switches = want, 0, switches + 1
        logits = next_logits(use_large, seq)
        lag = len(seq) - seen[use_large]
        catchup[use_large] += lag - 1
        calls[use_large] += 1 + max(0, -(-(lag - width) // width))
        seen[use_large] = len(seq)
        entropies.append(entropy_bits_np(logits))
    return dict(tokens=out, by_large=by_large, switches=switches, catchup_small=catchup[False],
                catchup_large=catchup[True], calls_small=calls[False], calls_large=calls[True],
                margin=min(margins))


@functools.cache
def own_greedy(which: str):
    """The model's own greedy decoding (naive: `tiny.numpy_greedy`, which `test_generation`
    shows equal to `generate(model, ...)` with the default autoregressive strategy)."""
    model = large() if which == "large" else small()
    return [numpy_greedy(model.config, model.params, p, N) for p in PROMPTS]


@functools.cache
def mid_reference(eos: int):
    return [reference_ead(p, N, THRESHOLD, MID.window, MID.min_dwell, (eos,)) for p in PROMPTS]


@functools.cache
def mid_eos() -> int:
    """An EOS id that ends some rows of the reference after a few switches, but not all rows."""
    free = [reference_ead(p, N, THRESHOLD, MID.window, MID.min_dwell) for p in PROMPTS]
    for tok in sorted({t for r in free for t in r["tokens"]}):
        stops = [r["tokens"].index(tok) if tok in r["tokens"][: N - 1] else None for r in free]
        if None in stops and any(s is not None for s in stops) and all(s is None or s >= 6 for s in stops):
            return tok
    raise AssertionError("no EOS candidate stops some rows (late enough) but not all")


@functools.cache
def mid_result():
    return generate(large(), PROMPTS, strategy=MID, draft=small(), max_new_tokens=N, eos_token_id=mid_eos())


# ------------------------------------------------------------------------------------------
# End points
# ------------------------------------------------------------------------------------------


def test_infinite_threshold_is_the_small_models_own_greedy_decoding():
    res = generate(large(), PROMPTS, strategy=EntropyAdaptive(threshold=INF), draft=small(), max_new_tokens=N,
                   eos_token_id=())
    assert res.tokens == own_greedy("small")
    st = res.stats.extra
    assert st["large_tokens"] == 0 and st["switches"] == 0 and st["large_fraction"] == 0.0
    assert st["small_tokens"] == len(PROMPTS) * N
    assert st["cost"] == pytest.approx(small().config.param_count() / large().config.param_count())
    assert st["large_forwards"] == 1  # its prompt prefill only: the large model never decodes
    assert st["small_calls"] == len(PROMPTS) * N and st["cost_calls"] == st["cost"]


def test_minus_infinite_threshold_is_the_large_models_own_greedy_decoding():
    res = generate(large(), PROMPTS, strategy=EntropyAdaptive(threshold=-INF), draft=small(), max_new_tokens=N,
                   eos_token_id=())
    assert res.tokens == own_greedy("large")
    st = res.stats.extra
    assert st["small_tokens"] == 0 and st["large_fraction"] == 1.0 and st["cost"] == 1.0
    assert st["switches_per_row"] == [1] * len(PROMPTS)  # from the starting small model, before token 0
    assert st["catchup_tokens_large"] == 0 and st["small_forwards"] == 1


# ------------------------------------------------------------------------------------------
# In between: the naive reference
# ------------------------------------------------------------------------------------------


def test_reference_fixture_is_demanding():
    ref = mid_reference(mid_eos())
    assert ref[0]["margin"] > 1e-3 and min(r["margin"] for r in ref) > 1e-3, \
        "a rolling mean lies too close to the threshold for float32 vs float64 to agree"
    lengths = [len(r["tokens"]) for r in ref]
    assert N in lengths and min(lengths) < N, lengths
    assert all(r["switches"] >= 2 for r in ref)
    assert any(r["catchup_small"] + r["catchup_large"] > 0 for r in ref)


def test_switching_output_equals_the_naive_reference():
    res = mid_result()
    ref = mid_reference(mid_eos())
    assert res.tokens == [r["tokens"] for r in ref]
    st = res.stats.extra
    assert st["switches"] > 0 and st["small_tokens"] > 0 and st["large_tokens"] > 0
    assert st["switches_per_row"] == [r["switches"] for r in ref]
    assert st["large_tokens_per_row"] == [sum(r["by_large"]) for r in ref]
    assert st["small_tokens_per_row"] == [len(r["by_large"]) - sum(r["by_large"]) for r in ref]
    assert st["catchup_small_per_row"] == [r["catchup_small"] for r in ref]
    assert st["catchup_large_per_row"] == [r["catchup_large"] for r in ref]
    assert st["small_calls_per_row"] == [r["calls_small"] for r in ref]
    assert st["large_calls_per_row"] == [r["calls_large"] for r in ref]


def test_backlogs_longer_than_the_catchup_width_occurred():
    """With min_dwell=3 and width 4, a stay of 4+ tokens leaves a backlog of 5+ (> width)."""
    ref = mid_reference(mid_eos())
    longest_stay = 0
    for r in ref:
        run = 1
        for a, b in zip(r["by_large"], r["by_large"][1:]):
            run = run + 1 if a == b else 1
            longest_stay = max(longest_stay, run)
    assert longest_stay > MID.catchup_width


def test_stats_are_consistent():
    res = mid_result()
    st = res.stats.extra
    ps, pl = small().config.param_count(), large().config.param_count()
    assert st["params_small"] == ps and st["params_large"] == pl
    n = res.stats.new_tokens
    assert st["small_tokens"] + st["large_tokens"] == n
    assert [a + b for a, b in zip(st["small_tokens_per_row"], st["large_tokens_per_row"])] == \
        res.stats.tokens_per_row
    assert 0.0 < st["large_fraction"] < 1.0
    assert st["large_fraction"] == pytest.approx(st["large_tokens"] / n)
    assert ps / pl <= st["cost"] <= 1.0
    assert st["cost"] == pytest.approx((st["small_tokens"] * ps + st["large_tokens"] * pl) / (n * pl))
    extra = st["catchup_tokens_small"] * ps + st["catchup_tokens_large"] * pl
    assert st["cost_with_catchup"] == pytest.approx(st["cost"] + extra / (n * pl))
    assert st["cost_with_catchup"] > st["cost"]
    calls = (st["small_calls"] - st["small_tokens"]) * ps + (st["large_calls"] - st["large_tokens"]) * pl
    assert st["cost_calls"] == pytest.approx(st["cost"] + calls / (n * pl))
    assert st["cost"] < st["cost_calls"] <= st["cost_with_catchup"]  # some backlog exceeded the width
    assert st["small_forwards"] >= 1 and st["large_forwards"] >= 1


def test_cost_ratio_end_points():
    assert cost_ratio(10, 0, 1.0, 4.0) == 0.25
    assert cost_ratio(0, 10, 1.0, 4.0) == 1.0
    assert cost_ratio(5, 5, 1.0, 4.0, small_extra=2, large_extra=1) == pytest.approx((7 * 1 + 6 * 4) / 40)
    assert np.isnan(cost_ratio(0, 0, 1.0, 4.0))


def test_stream_yields_the_same_tokens_and_compiles_once():
    gen = stream(large(), PROMPTS, strategy=MID, draft=small(), max_new_tokens=N, eos_token_id=mid_eos())
    rounds = [next(gen), next(gen)]  # prefill, then the first step (the step program compiles here)
    with compile_events() as events:  # ... and never again, whatever the rows' backlogs
        try:
            while True:
                rounds.append(next(gen))
        except StopIteration as stop:
            result = stop.value
    assert events == []
    per_row = [sum((r[b] for r in rounds), []) for b in range(len(PROMPTS))]
    assert per_row == mid_result().tokens == result.tokens
    assert result.stats.extra["switches_per_row"] == mid_result().stats.extra["switches_per_row"]


def test_a_threshold_sweep_compiles_one_program():
    """The threshold is a traced value: after the first call, other thresholds (end points
    included) run the same program, and each still gives its own decoding."""
    strat = lambda t: dataclasses.replace(MID, threshold=t)  # noqa: E731
    kw = dict(draft=small(), max_new_tokens=N, eos_token_id=())
    generate(large(), PROMPTS, strategy=strat(1.0), **kw)
    with compile_events() as events:
        mid = generate(large(), PROMPTS, strategy=strat(THRESHOLD), **kw)
        low = generate(large(), PROMPTS, strategy=strat(-INF), **kw)
        high = generate(large(), PROMPTS, strategy=strat(INF), **kw)
    assert events == [], "a new threshold recompiled the program"
    free = [reference_ead(p, N, THRESHOLD, MID.window, MID.min_dwell) for p in PROMPTS]
    assert mid.tokens == [r["tokens"] for r in free]
    assert low.tokens == own_greedy("large") and high.tokens == own_greedy("small")


# ------------------------------------------------------------------------------------------
# catch_up alone
# ------------------------------------------------------------------------------------------

_catch_up = jax.jit(catch_up, static_argnums=(0, 6))


def test_catch_up_gives_the_logits_of_a_fresh_forward():
    """Rows lag by 1, 3 and 7 tokens (width 3: 7 takes two whole blocks first); a fourth row
    is not asked and must keep its cursor. Then one more token is decoded from the cache."""
    model = large()
    rng = np.random.RandomState(0)
    width, cap = 3, 64
    seqs = [rng.randint(0, 96, size=n).tolist() for n in (6, 11, 15, 8)]
    cached = [5, 8, 8, 3]  # tokens already in the cache per row
    need = np.array([True, True, True, False])
    b = len(seqs)
    context = np.zeros((b, cap), np.int32)
    for i, s in enumerate(seqs):
        context[i, : len(s)] = s
    context_len = np.array([len(s) for s in seqs], np.int32)
    prompt = np.zeros((b, max(cached)), np.int32)
    for i, (s, c) in enumerate(zip(seqs, cached)):
        prompt[i, :c] = s[:c]
    from decoding.strategy import prefill

    cache = model.init_cache(b, cap)
    _, cache = jax.jit(prefill, static_argnums=0)(model.config, model.params, prompt, np.array(cached, np.int32),
                                                  cache)
    logits, cache2, fed, calls = _catch_up(model.config, model.params, cache, context, context_len, need, width)
    assert np.asarray(cache2.lengths).tolist() == [6, 11, 15, 3]
    assert np.asarray(fed).tolist() == [1, 3, 7, 0]
    assert np.asarray(calls).tolist() == [1, 1, 3, 0]  # row 2: two whole blocks, then the last one
    for i in np.flatnonzero(need):
        want, _ = numpy_forward(model.config, model.params, seqs[i])
        np.testing.assert_allclose(np.asarray(logits[i]), want[-1], atol=2e-4, rtol=1e-4)
    # The caught-up cache continues like a fresh one: decode one more token per row.
    nxt = np.array([[11], [12], [13], [14]], np.int32)
    out = jax.jit(forward, static_argnums=0)(model.config, model.params, nxt, cache2.lengths[:, None], cache2)
    for i in np.flatnonzero(need):
        want, _ = numpy_forward(model.config, model.params, seqs[i] + [int(nxt[i, 0])])
        np.testing.assert_allclose(np.asarray(out.logits[i, 0]), want[-1], atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_switches():
    s = Sampling(temperature=1.3, top_k=20)
    kw = dict(strategy=MID, draft=small(), sampling=s, max_new_tokens=N, eos_token_id=())
    a = generate(large(), PROMPTS, seed=1, **kw)
    b = generate(large(), PROMPTS, seed=1, **kw)
    c = generate(large(), PROMPTS, seed=2, **kw)
    assert a.tokens == b.tokens and a.stats.extra == b.stats.extra
    assert a.tokens != c.tokens
    assert a.stats.extra["switches"] > 0
    assert a.stats.extra["small_tokens"] > 0 and a.stats.extra["large_tokens"] > 0
    assert all(len(t) == N for t in a.tokens)


def test_sampling_at_minus_infinity_is_the_large_models_own_sampling():
    s = Sampling(temperature=1.3, top_k=20)
    ead = generate(large(), PROMPTS, strategy=EntropyAdaptive(threshold=-INF), draft=small(), sampling=s,
                   max_new_tokens=N, eos_token_id=(), seed=3)
    own = generate(large(), PROMPTS, strategy=Autoregressive(), sampling=s, max_new_tokens=N, eos_token_id=(),
                   seed=3)
    assert ead.tokens == own.tokens


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


class _Tok:
    def __init__(self, vocab):
        self._vocab = vocab
        self.eos_token_id = 0

    def get_vocab(self):
        return dict(self._vocab)


def test_mismatched_vocabularies_are_refused():
    other = tiny_model(seed=2, vocab_size=97, num_layers=1)
    with pytest.raises(ValueError, match=r"tokenizers differ.*vocab sizes 96 vs 97"):
        generate(large(), PROMPTS, strategy=MID, draft=other, max_new_tokens=4)
    ctx = Context(target=large().config, sampling=Greedy(), rule=StopRule(), max_new_tokens=4, capacity=128,
                  draft=other.config)
    with pytest.raises(ValueError, match=r"share a tokenizer.*97 and 96"):
        MID.validate(ctx, other)


def test_mismatched_tokenizers_are_refused():
    vocab = {f"t{i}": i for i in range(96)}
    swapped = dict(vocab, t1=2, t2=1)
    big = tiny_model(seed=0, tokenizer=_Tok(vocab))
    little = tiny_model(seed=1, num_layers=1, tokenizer=_Tok(swapped))
    with pytest.raises(ValueError, match="tokenizers differ"):
        generate(big, PROMPTS, strategy=MID, draft=little, max_new_tokens=4)


def test_missing_small_model_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"draft=small_model"):
        generate(large(), PROMPTS, strategy=MID, max_new_tokens=4)
    with pytest.raises(ValueError, match="threshold"):
        EntropyAdaptive(threshold=float("nan"))
    with pytest.raises(ValueError, match="min_dwell"):
        EntropyAdaptive(threshold=1.0, min_dwell=0)
    with pytest.raises(ValueError, match="window"):
        EntropyAdaptive(threshold=1.0, window=0)
