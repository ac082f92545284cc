"""The EAD experiment script (experiments/ead.py): statistics, settings checks, a toy run.

The end-to-end run uses the random toy pair (`experiments.toy`), two GSM8K questions and four
new tokens: it checks the outputs, their consistency and resuming, not any accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments import ead

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_wilson_interval():
    lo, hi = ead.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ead.wilson(0, 2)
    assert lo == 0.0 and hi == pytest.approx(0.6576, abs=1e-4)
    lo, hi = ead.wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert all(math.isnan(x) for x in ead.wilson(0, 0))


def test_points_and_thresholds():
    assert ead.parse_thresholds("0.5, 1,2") == (0.5, 1.0, 2.0)
    with pytest.raises(ead.SetupError, match="comma-separated"):
        ead.parse_thresholds("a,b")
    cfg = ead.Config(thresholds=(1.0, 0.5, 2.0))
    assert [ead.point_label(t) for t in cfg.points()] == ["small", "t=2", "t=1", "t=0.5", "large"]
    assert [ead.threshold_text(t) for t in (math.inf, -math.inf, 1.5)] == ["+inf", "-inf", "1.5"]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ead.SetupError, match=r"GSM8K is missing: .*--data-dir"):
        ead.load_questions("gsm8k", tmp_path)
    assert ead.main(["--small", "toy-draft", "--large", "toy", "--data-dir", str(tmp_path), "--out",
                     str(tmp_path / "out")]) == 2


def test_summary_pools_rows_token_weighted():
    def row(point, t, correct, ns, nl, batch):
        return dict(point=point, threshold=t, dataset="gsm8k", index=len(rows), correct=correct, small_tokens=ns,
                    large_tokens=nl, catchup_small=1, catchup_large=2, small_calls=ns, large_calls=nl + 1,
                    switches=2, hit_limit=False, batch_id=batch, batch_run_s=2.0, batch_compile_s=1.0, device="x")

    rows = []
    rows.append(row("t=1", "1", True, 30, 10, "a"))
    rows.append(row("t=1", "1", False, 10, 50, "a"))
    rows.append(row("large", "-inf", True, 0, 40, "b"))
    s = ead.summarize(rows, params_small=1, params_large=4)["gsm8k"]
    assert list(s) == ["t=1", "large"]
    p = s["t=1"]
    assert p["n"] == 2 and p["accuracy"] == 0.5 and p["large_fraction"] == 0.6
    assert p["cost"] == pytest.approx((40 * 1 + 60 * 4) / (100 * 4))
    assert p["cost_with_catchup"] == pytest.approx((42 * 1 + 64 * 4) / (100 * 4))
    assert p["cost_calls"] == pytest.approx((40 * 1 + 62 * 4) / (100 * 4))
    assert p["run_s"] == 2.0 and p["tokens_per_s"] == 50.0  # one batch, counted once
    assert p["relative_accuracy"] == 0.5 and s["large"]["relative_accuracy"] == 1.0


def test_toy_run_end_to_end_and_resume(tmp_path):
    if not (DATA / "gsm8k" / "test.jsonl").exists():
        pytest.skip("../shared/data/gsm8k is absent")
    cfg = ead.Config(small="toy-draft", large="toy", datasets=("gsm8k",), thresholds=(4.0,), endpoints=False,
                     limit=3, batch_size=2, max_new_tokens=4, out=str(tmp_path), progress=False)
    summary = ead.run(cfg, log=lambda *_: None)
    p = summary["gsm8k"]["t=4"]
    assert p["n"] == 3 and 0.0 <= p["large_fraction"] <= 1.0 and p["mean_tokens"] <= 4
    for name in ("results.jsonl", "run.json", "summary.json", "summary.md", "gsm8k.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    assert all(r["small_tokens"] + r["large_tokens"] == r["new_tokens"] for r in rows)
    assert "| t=4 | 4 | 3 |" in (tmp_path / "summary.md").read_text()
    # Resuming: nothing is generated again; changed settings are refused.
    before = (tmp_path / "results.jsonl").read_text()
    ead.run(cfg, log=lambda *_: None)
    assert (tmp_path / "results.jsonl").read_text() == before
    cfg.window = 3
    with pytest.raises(ead.SetupError, match="window: stored 5, now 3"):
        ead.run(cfg, log=lambda *_: None)


def test_report_gives_wall_clock_weights_and_the_code_of_each_session(tmp_path):
    """summarize-only: the report names each session's commit (a dirty tree says so), the rows
    written before the first recorded session, the GGUF weights, and tok/s and seconds beside
    accuracy, with the speed relative to the large model alone."""
    def row(point, t, ns, nl, batch, time_utc):
        return dict(point=point, threshold=t, dataset="gsm8k", index=0 if point == "large" else 1, correct=True,
                    small_tokens=ns, large_tokens=nl, catchup_small=0, catchup_large=0, small_calls=ns,
                    large_calls=nl, switches=0, hit_limit=False, batch_id=batch, batch_run_s=2.0,
                    batch_compile_s=1.0, device="x", batch_size=2, time_utc=time_utc)

    rows = [row("t=1", "1", 30, 10, "a", "2026-01-01T00:00:00+00:00"),
            row("large", "-inf", 0, 160, "b", "2026-01-02T00:00:00+00:00")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"small": "qwen2.5-coder-0.5b-instruct", "large": "qwen2.5-coder-1.5b-instruct", "dtype": "bfloat16",
            "window": 5, "min_dwell": 5, "catchup_width": 16, "max_new_tokens": 8, "sampling_text": "greedy decoding",
            "params_small": 1, "params_large": 4, "device_kind": "x",
            "environment": {"git": {"commit": "c" * 40, "dirty": True}, "time_utc": "2026-01-01T12:00:00+00:00"}}
    (tmp_path / "run.json").write_text(json.dumps(meta))
    assert ead.main(["--summarize-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert ("Code: commit not recorded (written before the first session run.json records): 1 rows; "
            "commit ccccccc with uncommitted changes: 1 rows.") in md
    assert md.count("Q4_K_M GGUF") == 2 and "dequantized to bfloat16" in md
    head = next(x for x in md.splitlines() if x.startswith("| point |"))
    assert head.endswith("| tok/s | vs large tok/s | generation s |")
    # t=1: 40 tokens in 2 s = 20 tok/s against the large model's 160 / 2 = 80 tok/s
    assert next(x for x in md.splitlines() if x.startswith("| t=1 |")).endswith("| 20.0 | 0.25 | 2.0 |")
    assert ead.main(["--summarize-only", "--out", str(tmp_path / "none")]) == 2
