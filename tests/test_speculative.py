"""Speculative and tree decoding end to end: lossless under greedy and under sampling.

Greedy: every strategy x drafter must reproduce greedy autoregressive decoding token for token
on every row of a ragged batch whose rows stop at different times (an EOS id taken from the
reference output; max_new_tokens not a multiple of gamma + 1).

Sampling: on a V = 6 target, the exact law of the first K = 4 generated tokens is computed by
enumeration (`spec_common.exact_continuations`); N = 4000 identical prompts are generated as one
batch and the empirical law is compared with it by Pearson's chi-square test. Any sample in a
zero-probability cell (a token that top-k / top-p removed) fails outright.

Threshold: fail when the chi-square p-value < ALPHA = 1e-4. Seeds are fixed, so the tests are
deterministic; a correct implementation fails a given seed with probability 1e-4 (about 0.2%
for the ~20 distribution tests of the suite). Power: the lossy lenience = 0.3 control below
(the same test, same N) gives chi-square statistics in the thousands on ~100 degrees of freedom
(p ~ 0), while the 1e-4 critical value is about df + 4.5 sqrt(2 df) (~ 165 for df = 100).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from decoding import (Autoregressive, DynamicGamma, Sampling, Speculative, TreeDecoding,
                      generate)
from drafting import DraftModel, DynamicTree, LayerSkip, PromptLookup, TreeTopology
from spec_common import (DRAFTS, MAX_NEW, PROMPTS, REPETITIVE_ROW, SAMPLE_K, SAMPLE_SEED, SMALL_V_PROMPT,
                         chi_square, continuation_index, eos_id, exact_continuations, reference_with_eos, run_state,
                         sample_run, small_v_target, target)

ALPHA = 1e-4

# ------------------------------------------------------------------------------------------
# Greedy losslessness
# ------------------------------------------------------------------------------------------

IRREGULAR_TREE = TreeTopology(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))

# name: (strategy, drafts) — drafts name spec_common.DRAFTS entries (None: no draft model).
# "self" drafts with the target itself (every proposal accepted), "noisy" with perturbed target
# weights (partly accepted), "small" with an unrelated small model (almost always rejected).
GREEDY_CASES = {
    "chain-draftmodel": (Speculative(DraftModel(), gamma=4), ("small", "self", "noisy")),
    "chain-draftmodel-dynamic-confidence": (
        Speculative(DraftModel(), gamma=4, dynamic=DynamicGamma(start=2), confidence=0.3), ("self", "noisy")),
    "chain-layerskip": (Speculative(LayerSkip(layers=2), gamma=3), (None,)),
    "chain-layerskip-dynamic-confidence": (
        Speculative(LayerSkip(layers=1), gamma=4, dynamic=DynamicGamma(start=1, minimum=1), confidence=0.2), (None,)),
    "chain-promptlookup": (Speculative(PromptLookup(), gamma=4), (None,)),
    "chain-promptlookup-dynamic": (
        Speculative(PromptLookup(max_ngram=2), gamma=5, dynamic=DynamicGamma(start=2, grow=2)), (None,)),
    "tree-static-draftmodel": (TreeDecoding(DraftModel(), tree=TreeTopology.from_branching((3, 2, 1))),
                               ("self", "noisy")),
    "tree-dynamic-draftmodel": (TreeDecoding(DraftModel(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)),
                                ("self", "noisy")),
    "tree-static-layerskip": (TreeDecoding(LayerSkip(layers=2), tree=IRREGULAR_TREE), (None,)),
    "tree-dynamic-layerskip": (TreeDecoding(LayerSkip(layers=1), tree=DynamicTree(depth=2, top_k=2, total_tokens=5)),
                               (None,)),
}


def test_reference_batch_is_demanding():
    """The fixture itself: ragged lengths, rows stopping at different times, one full row."""
    eos = eos_id()
    ref = reference_with_eos(eos)
    lengths = [len(r) for r in ref]
    assert sorted({len(p) for p in PROMPTS}) == [1, 4, 9, 13]
    assert MAX_NEW in lengths, "some row must run to max_new_tokens"
    stopped = [n for r, n in zip(ref, lengths) if r[-1] == eos]
    assert len(set(stopped)) >= 2, f"rows must stop at EOS at different steps: {lengths}"
    assert all(MAX_NEW % (g + 1) for g in (1, 2, 3, 4, 5))


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_lossless(case):
    strategy, drafts = GREEDY_CASES[case]
    eos = eos_id()
    want = reference_with_eos(eos)
    for name in drafts:
        out = generate(target(), PROMPTS, max_new_tokens=MAX_NEW, strategy=strategy,
                       draft=DRAFTS[name]() if name else None, eos_token_id=eos)
        for row, (got, exp) in enumerate(zip(out.tokens, want)):
            assert got == exp, f"{case} with draft {name}: row {row} differs from greedy AR\n{got}\n{exp}"


@pytest.mark.parametrize("strategy", [Speculative(DraftModel(), gamma=4),
                                      TreeDecoding(DraftModel(), tree=TreeTopology.from_branching((3, 2, 1)))],
                         ids=["chain", "static-tree"])
def test_self_drafting_accepts_everything(strategy):
    """Drafting with the target itself: every round accepts the full depth, so each row needs
    exactly 1 + ceil((tokens - 1) / (depth + 1)) target forwards (prefill included)."""
    eos = eos_id()
    result, state = run_state(target(), PROMPTS, strategy, draft=target(), eos=(eos,))
    assert result.tokens == reference_with_eos(eos)
    depth = strategy.shape.max_depth
    hist = np.asarray(state.accept_hist)
    assert hist[:depth].sum() == 0 and hist[depth] > 0, f"rounds by accepted depth: {hist}"
    counts, steps = np.asarray(state.out.count), np.asarray(state.out.steps)
    np.testing.assert_array_equal(steps, 1 + -(-(counts - 1) // (depth + 1)))
    assert result.stats.extra["accepted_per_round"] == depth  # tau -> depth + 1 for long outputs
    # The result's per-row forwards are those counts, and every running row's round is one
    # call: the prefill plus the rounds a row took part in.
    assert result.stats.forwards_per_row == steps.tolist()
    assert sum(result.stats.forwards_per_row) - len(PROMPTS) == result.stats.extra["row_rounds"]
    assert len(set(result.stats.forwards_per_row)) > 1  # rows finished at different rounds


def test_prompt_lookup_accepts_on_repetitive_prompt():
    eos = eos_id()
    strategy = Speculative(PromptLookup(), gamma=4)
    result, state = run_state(target(), PROMPTS, strategy, eos=(eos,))
    assert result.tokens == reference_with_eos(eos)
    counts, steps = np.asarray(state.out.count), np.asarray(state.out.steps)
    tau = counts / steps
    assert tau[REPETITIVE_ROW] > 1.0, f"prompt lookup never helped on the repetitive row: tau {tau}"
    assert result.stats.extra["accepted_per_round"] > 0


def test_noisy_draft_mixes_acceptance_and_rejection():
    """The partly-agreeing draft really exercises both branches (else the greedy tests above
    would only check the all-accepted or the all-rejected path)."""
    result, state = run_state(target(), PROMPTS, GREEDY_CASES["chain-draftmodel"][0], draft=DRAFTS["noisy"](),
                              eos=(eos_id(),))
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[1:4].sum() > 0 and hist[4] > 0, hist


@pytest.mark.parametrize("kwargs, message", [
    (dict(lenience=0.0), "lenience must be in"),
    (dict(lenience=1.5), "lenience must be in"),
])
def test_invalid_lenience(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=Speculative(DraftModel(), gamma=2, **kwargs),
                 draft=DRAFTS["small"]())


def test_invalid_speculative_settings():
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        Speculative(DraftModel(), gamma=0)
    with pytest.raises(ValueError, match="confidence must be in"):
        Speculative(DraftModel(), confidence=1.0)
    with pytest.raises(ValueError, match="DynamicGamma needs 1 <= minimum <= start <= gamma=4"):
        Speculative(DraftModel(), gamma=4, dynamic=DynamicGamma(start=5))


# ------------------------------------------------------------------------------------------
# Sampled losslessness
# ------------------------------------------------------------------------------------------

K = SAMPLE_K

# The two processed distributions of the brief: temperature with top-k, temperature with top-p
# (each also checks that temperature is applied identically in drafting and verification).
SAMPLINGS = {
    "t0.8-topk4": Sampling(temperature=0.8, top_k=4),
    "t1.3-topp0.8": Sampling(temperature=1.3, top_p=0.8),
}

# Chains draft by sampling the draft's processed distribution (stochastic q); trees use the
# draft's top-k (one-hot siblings) or, with sampled_siblings, distinct siblings drawn without
# replacement (recursive rejection); prompt lookup proposes copies (one-hot). The dynamic case
# fails (p ~ 1e-17) if the search lets a draw's own q(x) decide whether it is kept.
SAMPLED_CASES = {
    "ar": (Autoregressive(), False),
    "chain-draftmodel": (Speculative(DraftModel(), gamma=2), True),
    "tree-static": (TreeDecoding(DraftModel(), tree=TreeTopology.from_branching((2, 2))), True),
    # ranks with gaps: the j-th present sibling must get the j-th draw
    "tree-static-sampled-siblings": (TreeDecoding(DraftModel(sampled_siblings=True), tree=TreeTopology(
        ((0,), (1,), (3,), (0, 0), (0, 2), (1, 0)))), True),
    "tree-dynamic": (TreeDecoding(DraftModel(), tree=DynamicTree(depth=2, top_k=2, total_tokens=4)), True),
    "tree-dynamic-sampled-siblings": (TreeDecoding(DraftModel(sampled_siblings=True),
                                                   tree=DynamicTree(depth=3, top_k=3, total_tokens=7)), True),
    "chain-promptlookup": (Speculative(PromptLookup(), gamma=3), False),
}


@functools.cache
def exact_law(sampling) -> np.ndarray:
    return exact_continuations(small_v_target(), SMALL_V_PROMPT, K, sampling)


def law_test(tokens, sampling) -> dict:
    return chi_square(continuation_index(tokens, small_v_target().config.vocab_size, K), exact_law(sampling))


def test_exact_law_is_a_distribution():
    for s in SAMPLINGS.values():
        law = exact_law(s)
        assert abs(law.sum() - 1.0) < 1e-5
        # top-k and top-p remove continuations; the test must see those zeros
        assert (law == 0).any() and (law > 0).sum() > 100


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("case", list(SAMPLED_CASES))
def test_sampled_lossless(case, sampling):
    strategy, uses_draft = SAMPLED_CASES[case]
    s = SAMPLINGS[sampling]
    result, state = sample_run(strategy, uses_draft, s)
    res = law_test(result.tokens, s)
    assert res["impossible"] == 0, f"{case}/{sampling}: tokens outside the processed support: {res}"
    assert res["p"] > ALPHA, f"{case}/{sampling}: output law differs from the target's: {res}"
    if case != "ar":  # the verification paths were exercised: some rounds accept, some reject
        hist = np.asarray(state.accept_hist)
        assert hist[0] > 0 and hist[1:].sum() > 0, hist
    if "sampled-siblings" in case:  # later siblings were accepted at both depths
        ranks = np.asarray(state.rank_hist)
        assert ranks[0, 1:].sum() > 0 and ranks[1, 1:].sum() > 0, ranks


def test_lenience_one_is_the_default():
    s = SAMPLINGS["t0.8-topk4"]
    default, _ = sample_run(Speculative(DraftModel(), gamma=2), True, s)
    explicit, _ = sample_run(Speculative(DraftModel(), gamma=2, lenience=1.0), True, s)
    assert explicit.tokens == default.tokens
    other_seed, _ = sample_run(Speculative(DraftModel(), gamma=2), True, s, seed=SAMPLE_SEED + 1)
    assert other_seed.tokens != default.tokens  # the comparison above is not vacuous


def test_lenience_is_lossy_and_accepts_more():
    """Negative control of the sampled test (it must detect a lossy rule), and DistillSpec's
    trade: lenience < 1 raises the accepted tokens per round and tau."""
    s = SAMPLINGS["t0.8-topk4"]
    exact, _ = sample_run(Speculative(DraftModel(), gamma=2), True, s)
    lossy, _ = sample_run(Speculative(DraftModel(), gamma=2, lenience=0.3), True, s)
    res = law_test(lossy.tokens, s)
    assert res["p"] < ALPHA, f"the test failed to detect the lossy lenience=0.3 rule: {res}"
    assert lossy.stats.extra["accepted_per_round"] > exact.stats.extra["accepted_per_round"] + 0.1
    assert lossy.stats.tau > exact.stats.tau
