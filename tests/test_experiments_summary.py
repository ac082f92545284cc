"""Leaderboard math on hand-made rows: speedups, tau, per-category and per-task aggregation."""

import json
import math

import pytest

from decoding import ModelConfig
from decoding import roofline
from experiments.summary import (add_held_out, add_phases, add_predictions, code_text, greedy_check, plot,
                                 render_markdown, summarize, weights_text)


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
    md = render_markdown(s)
    # a ratio of two roofline bounds is named a prediction, never a bound
    assert "roofline prediction of speedup" in md
    assert "speedup (roofline)" not in md and "bound on speedup" not in md


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


def test_spec_bench_speedup_is_a_ratio_of_mean_question_speeds():
    """Spec-Bench's formula: per question tokens / time (turns pooled), mean over questions, then the ratio."""
    spec = summarize(ROWS, baseline="ar")["methods"]["spec"]["overall"]
    method = ((40 + 20) / 2.0 + 60 / 2.0 + 5 / 0.25) / 3
    base = ((40 + 20) / 6.0 + 60 / 6.0 + 10 / 1.0) / 3
    assert spec["speedup_specbench"] == pytest.approx(method / base)
    assert spec["speedup_specbench"] != pytest.approx(spec["speedup"])


def test_held_out_figures_drop_every_turn_of_the_tuning_questions():
    s = summarize(ROWS, baseline="ar", greedy=True)
    add_held_out(s, ROWS, tuned_on="reference16", question_ids=[1], baseline="ar", greedy=True)
    held = s["held_out"]["methods"]["spec"]["overall"]
    # question 1 (both turns) is gone: coding 6 / 2 and qa 1 / 0.25 remain
    assert held["pairs"] == 2 and held["speedup"] == pytest.approx(7.0 / 2.25)
    assert s["methods"]["spec"]["overall"]["pairs"] == 4  # the full figures are unchanged
    assert s["tuned_on"]["held_out_questions"] == 3 and s["tuned_on"]["held_out_pairs"] == 3
    assert s["held_out"]["greedy_check"]["spec"] == {"compared": 2, "mismatches": 1, "mismatched": ["3/turn1"]}
    md = render_markdown(s, {"config": {}})
    assert "- tuned on: reference16 (1 questions" in md
    assert "Tuned on: reference16 (1 questions); reported on: this run's questions minus every turn of those: " \
           "3 questions, 3 (question, turn) pairs." in md
    assert f"| {7.0 / 2.25:.2f}x |" in md.split("## Held out")[1].split("## Per category")[0]
    # a run of the tuning prompts alone says it has no held-out figures
    s = summarize(ROWS, baseline="ar")
    add_held_out(s, ROWS, tuned_on="reference16", question_ids=[1, 2, 3, 4])
    assert "held_out" not in s
    assert "reported on: the same prompts (no held-out question in this run)" in render_markdown(s, {"config": {}})


def test_every_table_with_equality_counts_the_greedy_mismatches():
    md = render_markdown(summarize(ROWS, baseline="ar", greedy=True))
    head = next(line for line in md.splitlines() if line.startswith("| Method | MT-bench"))
    assert head.endswith("| greedy = baseline |")
    spec_line = next(line for line in md.splitlines() if line.startswith("| spec | 3.00x"))
    assert spec_line.endswith("| 3 of 4 |")


def test_a_dirty_tree_is_named_in_the_report():
    clean = {"git": {"commit": "a" * 40, "dirty": False}}
    dirty = {"git": {"commit": "b" * 40, "dirty": True}}
    assert code_text([clean]) == "commit aaaaaaa"
    assert code_text([dirty]) == "commit bbbbbbb with uncommitted changes"
    assert code_text([{}]) == "commit not recorded"
    sessions = [{"session": "s1", "environment": dirty}, {"session": "s2", "environment": clean},
                {"session": "s3", "environment": dirty}]
    md = render_markdown(summarize(ROWS, baseline="ar"), {"config": {}, "row_sessions": sessions})
    assert ("- code: commit bbbbbbb with uncommitted changes (sessions s1, s3); commit aaaaaaa (session s2)"
            in md.splitlines())
    md = render_markdown(summarize(ROWS, baseline="ar"), {"config": {}, "row_sessions": sessions[1:2]})
    assert "- code: commit aaaaaaa" in md.splitlines()


