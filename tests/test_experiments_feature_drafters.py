"""experiments/feature_drafters.py on CPU with the random toy target (--toy): training, the head
file, tuning on the held-out split, a resumed run that only does what is missing, bad
arguments; and the head files as Spec-Bench methods (`eagle:file=`, `medusa:file=`), whose
greedy outputs must equal the baseline's."""

from __future__ import annotations

import json

import pytest

from distill import data as D
from experiments import feature_drafters as fd
from experiments import methods, specbench

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["write a poem about rain", "make it shorter"]},
    {"question_id": 2, "category": "qa", "turns": ["who wrote the odyssey?"]},
    {"question_id": 3, "category": "math_reasoning", "turns": ["what is 12 times 7?"]},
]


def _needs_data():
    if not (D.data_root() / D.SOURCES["gsm8k"]).is_file():
        pytest.skip(f"the shared data folder {D.data_root()} is absent (set DISTILL_DATA)")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_medusa_row_end_to_end_resume_and_the_head_as_a_specbench_method(tmp_path):
    _needs_data()
    out = tmp_path / "run"
    argv = ["--toy", "--out", str(out), "--rows", "medusa:heads=2", "--gammas", "2", "--trees", "2x2x4",
            "--no-progress"]
    assert fd.main(argv) == 0
    rows = _rows(out / "results.jsonl")
    assert {(r["row"], r["kind"]) for r in rows} == {("medusa:heads=2", "train"), ("medusa:heads=2", "tuning")}
    train = next(r for r in rows if r["kind"] == "train")
    assert train["steps"] == 4 and train["tokens_seen"] == 4 * 2 * 512 and train["head_file_bytes"] > 0
    tuning = next(r for r in rows if r["kind"] == "tuning")
    assert tuning["gamma"] == "2" and tuning["tree"] == "2x2x4"
    assert all(v["speedup"] > 0 and v["tau"] >= 1.0 for v in [*tuning["chains"].values(), *tuning["trees"].values()])
    for name in ("summary.md", "summary.json", "summary.png", "medusa_heads2/head.safetensors",
                 "medusa_heads2/metrics.jsonl"):
        assert (out / name).is_file(), name
    before = (out / "results.jsonl").read_text()
    assert fd.main(argv) == 0  # a rerun finds every record: nothing is appended
    assert (out / "results.jsonl").read_text() == before

    # The head file through the Spec-Bench harness: lossless greedy, so every output equals ar's.
    head = out / "medusa_heads2" / "head.safetensors"
    wanted = fd.specbench_methods(fd.Row.parse("medusa:heads=2"), head, {"gamma": "2", "tree": "2x2x4"})
    assert wanted == ["ar", f"medusa:heads={head}:gamma=2:depth=0", f"medusa:heads={head}:depth=2:top_k=2:nodes=4"]
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    sb_out = tmp_path / "sb"
    assert specbench.main(["--target", "toy", "--draft", "none", "--questions", str(qfile), "--out", str(sb_out),
                           "--no-progress", "--profile", "none", "--max-new-tokens", "8",
                           "--methods", ",".join(wanted)]) == 0
    summary = json.loads((sb_out / "summary.json").read_text())["summary"]
    assert set(summary["methods"]) == {methods.parse(m).label for m in wanted}
    for label, check in summary["greedy_check"].items():
        assert check["mismatches"] == 0, (label, check)


def test_head_methods_refuse_a_missing_file():
    with pytest.raises(methods.MethodUnavailable, match="needs head=PATH"):
        methods.parse("eagle").build(None)


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert fd.main(["--toy", "--out", str(tmp_path), "--rows", "eagle:heads=2"]) == 2
    assert "unknown option 'heads'" in capsys.readouterr().err
    assert fd.main(["--toy", "--out", str(tmp_path), "--trees", "6x8"]) == 2
    assert "depth x top_k x nodes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown row"):
        fd.Row.parse("hydra")


@pytest.mark.slow
def test_eagle_row_end_to_end(tmp_path):
    """About a minute on two CPU cores: run with -m slow."""
    _needs_data()
    out = tmp_path / "run"
    assert fd.main(["--toy", "--out", str(out), "--rows", "eagle:ttt=2", "--gammas", "2", "--trees", "2x2x4",
                    "--no-progress"]) == 0
    kinds = {(r["row"], r["kind"]) for r in _rows(out / "results.jsonl")}
    assert kinds == {("eagle:ttt=2", "train"), ("eagle:ttt=2", "tuning")}
    assert (out / "eagle_ttt2" / "head.safetensors").is_file()
