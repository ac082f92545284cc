"""Leaderboard math on hand-made rows: speedups, tau, per-category and per-task aggregation."""

import math

import pytest

from decoding import ModelConfig
from decoding import roofline
from experiments.summary import add_phases, add_predictions, greedy_check, plot, render_markdown, summarize


def row(method, qid, category, time_s, new_tokens, forwards, turn=1, tokens=None, prompt_tokens=10):
    return {"method": method, "question_id": qid, "turn": turn, "category": category, "time_s": time_s,
            "new_tokens": new_tokens, "target_forwards": forwards, "prompt_tokens": prompt_tokens,
            "output_tokens": tokens if tokens is not None else list(range(new_tokens))}


ROWS = [
    # baseline: 1 token per call
    row("ar", 1, "writing", 4.0, 40, 40),
    row("ar", 1, "writing", 2.0, 20, 20, turn=2),
    row("ar", 2, "coding", 6.0, 60, 60),
    row("ar", 3, "qa", 1.0, 10, 10),
    # method: same outputs (greedy) except question 3, which stops early with other tokens
    row("spec", 1, "writing", 1.0, 40, 10),
    row("spec", 1, "writing", 1.0, 20, 10, turn=2),
    row("spec", 2, "coding", 2.0, 60, 20),
    row("spec", 3, "qa", 0.25, 5, 5, tokens=[9, 9, 9, 9, 9]),
    row("spec", 4, "qa", 9.0, 99, 99),  # no baseline row: kept out of the speedups
]


def test_speedups_are_ratios_of_sums_over_shared_pairs():
    s = summarize(ROWS, baseline="ar")
    spec = s["methods"]["spec"]
    # writing: (4 + 2) / (1 + 1) = 3; coding: 6 / 2 = 3; qa: 1 / 0.25 = 4 (question 4 has no baseline)
    assert spec["categories"]["writing"]["speedup"] == pytest.approx(3.0)
    assert spec["categories"]["coding"]["speedup"] == pytest.approx(3.0)
    assert spec["categories"]["qa"]["speedup"] == pytest.approx(4.0)
    assert spec["categories"]["qa"]["pairs"] == 1
    # the MT-bench task pools writing and coding: (4 + 2 + 6) / (1 + 1 + 2) = 3
    assert spec["tasks"]["mt_bench"]["speedup"] == pytest.approx(3.0)
    # overall is a ratio of sums over all shared pairs, not a mean of the category ratios
    assert spec["overall"]["speedup"] == pytest.approx(13.0 / 4.25)
    assert spec["overall"]["speedup"] != pytest.approx((3 + 3 + 4) / 3)
    # tokens/s ratio: spec 125 tokens in 4.25 s vs ar 130 tokens in 13 s
    assert spec["overall"]["speedup_tps"] == pytest.approx((125 / 4.25) / (130 / 13.0))
    assert spec["categories"]["qa"]["speedup_tps"] == pytest.approx((5 / 0.25) / (10 / 1.0))
    # tau = tokens / target calls over all the method's rows (question 4 included)
    assert spec["overall"]["tau"] == pytest.approx((40 + 20 + 60 + 5 + 99) / (10 + 10 + 20 + 5 + 99))
    assert spec["categories"]["writing"]["tau"] == pytest.approx(60 / 20)
    assert spec["overall"]["tokens_per_s"] == pytest.approx(224 / 13.25)
    ar = s["methods"]["ar"]
    assert ar["overall"]["speedup"] == pytest.approx(1.0) and ar["overall"]["tau"] == pytest.approx(1.0)
    assert list(s["methods"]) == ["ar", "spec"]
    assert s["tasks"] == ["mt_bench", "qa"] and s["categories"] == ["writing", "coding", "qa"]


def test_without_a_baseline_speedups_are_absent():
    s = summarize([r for r in ROWS if r["method"] == "spec"], baseline="ar")
    assert s["baseline"] is None
    assert "speedup" not in s["methods"]["spec"]["overall"]
    assert "n/a" in render_markdown(s)


def test_greedy_check_lists_mismatches():
    check = greedy_check(ROWS, "ar")
    assert check["spec"] == {"compared": 4, "mismatches": 1, "mismatched": ["3/turn1"]}
    s = summarize(ROWS, baseline="ar", greedy=True)
    md = render_markdown(s)
    assert "3 of 4 outputs equal the baseline's; 1 differ: 3/turn1" in md
    assert "greedy_check" not in summarize(ROWS, baseline="ar", greedy=False)


def test_markdown_has_the_leaderboard_shape():
    md = render_markdown(summarize(ROWS, baseline="ar"), {"config": {"target": "t"}, "errors": [
        {"method": "hf_static", "error": "RuntimeError: compile failed"}]})
    lines = md.splitlines()
    head = next(line for line in lines if line.startswith("| Method | MT-bench"))
    assert head == "| Method | MT-bench | QA | Overall | tau | tokens/s |"
    spec_line = next(line for line in lines if line.startswith("| spec | 3.00x | 4.00x |"))
    assert f"{13 / 4.25:.2f}x" in spec_line
    assert "- hf_static: RuntimeError: compile failed" in md


