"""experiments/trainer_runs.py: the driver the drafter-training experiments share — exit codes and
messages, --toy settings, the resumable stages of results.jsonl, the training record and its
done-file, Spec-Bench's command line, acceptance per position. No model is loaded."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import numpy as np
import pytest

from experiments import trainer_runs as tr


def _parser() -> argparse.ArgumentParser:
    p = tr.new_parser("python -m experiments.fake", "A fake experiment.\n\nMore.", Path("/results"), "tiny")
    p.add_argument("--rows", default="a,b")
    p.add_argument("--sources", default="sharegpt,gsm8k")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    tr.add_specbench_arguments(p)
    return p


class _Row(types.SimpleNamespace):
    @classmethod
    def parse(cls, text):
        if text not in ("a", "b", "c"):
            raise ValueError(f"unknown row {text!r}")
        return cls(label=text)


def _main(argv, run, tmp_path, check=lambda args: None, summarize=lambda out, records, args: None):
    return tr.main(argv, parser=_parser, toy={"steps": 3, "specbench_batch": ""},
                   parse_row=_Row.parse, results_root=tmp_path / "results", run=run, summarize=summarize,
                   check=check)


def test_main_parses_lists_applies_toy_settings_and_runs_in_the_out_folder(tmp_path, capsys):
    seen = {}

    def run(args, rows, batches, out, results):
        seen.update(args=args, rows=[r.label for r in rows], batches=batches, out=out, path=results.path)
        results.append({"row": "c", "kind": "train"})

    def summarize(out, records, args):
        seen["summarized"] = (out, records, args)

    argv = ["--toy", "--seed", "3", "--rows", "c,,a", "--sources", "gsm8k,"]
    assert _main(argv, run, tmp_path, summarize=summarize) == 0
    assert seen["summarized"] == (seen["out"], [{"row": "c", "kind": "train"}], seen["args"])
    args = seen["args"]
    assert seen["rows"] == ["c", "a"] and args.sources == ["gsm8k"] and seen["batches"] == []
    assert args.steps == 3 and args.seed == 3  # toy settings only where the flag was left at its default
    assert args.command == "python -m experiments.fake --toy --seed 3 --rows c,,a --sources gsm8k,"
    assert seen["out"] == tmp_path / "results" / "toy" and seen["out"].is_dir()
    assert seen["path"] == seen["out"] / "results.jsonl"
    assert capsys.readouterr().out.strip() == str(seen["out"] / "summary.md")
    # a flag given with --toy keeps its value; without --toy nothing changes
    assert _main(["--toy", "--steps", "50", "--out", str(tmp_path / "o")], run, tmp_path) == 0
    assert seen["args"].steps == 50 and seen["out"] == tmp_path / "o"
    assert _main(["--specbench-batch", "2,,4"], run, tmp_path) == 0
    assert seen["args"].steps == 100 and seen["batches"] == [2, 4] and seen["out"] == tmp_path / "results" / "run"
    assert seen["args"].specbench_subset == "all" and seen["args"].specbench_tokens == 256
    assert _parser().description == "A fake experiment." and "(default /results/<run>)" in _parser().format_help()


def test_main_exit_codes_and_messages(tmp_path, capsys):
    def never(*a):
        raise AssertionError("run must not start on bad arguments")

    assert _main(["--rows", "a,zz"], never, tmp_path) == 2
    assert capsys.readouterr().err.strip() == "error: unknown row 'zz'"
    assert _main(["--toy", "--specbench-batch", "1"], never, tmp_path) == 2
    assert "Spec-Bench needs the real target" in capsys.readouterr().err

    def check(args):
        raise ValueError("bad --gammas")

    assert _main([], never, tmp_path, check=check) == 2
    assert capsys.readouterr().err.strip() == "error: bad --gammas"

    def stopped(args, rows, batches, out, results):
        raise tr.Stopped("a", 7)

    def summarize(out, records, args):
        raise AssertionError("no summary after a stopped or interrupted run")

    assert _main(["--out", str(tmp_path / "s")], stopped, tmp_path, summarize=summarize) == 130
    got = capsys.readouterr()
    assert got.err.strip() == "a: stopped at step 7; rerun to continue." and got.out == ""

    def interrupted(args, rows, batches, out, results):
        raise KeyboardInterrupt

    assert _main(["--out", str(tmp_path / "i")], interrupted, tmp_path, summarize=summarize) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to continue."

    def failing(args, rows, batches, out, results):
        raise ValueError("a failure inside the run is not a bad argument")

    with pytest.raises(ValueError, match="not a bad argument"):
        _main(["--out", str(tmp_path / "f")], failing, tmp_path)


def test_results_stages_are_skipped_once_recorded(tmp_path, capsys):
    results = tr.Results(tmp_path)
    calls = []

    def compute(**fields):
        calls.append(fields)
        return fields

    rows = [_Row(label="a"), _Row(label="b")]
    for row, have in results.each(rows):
        results.stage(have, row.label, "tuning", lambda: compute(gamma=3))
        results.stage(have, row.label, "tuning", lambda: compute(gamma=4))  # `have` is the row's start: written again
    assert [(r["row"], r["kind"], r["gamma"]) for r in results.read()] == [
        ("a", "tuning", 3), ("a", "tuning", 4), ("b", "tuning", 3), ("b", "tuning", 4)]
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()] == ["a", "b"]
    calls.clear()
    for row, have in results.each(rows):
        results.stage(have, row.label, "tuning", lambda: compute(gamma=5))
    assert calls == [] and results.get("b", "tuning")["gamma"] == 3
    assert list(json.loads(line) for line in results.path.read_text().splitlines())[0] == \
        {"row": "a", "kind": "tuning", "gamma": 3}
    with pytest.raises(StopIteration):
        results.get("c", "tuning")


def test_results_train_records_only_finished_training(tmp_path):
    results = tr.Results(tmp_path)
    row_dir = tmp_path / "a"
    row_dir.mkdir()
    with pytest.raises(tr.Stopped, match="a: stopped at step 2"):
        results.train(set(), "a", row_dir, lambda: {"row": "a", "steps": 2})
    assert results.read() == []
    (row_dir / "trained.json").write_text(json.dumps({"row": "a", "steps": 4}))
    results.train(set(), "a", row_dir, lambda: tr.trained(row_dir))
    assert results.read() == [{"row": "a", "steps": 4, "kind": "train"}]
    results.train(results.have(), "a", row_dir, lambda: pytest.fail("a recorded row is not trained again"))


def test_training_record_and_the_done_file(tmp_path):
    cfg = types.SimpleNamespace(steps=10, batch_size=2, accumulate=3, seq_len=5)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [
        {"kind": "train", "step": 1, "loss": 2.0, "tokens_per_s": 10.0},
        {"kind": "eval", "step": 1, "loss": 9.0},
        {"kind": "train", "step": 4, "loss": 1.5, "tokens_per_s": 12.0, "top1_0": 0.5}]))
    summary = {"step": 4, "stopped": None}
    record, last = tr.training_record("a", summary, cfg, 1.25, tmp_path)
    assert record == {"row": "a", "steps": 4, "stopped": None, "tokens_seen": 4 * 2 * 3 * 5,
                      "train_tokens_per_s": 12.0, "train_minutes": 1.25, "final_loss": 1.5}
    assert last["top1_0"] == 0.5
    assert tr.finish_training(tmp_path, record, summary, cfg) is record and tr.trained(tmp_path) is None
    tr.finish_training(tmp_path, record, {"step": 4, "stopped": "time budget"}, cfg)
    assert tr.trained(tmp_path) == record
    empty = tmp_path / "empty"
    empty.mkdir()
    record, last = tr.training_record("b", {"step": 0, "stopped": None}, cfg, 0.0, empty)
    assert record["final_loss"] is None and record["train_tokens_per_s"] is None and last == {}


def test_run_specbench_command_and_failure(tmp_path, monkeypatch, capsys):
    args = types.SimpleNamespace(specbench_subset="mt_bench", specbench_tokens=64)
    run_dir = tmp_path / "sb"
    calls = []

    def fake_call(cmd, cwd):
        calls.append(cmd)
        run_dir.mkdir(exist_ok=True)
        methods = {"ar": {"overall": {"tau": 1.0}}, "spec:gamma=3": {"overall": {"tau": 2.5}}, "x": {}}
        (run_dir / "summary.json").write_text(json.dumps({"summary": {"methods": methods}}))
        return 0

    monkeypatch.setattr(tr.subprocess, "call", fake_call)
    sb = tr.run_specbench(args, run_dir, 8, "Spec-Bench run for a (batch 8)", ["--target", "t", "--methods", "ar"],
                          ["--questions", "q.jsonl"])
    assert calls[0][1:] == ["-m", "experiments.specbench", "--target", "t", "--methods", "ar", "--batch-size", "8",
                            "--subset", "mt_bench", "--max-new-tokens", "64", "--out", str(run_dir), "--no-progress",
                            "--questions", "q.jsonl"]
    assert sb == {"command": " ".join(calls[0]), "methods": {"ar": {"tau": 1.0}, "spec:gamma=3": {"tau": 2.5}, "x": {}}}
    assert capsys.readouterr().err.startswith("$ ")
    monkeypatch.setattr(tr.subprocess, "call", lambda cmd, cwd: 3)
    with pytest.raises(RuntimeError, match=r"^Spec-Bench at batch 1 exited with 3; rerun to resume it\.$"):
        tr.run_specbench(args, run_dir, 1, "Spec-Bench at batch 1", [])


def test_small_helpers():
    # accept histogram: 2 rows accepted 0 tokens, 3 accepted 1, 5 accepted 2 -> depth 1 reached by 8 of 10, 2 by 5 of 8
    assert tr.acceptance_per_position(np.array([2, 3, 5])) == [0.8, 0.625]
    assert tr.acceptance_per_position(np.array([4, 0, 0])) == [0.0, None]
    assert tr.acceptance_per_position(None) == []
    assert tr.split_list("1,,8,") == ["1", "8"] and tr.split_list("") == []
    assert tr.fmt(None) == "-" and tr.fmt(1.23456) == "1.23" and tr.fmt(7) == "7"
    grouped = tr.by_row([{"row": "b", "kind": "train", "n": 1}, {"row": "a", "kind": "train"},
                         {"row": "b", "kind": "tuning"}])
    assert list(grouped) == ["b", "a"] and set(grouped["b"]) == {"train", "tuning"}
