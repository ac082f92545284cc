"""experiments.train_scaling on CPU with tiny random models: data-parallel training throughput
per size, scaling efficiency against one device, and a checkpoint saved on the largest mesh
restored without a mesh with equal parameters; resumable. One device in this process and data
sizes 1 and 2 on 8 simulated CPU devices in a subprocess (both slow); the argument checks and
the batch source by default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import train_scaling

from test_experiments_sharding_check import run_on_8_devices

TINY = ["--tiny", "--seq-len", "16", "--per-device-batch", "2", "--warmup", "1", "--steps", "2"]


def check_report(data: dict, sizes: list[int]) -> None:
    assert sorted(int(n) for n in data["sizes"]) == sizes
    for n in sizes:
        r = data["sizes"][str(n)]
        assert r["data"] == r["devices"] == n and r["global_batch"] == 2 * n and r["tokens_per_step"] == 2 * n * 16
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / n)
        assert r["ms_per_step"] == pytest.approx(1e3 * r["tokens_per_step"] / r["tokens_per_s"])
        assert r["step"] == 1 + 1 + 2 and np.isfinite(r["final_loss"])
    c = data["checkpoint"]
    assert c["saved_on"] == f"{max(sizes)}x1" and c["restored_on"] == "no mesh (1 device)"
    assert c["params_equal"] and c["max_abs_diff"] == 0.0 and c["step"] == c["trained_step"] == 4
    assert len(c["restored_devices"]) == 1 and c["leaves"] > 0


@pytest.mark.slow
def test_one_device_run_reports_and_resumes(tmp_path, capsys):
    """About 30 s on 2 CPU cores (a train step and the trainer's eager setup compile)."""
    out = tmp_path / "scaling"
    args = [*TINY, "--data", "1", "--out", str(out)]
    train_scaling.main(args)
    data = json.loads(out.with_suffix(".json").read_text())
    check_report(data, [1])
    md = out.with_suffix(".md").read_text()
    assert "| 1 | 2 |" in md and "| 1.000 |" in md and "parameters equal" in md and "Device: cpu" in md
    capsys.readouterr()
    train_scaling.main(args)
    printed = capsys.readouterr().out
    assert "data=1: measured before, skipped" in printed and "checked before, skipped" in printed


def test_sizes_are_checked_against_the_devices(tmp_path):
    assert train_scaling.parse_sizes("4,1,2") == [1, 2, 4]
    for bad in ("1,x", "0,1", "2,2"):
        with pytest.raises(SystemExit, match="--data"):
            train_scaling.parse_sizes(bad)
    with pytest.raises(SystemExit, match=r"--data \[2\] need more devices than the 1 jax.device_count"):
        train_scaling.main(["--tiny", "--data", "1,2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()


def test_batches_are_windows_of_the_stream_fixed_by_the_step():
    stream = np.arange(1000, dtype=np.int32)
    batches = train_scaling.batch_source(stream, 1, 3, 8)
    a, b = batches(5, None), batches(5, None)
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["tokens"].shape == (1, 3, 8)
    assert not np.array_equal(a["tokens"], batches(6, None)["tokens"])
    row = a["tokens"][0, 1]
    assert np.array_equal(row, (row[0] + np.arange(8)) % 1000)  # consecutive tokens of the stream
    assert a["loss_mask"].min() == 1 and a["segments"].min() == 1


@pytest.mark.slow
def test_data_parallel_sizes_on_8_devices_and_restore_on_one(tmp_path):
    out = tmp_path / "scaling"
    args = [*TINY, "--data", "1,2", "--out", str(out)]
    run_on_8_devices("experiments.train_scaling", args)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["device_count"] == 8
    check_report(data, [1, 2])
    assert "| 2 | 4 |" in out.with_suffix(".md").read_text()
    proc = run_on_8_devices("experiments.train_scaling", args)
    assert "data=2: measured before, skipped" in proc.stdout and "checked before, skipped" in proc.stdout