def test_predictions_sit_next_to_measurements():
    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=4)
    dev = roofline.DeviceProfile("test", 1000.0, 10000.0)
    s = summarize(ROWS, baseline="ar")
    add_predictions(s, ROWS, method_costs={"ar": {"kind": "ar"}, "spec": {"kind": "chain", "gamma": 4, "draft": 0.5}},
                    target_config=cfg, draft_config=None, device=dev)
    assert s["methods"]["ar"]["predicted"]["speedup"] == pytest.approx(1.0)
    context = 10 + (40 + 20 + 60 + 10 + 40 + 20 + 60 + 5 + 99) / 9 / 2
    expect = roofline.chain_prediction(cfg, dev, gamma=4, expected_tokens=s["methods"]["spec"]["overall"]["tau"],
                                       draft=0.5, context=context)
    assert s["methods"]["spec"]["predicted"]["speedup"] == pytest.approx(expect.speedup)
    assert "speedup (roofline)" in render_markdown(s)


def test_plots_are_written(tmp_path):
    s = summarize(ROWS, baseline="ar")
    files = plot(s, ROWS, tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["speedup.png", "tau.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("speedup.png", "tau.png"))
    assert not math.isnan(s["methods"]["spec"]["overall"]["speedup"])


def test_acceptance_per_position_sums_round_counts():
    rows = [dict(row("spec", 1, "qa", 1.0, 5, 3), extra={"accept_histogram": [2, 1, 1], "draft_forwards": 6}),
            dict(row("spec", 2, "qa", 1.0, 5, 3), extra={"accept_histogram": [0, 1, 0], "draft_forwards": 2})]
    acc = summarize(rows)["methods"]["spec"]["acceptance"]
    # rounds accepting exactly 0, 1, 2 drafts: 2, 2, 1; at least 1: 3 of 5; at least 2: 1 of 3
    assert acc["accept_histogram"] == [2, 2, 1]
    assert acc["acceptance_per_position"] == pytest.approx([3 / 5, 1 / 3])
    assert acc["draft_forwards"] == 8
    assert "| spec | 0.60 | 0.33 | 8 |" in render_markdown(summarize(rows))


def test_phase_times_give_the_draft_target_cost_ratio():
    # ar: 130 tokens in 13 s -> 10 tokens/s -> 100 ms per step at batch 1
    s = summarize(ROWS, baseline="ar")
    tau = s["methods"]["spec"]["overall"]["tau"]
    events = [{"event": "phases", "method": "spec", "propose_ms": 999.0, "verify_ms": 1.0, "round_ms": 1.0},
              {"event": "phases", "method": "spec", "propose_ms": 200.0, "verify_ms": 90.0,
               "accept_commit_ms": 5.0, "round_ms": 250.0},  # the last event counts
              {"event": "phases", "method": "gone", "propose_ms": 1.0}]
    add_phases(s, events, {"spec": {"kind": "chain", "gamma": 4, "draft": "model"}}, batch=1)
    ph = s["methods"]["spec"]["phases"]
    assert ph["step_ms"] == pytest.approx(100.0)
    assert ph["verify_steps"] == pytest.approx(0.9)
    assert ph["draft_step_ratio"] == pytest.approx(200.0 / 4 / 100.0)
    assert ph["implied_speedup"] == pytest.approx(tau * 100.0 / 250.0)
    assert "phases" not in s["methods"]["ar"]
    md = render_markdown(s)
    assert "## Phase times and the draft/target cost ratio" in md and "| spec | 200.00 | 90.00 | 5.00 | 250.00 | 0.90 | 0.50 |" in md
    # batch 4: a step serves 4 rows, so it takes 4x the per-token time; a free drafter has no c
    s4 = summarize(ROWS, baseline="ar")
    add_phases(s4, events[1:2], {"spec": {"kind": "chain", "gamma": 4, "draft": "free"}}, batch=4)
    assert s4["methods"]["spec"]["phases"]["step_ms"] == pytest.approx(400.0)
    assert "draft_step_ratio" not in s4["methods"]["spec"]["phases"]


def test_a_method_with_fewer_pairs_is_named_in_the_header():
    """A run cut off part-way: the report says which method covers fewer pairs, so its figures
    are not read as the whole selection's."""
    meta = {"config": {"target": "t"}}
    assert "incomplete" not in render_markdown(summarize(ROWS[:4] + ROWS[4:8], baseline="ar"), meta)
    md = render_markdown(summarize(ROWS[:3] + ROWS[4:9], baseline="ar"), meta)
    line = next(x for x in md.splitlines() if x.startswith("- incomplete:"))
    assert "ar has 3 of 5" in line and "spec" not in line


def test_a_resumed_run_lists_the_command_of_each_session():
    s = summarize(ROWS, baseline="ar")
    md = render_markdown(s, {"config": {}, "commands": ["bench --methods ar,spec", "bench --methods tree"]})
    lines = md.splitlines()
    i = lines.index("- commands, one per session that wrote rows:")
    assert lines[i + 1:i + 3] == ["  - `bench --methods ar,spec`", "  - `bench --methods tree`"]
    md = render_markdown(s, {"config": {}, "commands": ["bench --methods ar"]})
    assert "- command: `bench --methods ar`" in md
