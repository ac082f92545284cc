"""decoding.autotune against synthetic measure functions, where the best setting is known analytically."""

import pytest

from decoding import ModelConfig
from decoding import autotune, roofline

CFG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=4)
DEV = roofline.DeviceProfile("test", memory_bandwidth=1000.0, peak_flops=10000.0)
ALPHA, DRAFT_S = 0.8, 0.5
PROMPTS = [[1, 2, 3], [4, 5]]  # what a synthetic measure 'runs on'


def target_s(tokens: int) -> float:
    """This config's forward at context 0, batch 1, by hand: max(bytes / bw, FLOPs / peak)."""
    return max((3984 + 32 * tokens) / 1000, (2 * 1992 * tokens + 4 * 2 * 2 * 4 * tokens * tokens) / 10000)


def analytic_speedup(g: int) -> float:
    e = (1 - ALPHA ** (g + 1)) / (1 - ALPHA)
    return e * target_s(1) / (g * DRAFT_S + target_s(g + 1))


class SyntheticChain:
    """Acceptance i.i.d. with rate ALPHA; 'measured' speed penalises long drafts a little.

    Reports acceptance as decoding.Speculative does: a histogram of rounds accepting exactly d
    tokens, or the conditional rate per position, or only tau."""

    def __init__(self, report="histogram"):
        self.calls, self.report, self.prompts = [], report, PROMPTS

    def __call__(self, settings):
        self.calls.append(dict(settings))
        g = settings["gamma"]
        stats = {"tau": (1 - ALPHA ** (g + 1)) / (1 - ALPHA),
                 "tokens_per_s": 100 * analytic_speedup(g) * (1 - 0.03 * g)}
        if self.report == "histogram":  # 10000 rounds: P(exactly d) = a^d (1 - a), P(all g) = a^g
            stats["accept_histogram"] = [10000 * ALPHA**d * (1 - ALPHA) for d in range(g)] + [10000 * ALPHA**g]
        elif self.report == "conditional":
            stats["acceptance_per_position"] = [ALPHA] * g
        return stats


@pytest.mark.parametrize("report", ["histogram", "conditional", "tau"])
def test_chain_picks_the_analytic_best_gamma(report):
    measure = SyntheticChain(report)
    best = max(range(1, 9), key=analytic_speedup)
    assert 1 < best < 8  # the optimum is inside the grid, not at an edge
    result = autotune.tune_chain(measure, target=CFG, device=DEV, draft=DRAFT_S, gammas=range(1, 9), context=0)
    assert result.choice.settings == {"gamma": best}
    assert result.chosen_by == "predicted speedup"
    assert result.choice.predicted_speedup == pytest.approx(analytic_speedup(best))
    assert measure.calls == [{"gamma": 8}]  # one calibration run at the largest gamma
    for c in result.candidates:
        assert c.predicted_speedup == pytest.approx(analytic_speedup(c.settings["gamma"]))


def test_chain_measures_the_top_candidates_and_keeps_the_fastest():
    measure = SyntheticChain()
    baseline_calls = []

    def baseline():
        baseline_calls.append(1)
        return {"tokens_per_s": 100.0}

    result = autotune.tune_chain(measure, target=CFG, device=DEV, draft=DRAFT_S, gammas=range(1, 9), context=0,
                                 measure_top=3, baseline=baseline)
    top3 = sorted(range(1, 9), key=analytic_speedup, reverse=True)[:3]
    assert [c["gamma"] for c in measure.calls[1:]] == top3
    fastest = max(top3, key=lambda g: analytic_speedup(g) * (1 - 0.03 * g))
    assert result.choice.settings == {"gamma": fastest} and result.chosen_by == "measured tokens/s"
    assert result.choice.measured_speedup == pytest.approx(analytic_speedup(fastest) * (1 - 0.03 * fastest))
    assert baseline_calls == [1]
    assert "measured speedup" in result.to_markdown()


def test_chain_extrapolates_past_the_calibrated_length():
    reach = [0.8, 0.64]
    assert autotune.chain_expected_tokens(reach, 2) == pytest.approx(2.44)
    assert autotune.chain_expected_tokens(reach, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert autotune.chain_reach({"accept_histogram": [2, 1, 1]}, 2) == pytest.approx([0.5, 0.25])
    assert autotune.chain_reach({"acceptance_per_position": [0.5, None]}, 2) == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="probabilities"):
        autotune.chain_reach({"acceptance_per_position": [0.5, 1.7]}, 2)


