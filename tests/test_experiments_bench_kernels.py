"""experiments.bench_kernels: the attention kernel benchmark script (interpret mode on CPU)."""

import pytest


def test_benchmark_keeps_the_cases_it_measured_when_stopped(tmp_path, monkeypatch):
    """experiments.bench_kernels writes its JSON and Markdown after every case, so a run stopped by
    a time limit still returns what it measured, marked incomplete."""
    import json

    from experiments import bench_kernels

    real_make_case, calls = bench_kernels.make_case, []

    def make_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the limit strikes during the second case
        return real_make_case(*args, **kwargs)

    monkeypatch.setattr(bench_kernels, "make_case", make_case)
    out = tmp_path / "kernels"
    argv = ["--interpret", "--models", "qwen2.5-0.5b", "--batch-sizes", "1", "--tokens", "1",
            "--capacities", "32,48", "--layers", "1", "--reps", "1", "--block-s", "16",
            "--variants", "reference", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["meta"]["complete"] is False
    assert (saved["meta"]["cases_done"], saved["meta"]["cases_total"]) == (1, 2)
    assert [(r["S"], r["variant"]) for r in saved["rows"]] == [(32, "reference")]
    assert "Incomplete: 1 of 2" in out.with_suffix(".md").read_text()

    monkeypatch.setattr(bench_kernels, "make_case", real_make_case)
    bench_kernels.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["meta"]["complete"] is True and len(saved["rows"]) == 2
    assert "Incomplete" not in out.with_suffix(".md").read_text()


def test_benchmark_runs_the_tpu_variants_interpreted(tmp_path):
    """The TPU kernel's variants build, agree with float32 attention and are timed (here in the
    interpreter, on a cache of two 128-slot blocks)."""
    import json

    from experiments import bench_kernels

    out = tmp_path / "kernels_tpu"
    bench_kernels.main(["--interpret", "--models", "qwen2.5-0.5b", "--batch-sizes", "2", "--tokens", "5",
                        "--capacities", "200", "--layers", "1", "--reps", "1", "--tpu-block-s", "128",
                        "--variants", "reference,tpu_mask,tpu_prefix", "--dtype", "float32", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["reference", "tpu_mask", "tpu_prefix"]
    assert all(r["ok"] and "error" not in r and r["us_per_layer"] > 0 for r in rows), rows


@pytest.mark.slow
def test_projection_benchmark_runs_every_step_interpreted(tmp_path):
    """`--kernel projection`: fused steps of a layer (here two of the four: a normed one with a
    bias, a residual one), the jnp path and the kernel, each within float32 rounding of the
    exact result, timed, with its weight bytes; the Markdown names every step."""
    import json

    from experiments import bench_kernels

    out = tmp_path / "projections"
    bench_kernels.main(["--kernel", "projection", "--interpret", "--tiny", "--dtype", "float32", "--reps", "1",
                        "--layers", "1", "--ops", "norm_qkv,down_residual", "--projection-variants", "reference,pallas",
                        "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = saved["rows"]
    assert saved["meta"]["complete"] and saved["meta"]["cases_total"] == 2
    assert [(r["op"], r["variant"]) for r in rows] == [(op, v) for op in ("norm_qkv", "down_residual")
                                                       for v in ("reference", "pallas")]
    assert all(r["ok"] and "error" not in r and r["us_per_layer"] > 0 and r["R"] == 2 for r in rows), rows
    d = bench_kernels.PROJECTION_MODELS["tiny"]["d"]
    assert rows[0]["weight_bytes"] == 4 * (d * 96 + d + 96)  # norm_qkv: weight, norm and bias, float32
    table = out.with_suffix(".md").read_text()
    assert "norm_qkv" in table and "down_residual" in table and "| pallas |" in table