def test_the_weights_line_comes_from_the_registry_entry():
    text = weights_text("qwen2.5-coder-1.5b-instruct", "bfloat16")
    assert "Q4_K_M GGUF" in text and "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" in text
    assert text.endswith("dequantized to bfloat16")
    # a registry entry that is not Q4_K_M is not called Q4_K_M
    assert "Q4_1 GGUF" in weights_text("smollm2-135m-instruct", "bfloat16")
    assert "Q4_K_M" not in weights_text("/models/some-hf-dir", "float32")
    assert "random toy model" in weights_text("toy", "float32")
    md = render_markdown(summarize(ROWS, baseline="ar"), {"config": {"target": "qwen2.5-coder-1.5b-instruct",
                                                                      "draft": "qwen2.5-coder-0.5b-instruct",
                                                                      "dtype": "bfloat16"}})
    line = next(x for x in md.splitlines() if x.startswith("- weights:"))
    assert line.count("Q4_K_M GGUF") == 2 and line.count("dequantized to bfloat16") == 2
    assert next(x for x in md.splitlines() if x.startswith("- speedup = ")).startswith(
        "- speedup = sum of the baseline's time / sum of the method's time")


def test_the_results_index_states_code_and_weights_of_every_result(tmp_path):
    """Each committed result gets one line from its own files: a dirty tree is named, a run
    folder's report is marked regenerated, a script's JSON without a summarize-only path is not."""
    from experiments.summary import results_index

    env = {"device": {"device_kind": "GPU A"}, "git": {"commit": "d" * 40, "dirty": True}, "time_utc": "t"}
    run = tmp_path / "specbench" / "run1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"identity": {"target": "qwen2.5-coder-1.5b-instruct",
                                                           "dtype": "bfloat16"}, "sessions": [{"environment": env}]}))
    (run / "summary.json").write_text(json.dumps({"environment": {"device": {}, "git": {}}}))
    (tmp_path / "bench.json").write_text(json.dumps({"environment": dict(env, git={"commit": "e" * 40,
                                                                                   "dirty": False}),
                                                      "models": {"qwen2.5-coder-0.5b-instruct": {}}}))
    lines = [x for x in results_index(tmp_path).splitlines() if x.startswith("- ")]
    assert len(lines) == 2
    bench, spec = lines
    assert bench.startswith("- `bench.json`: GPU A; code: commit eeeeeee; weights: `qwen2.5-coder-0.5b-instruct`")
    assert "a dtype this file does not record" in bench and "not regenerated" in bench
    assert spec.startswith("- `specbench/run1`: GPU A; code: commit ddddddd with uncommitted changes; weights: ")
    assert "Q4_K_M GGUF" in spec and "dequantized to bfloat16" in spec and "; regenerated (" in spec


def test_tuning_question_ids_come_from_the_runs_question_file(tmp_path):
    """The ids of a named subset are read from the question file the run used (checked by its
    sha256); reference16 takes the first 2 questions of 8 categories, and every turn of them is
    excluded from the held-out figures."""
    from experiments import questions as qmod
    from experiments.summary import tuning_question_ids

    rows = []
    qid = 1
    for cat in qmod.CATEGORIES:
        for _ in range(3):
            rows.append({"question_id": qid, "category": cat, "turns": ["a", "b"] if cat == "writing" else ["a"]})
            qid += 1
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = tuning_question_ids("reference16", path, qmod.file_sha256(path))
    by_cat = {r["question_id"]: r["category"] for r in rows}
    assert len(ids) == 16 and {by_cat[i] for i in ids} == set(qmod.REFERENCE16_CATEGORIES)
    assert ids[:2] == [1, 2]  # the first two writing questions, whose second turns are dropped too
    with pytest.raises(qmod.QuestionsError, match="not the question file this run used"):
        tuning_question_ids("reference16", path, "0" * 64)


def test_a_toy_run_tuned_on_reference16_reports_held_out_figures(tmp_path):
    """End to end on the toy model: --tuned-on is kept in run.json, so the report of the run and
    a later --summarize-only both hold the held-out leaderboard."""
    from experiments import questions as qmod
    from experiments import specbench

    rows = [{"question_id": i + 1, "category": cat, "turns": [f"question {i}"]}
            for i, cat in enumerate(c for c in qmod.CATEGORIES for _ in range(3))]
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["--target", "toy", "--draft", "toy-draft", "--methods", "ar,pld", "--questions", str(path),
            "--categories", "writing,qa", "--max-new-tokens", "4", "--no-progress", "--profile", "none",
            "--out", str(out)]
    assert specbench.main(args + ["--tuned-on", "reference16"]) == 0
    for _ in range(2):
        md = (out / "summary.md").read_text()
        assert "Tuned on: reference16 (16 questions); reported on: this run's questions minus every turn of " \
               "those: 2 questions, 2 (question, turn) pairs." in md
        assert "- weights: target `toy`: a random toy model" in md
        assert "| greedy = baseline |" in md and "- code: " in md
        assert specbench.main(["--summarize-only", "--out", str(out)]) == 0