def test_best_tree_by_hand():
    q = [[0.6, 0.2], [0.5, 0.1]]
    parents, accept = autotune.best_tree(q, depth=2, top_k=2, nodes=3)
    # path probabilities: a=0.6, a->c=0.3, b=0.2 (a->d=0.06 left out)
    assert parents == [-1, 0, -1] and accept == [0.6, 0.5, 0.2]
    assert roofline.tree_expected_tokens(parents, accept) == pytest.approx(2.1)
    assert autotune.best_tree(q, depth=1, top_k=1, nodes=5) == ([-1], [0.6])


def test_tree_tuning_from_depth_rank_statistics():
    # Of 100 rounds, through rank 0 / rank 1 at depth 1: 60 / 20; at depth 2: 40 / 8,
    # i.e. conditional on reaching depth 1 (80 rounds): 0.5 / 0.1.
    stats = {"acceptance_per_depth_rank": [[60, 20], [40, 8]], "rounds": 100, "tau": 2.0, "tokens_per_s": 1.0}
    seen = []

    def measure(settings):
        seen.append(settings)
        return stats

    result = autotune.tune_tree(measure, target=CFG, device=DEV, draft=0.1, depths=[1, 2], top_ks=[1, 2],
                                node_budgets=[2, 3], context=0, prompts=PROMPTS)
    assert seen == [{"depth": 2, "top_k": 2, "nodes": 3}]
    by = {tuple(c.settings.values()): c for c in result.candidates}
    assert by[(2, 1, 2)].expected_tokens == pytest.approx(1 + 0.6 + 0.3)  # a chain of the rank-0 children
    assert by[(2, 2, 3)].expected_tokens == pytest.approx(2.1)
    assert by[(1, 2, 2)].expected_tokens == pytest.approx(1.8)
    best = max(result.candidates, key=lambda c: c.predicted_speedup)
    assert result.choice is best
    expected = 2.1 * target_s(1) / (2 * 0.1 + target_s(4))
    assert by[(2, 2, 3)].predicted_speedup == pytest.approx(expected)


def test_tree_tuning_needs_per_rank_acceptance():
    with pytest.raises(ValueError, match="acceptance_per_depth_rank"):
        autotune.tune_tree(lambda s: {"tau": 2.0, "acceptance_per_position": [0.8, 0.5]}, target=CFG, device=DEV,
                           prompts=PROMPTS)


def test_the_result_records_the_tuning_prompts():
    """Tuning and reporting sets are kept apart: the result says how many prompts it was tuned on
    and hashes their token ids, so a report can show its prompts are others."""
    result = autotune.tune_chain(SyntheticChain(), target=CFG, device=DEV, draft=DRAFT_S, gammas=[1, 2], context=0)
    assert result.prompts == autotune.fingerprint(PROMPTS)
    assert result.prompts["count"] == 2 and len(result.prompts["sha256"]) == 64
    assert autotune.fingerprint([[1, 2, 3], [4, 6]])["sha256"] != result.prompts["sha256"]
    assert result.as_dict()["prompts"]["count"] == 2 and "Tuned on 2 prompts" in result.to_markdown()
    with pytest.raises(ValueError, match="tuning prompts"):
        autotune.tune_chain(lambda s: {"tau": 2.0}, target=CFG, device=DEV, gammas=[1, 2])
    with pytest.raises(ValueError, match="token-id lists"):
        autotune.tune_chain(lambda s: {"tau": 2.0}, target=CFG, device=DEV, gammas=[1, 2], prompts=["hello"])


def test_generate_measure_runs_decoding_generate():
    """GenerateMeasure drives decoding.generate itself (no benchmark harness): a chain tuned on a
    tiny model, drafted by the model itself, accepts every draft token, so the calibration's
    histogram puts every round at the full gamma and tau is close to gamma + 1."""
    import decoding
    import drafting
    from tests.tiny import tiny_model

    model = tiny_model()
    prompts = [[1, 5, 9, 2], [3, 4, 7, 8, 10]]
    measure = autotune.GenerateMeasure(model, prompts, draft=model, max_new_tokens=8, prompt_bucket=16,
                                       strategy=lambda s: decoding.Speculative(drafting.DraftModel(), gamma=s["gamma"]))
    stats = measure({"gamma": 3})
    assert stats["new_tokens"] == 16 and stats["tokens_per_s"] > 0
    hist = stats["accept_histogram"]
    assert len(hist) == 4 and sum(hist[:3]) == 0 and hist[3] > 0  # self-drafting: every round accepts all 3
    assert stats["context"] == pytest.approx(4.5 + 16 / 2 / 2)
    result = autotune.tune_chain(measure, target=model.config, device=DEV, draft=model.config, gammas=[2, 3])
    assert result.prompts == autotune.fingerprint(prompts)
    assert {c.settings["gamma"]: c.expected_tokens for c in result.candidates} == pytest.approx({2: 3.0, 3: 4.0})
