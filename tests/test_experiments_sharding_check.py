"""experiments.sharding_check on CPU with tiny random models: one command measures no mesh vs a
1-device mesh for autoregressive and chain decoding, finds the outputs identical, writes JSON +
Markdown naming device and commit, and a rerun with the same settings skips what it measured."""

from __future__ import annotations

import json

from experiments import sharding_check


def test_smoke_run_writes_a_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "sharding_check"
    args = ["--tiny", "--out", str(out), "--max-new-tokens", "8", "--batch", "2", "--repeats", "1"]
    report = sharding_check.main(args)
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["methods"]) == {"ar", "spec"}
    for method, r in data["methods"].items():
        assert r["identical_outputs"] and r["rows_identical"] == r["rows"] == 4, method
        assert r["no_mesh"]["tokens_per_s"] > 0 and r["mesh_1_device"]["tokens_per_s"] > 0
        assert r["no_mesh"]["tokens"] == r["mesh_1_device"]["tokens"] == 4 * 8
        assert r["environment"]["device"]["platform"] == "cpu"
        assert r["no_mesh"]["compile_s"] > 0 and r["mesh_1_device"]["compile_s"] > 0  # the warm-up compiled
    md = out.with_suffix(".md").read_text()
    assert "| ar |" in md and "| spec |" in md and "Device: cpu" in md and "commit" in md
    assert report["methods"]["ar"]["mesh_over_no_mesh"] > 0
    capsys.readouterr()
    sharding_check.main(args)
    assert "ar: measured before, skipped" in capsys.readouterr().out
