"""experiments.sharding_check on CPU with tiny random models: one command measures each mesh
against no mesh for autoregressive and chain decoding, finds the outputs identical, writes JSON +
Markdown naming device and commit, and a rerun with the same settings skips what it measured.
The default (`--meshes 1x1`) runs in this process on one device; meshes of several devices run
on 8 simulated CPU devices in a subprocess (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decoding import ModelConfig
from experiments import sharding_check

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_a_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "sharding_check"
    args = ["--tiny", "--out", str(out), "--max-new-tokens", "8", "--batch", "2", "--repeats", "1"]
    report = sharding_check.main(args)
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["entries"]) == {"ar b2 1x1", "spec b2 1x1"}  # the default: no mesh vs a 1-device mesh
    for key, r in data["entries"].items():
        assert r["mesh"] == "1x1" and r["devices"] == 1 and r["batch"] == 2
        assert r["identical_outputs"] and r["rows_identical"] == r["rows"] == 4, key
        assert r["no_mesh"]["tokens_per_s"] > 0 and r["on_mesh"]["tokens_per_s"] > 0
        assert r["no_mesh"]["tokens"] == r["on_mesh"]["tokens"] == 4 * 8
        # ms per step: run time over target forwards (2 batches of at least 1 + 7 forwards for ar)
        for side in ("no_mesh", "on_mesh"):
            f = r[side]
            assert f["ms_per_step"] == pytest.approx(1e3 * f["run_s"] / f["steps"])
            assert f["steps"] == (2 * 8 if key.startswith("ar") else f["steps"]) and f["steps"] >= 2 * 2
        assert r["environment"]["device"]["platform"] == "cpu"
        assert r["no_mesh"]["compile_s"] > 0 and r["on_mesh"]["compile_s"] > 0  # the warm-up compiled
    md = out.with_suffix(".md").read_text()
    assert "| ar | 2 | 1x1 |" in md and "| spec | 2 | 1x1 |" in md and "Device: cpu" in md and "commit" in md
    assert report["entries"]["ar b2 1x1"]["mesh_over_no_mesh"] > 0
    capsys.readouterr()
    sharding_check.main(args)
    assert "ar b2 1x1: measured before, skipped" in capsys.readouterr().out


def test_mesh_and_batch_lists_are_checked():
    assert sharding_check.parse_meshes("1x1, 1x2,2x4") == [(1, 1), (1, 2), (2, 4)]
    for bad in ("1by2", "2", "1x0", "1x2,1x2", ""):
        with pytest.raises(SystemExit, match="--meshes"):
            sharding_check.parse_meshes(bad)
    assert sharding_check.parse_batches("1,8") == [1, 8]
    with pytest.raises(SystemExit, match="--batch"):
        sharding_check.parse_batches("1,x")
    with pytest.raises(SystemExit, match=r"2x4 \(8 devices\) need more devices than the 4 jax.device_count"):
        sharding_check.check_device_count([(1, 2), (2, 4)], 4)
    sharding_check.check_device_count([(1, 2), (2, 2)], 4)


def test_a_mesh_larger_than_the_devices_is_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit, match=r"1x2 \(2 devices\) need more devices than the 1 jax.device_count"):
        sharding_check.main(["--tiny", "--meshes", "1x2", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="DATAxMODEL"):
        sharding_check.main(["--tiny", "--meshes", "1*2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()


def test_fitting_rules_replicate_what_the_model_axis_does_not_divide():
    # Qwen2.5-Coder-0.5B: 14 heads, 2 kv heads, D 896, F 4864, V 151936
    draft = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                        num_kv_heads=2, head_dim=64)
    assert sharding_check.fitting_rules(draft, 2)[1] == ()
    rules, dropped = sharding_check.fitting_rules(draft, 4)
    assert dropped == ("heads", "kv_heads")
    assert rules.mesh_axes("heads") is None and rules.mesh_axes("mlp") == "model"
    assert rules.mesh_axes("vocab") == "model" and rules.mesh_axes("batch") == "data"
    # the rules left divide the model: its parameter specs build on an 8-wide model axis
    from jax.sharding import AbstractMesh

    from decoding import sharding
    rules8, dropped8 = sharding_check.fitting_rules(draft, 8)
    assert dropped8 == ("heads", "kv_heads")
    specs = sharding.param_specs(draft, AbstractMesh((1, 8), ("data", "model")), rules8)
    assert specs["layers"]["w_down"][1] == "model" and specs["layers"]["wo"] == sharding.PartitionSpec()
    # Qwen2.5-Coder-1.5B (the target): 12 heads, 2 kv heads, D 1536, F 8960
    target = ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128)
    for model, want in ((2, ()), (4, ("kv_heads",)), (8, ("heads", "kv_heads"))):
        rules, dropped = sharding_check.fitting_rules(target, model)
        assert dropped == want, model
        mesh = AbstractMesh((1, model), ("data", "model"))
        sharding.param_specs(target, mesh, rules)  # divides: no ShardingError
        sharding.cache_spec(target, mesh, rules, batch_size=8, capacity=512)
        if want:  # the default rules do not fit (the kv heads of the cache; fused q/k/v split on D)
            with pytest.raises(sharding.ShardingError, match="kv_heads"):
                sharding.cache_spec(target, mesh, sharding.DEFAULT_RULES, batch_size=8, capacity=512)


def test_collective_share_reads_device_lines_of_a_trace():
    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": f"/device:GPU:{p}"}} for p in (1, 2)]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": 7, "args": {"name": "Stream #7"}} for p in (1, 2)]
    kernels = []
    for p in (1, 2):  # per device: a 30 us GEMM, a 10 us NCCL all-reduce overlapping 5 us of it, a 20 us fusion
        kernels += [{"ph": "X", "pid": p, "tid": 7, "name": "sm90_xmma_gemm", "ts": 0, "dur": 30},
                    {"ph": "X", "pid": p, "tid": 7, "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "ts": 25,
                     "dur": 10},
                    {"ph": "X", "pid": p, "tid": 7, "name": "loop_fusion", "ts": 100, "dur": 20}]
    got = sharding_check.collective_share({"traceEvents": meta + kernels}, "gpu", steps=2)
    assert got["devices_traced"] == 2
    assert got["collective_share"] == pytest.approx(10 / 55)  # busy: 35 (merged) + 20 per device
    assert got["collective_ms_per_step"] == pytest.approx(10 / 1e3 / 2)
    assert got["collective_kernels_per_step"] == pytest.approx(0.5)


def run_on_8_devices(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip(),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_meshes_of_several_devices_match_no_mesh_and_resume(tmp_path):
    """1x2 (tensor parallel, the draft's single kv head replicated) and 2x1 (data parallel) on 8
    simulated devices, batch 1 and 2, with the collectives of the largest mesh profiled."""
    out = tmp_path / "multi"
    args = ["--tiny", "--out", str(out), "--max-new-tokens", "6", "--batch", "1,2", "--repeats", "1",
            "--meshes", "1x2,2x1", "--profile-collectives", str(tmp_path / "prof")]
    run_on_8_devices("experiments.sharding_check", args)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["device_count"] == 8
    assert set(data["entries"]) == {f"{m} b{b} {mesh}" for m in ("ar", "spec") for b in (1, 2)
                                    for mesh in ("1x2", "2x1")}
    for key, r in data["entries"].items():
        if r["batch"] == 1 and r["mesh"] == "2x1":
            assert r["skipped"] == "batch 1 does not divide over data=2", key
            continue
        assert r["identical_outputs"] and r["rows_identical"] == r["rows"] == 4, key
        assert r["devices"] == 2 and r["on_mesh"]["tokens"] == r["no_mesh"]["tokens"] == 4 * 6
        assert r["on_mesh"]["ms_per_step"] > 0 and r["mesh_over_no_mesh"] > 0
        if r["mesh"] == "1x2":  # the largest mesh (by devices, then model size) is profiled
            c = r["collectives"]
            assert 0 < c["collective_share"] <= 1 and c["collective_kernels_per_step"] > 0, c
            assert Path(c["trace"]).is_file()
            if key.startswith("spec"):
                assert r["layout"] == {"target": "default rules", "draft": "default rules, kv_heads replicated"}
        else:
            assert "collectives" not in r
    md = out.with_suffix(".md").read_text()
    assert "| spec | 2 | 1x2 |" in md and "kv_heads replicated" in md and "skipped: batch 1" in md
    proc = run_on_8_devices("experiments.sharding_check", args)
    assert "spec b2 1x2: measured before, skipped" in proc.stdout and "tok/s" not in proc.stdout.split("# Meshes")[0]
