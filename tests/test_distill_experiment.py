"""experiments/distillspec.py end to end on CPU with tiny random models (--toy): results,
summary files, a resumed run that only does what is missing, and bad arguments."""

from __future__ import annotations

import json

import pytest

from distill import data as D
from experiments import distillspec


@pytest.mark.slow
def test_toy_run_end_to_end_and_resume(tmp_path, capsys):
    """About a minute on two CPU cores: run with -m slow."""
    if not (D.data_root() / D.SOURCES["gsm8k"]).is_file():
        pytest.skip(f"the shared data folder {D.data_root()} is absent (set DISTILL_DATA)")
    out = tmp_path / "run"
    argv = ["--toy", "--out", str(out), "--rows", "untrained,tvd:onpolicy=0.5", "--gammas", "2", "--no-progress"]
    assert distillspec.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {(r["row"], r["kind"]) for r in rows}
    assert kinds == {(r, k) for r in ("untrained", "tvd:onpolicy=0.5") for k in ("train", "heldout")}
    trained = next(r for r in rows if r["row"] == "tvd:onpolicy=0.5" and r["kind"] == "train")
    assert trained["steps"] == 6 and trained["tokens_seen"] > 0 and trained["train_tokens_per_s"] > 0
    for name in ("summary.md", "summary.json", "summary.png"):
        assert (out / name).is_file()
    assert (out / "tvd_onpolicy0.5" / "drafter" / "model.safetensors").is_file()
    assert (out / "tvd_onpolicy0.5" / "plot.png").is_file()
    assert "tvd:onpolicy=0.5" in (out / "summary.md").read_text()
    # a rerun skips every present row: nothing is appended
    before = (out / "results.jsonl").read_text()
    assert distillspec.main(argv) == 0
    assert (out / "results.jsonl").read_text() == before


def test_bad_rows_are_refused(tmp_path, capsys):
    assert distillspec.main(["--toy", "--out", str(tmp_path), "--rows", "kl"]) == 2
    assert "unknown row 'kl'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown option"):
        distillspec.Row.parse("fkl:beta=2")
