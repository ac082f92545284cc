"""Autotuning against synthetic measure functions, where the best setting is known analytically."""

import pytest

from decoding import ModelConfig
from experiments import autotune, roofline

CFG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=4)
DEV = roofline.DeviceProfile("test", memory_bandwidth=1000.0, peak_flops=10000.0)
ALPHA, DRAFT_S = 0.8, 0.5


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
        self.calls, self.report = [], report

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
                                node_budgets=[2, 3], context=0)
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
        autotune.tune_tree(lambda s: {"tau": 2.0, "acceptance_per_position": [0.8, 0.5]}, target=CFG, device=DEV)


def test_calibration_statistics_add_up_over_prompts():
    from experiments.methods import Generation

    gens = [Generation(tokens=[[1] * 6], texts=[""], run_s=1.0, target_forwards=3,
                       extra={"accept_histogram": [1, 0, 1], "rounds": 2}),
            Generation(tokens=[[1] * 4], texts=[""], run_s=1.0, target_forwards=3,
                       extra={"accept_histogram": [1, 1], "rounds": 2})]
    stats = autotune._aggregate(gens)
    assert stats["accept_histogram"] == [2, 1, 1] and stats["rounds"] == 4
    assert stats["tau"] == pytest.approx(10 / 6) and stats["tokens_per_s"] == pytest.approx(5.0)
    assert autotune.chain_reach(stats, 2) == pytest.approx([0.5, 0.25])


def test_the_command_line_on_the_toy_pair(tmp_path):
    """End to end through the benchmark's methods: calibration, candidates, measured top two,
    the baseline, and the files a report is made from (one program per setting: prompts padded
    to the bucket)."""
    import json

    from decoding import generation
    from experiments import questions

    if not questions.DEFAULT_QUESTIONS.is_file():
        pytest.skip(f"{questions.DEFAULT_QUESTIONS} is absent (the shared data folder is not mounted)")
    before = generation.compile_count()
    code = autotune.main(["--method", "spec", "--target", "toy", "--draft", "toy-draft", "--gammas", "1-3",
                          "--max-new-tokens", "6", "--prompt-bucket", "256", "--profile", "h100-sxm",
                          "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "autotune.json").read_text())
    assert record["config"]["prompt_bucket"] == 256
    result = record["result"]
    assert result["calibration_settings"] == {"gamma": 3}
    measured = [c for c in result["candidates"] if c["measured_tokens_per_s"] is not None]
    assert len(measured) == 2 and result["choice"]["settings"] in [c["settings"] for c in measured]
    # calibration (gamma 3) + the two measured settings (gamma 3 at most once) + the baseline:
    # one program each, whatever the four prompts' lengths
    programs = 1 + len({json.dumps(c["settings"]) for c in measured} - {json.dumps({"gamma": 3})}) + 1
    assert generation.compile_count() - before == programs
    assert "| settings |" in (tmp_path / "autotune.md").read_text()
