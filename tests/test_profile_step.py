"""experiments/profile_step.py: trace parsing and per-step figures on hand-made events."""

import pytest

from experiments.profile_step import _busy_us, _device_events, kind_of, summarize


def ev(name, ts, dur, pid=1, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_busy_time_merges_overlaps_and_counts_gaps_as_idle():
    events = [ev("gemv_a", 0, 10), ev("fusion.1", 5, 10), ev("fusion.2", 30, 5), ev("gemv_a", 100, 20)]
    assert _busy_us(events) == pytest.approx(15 + 5 + 20)
    s = summarize(events, steps=2, wall_s=200e-6)
    assert s["kernels_per_step"] == 2
    assert s["device_busy_ms_per_step"] == pytest.approx(40e-3 / 2)
    assert s["device_idle_fraction"] == pytest.approx(1 - 40 / 200)
    assert s["wall_ms_per_step"] == pytest.approx(0.1)
    assert s["top"][0]["name"] == "gemv_a" and s["top"][0]["per_step"] == 1
    assert s["kinds"]["gemm/gemv"]["ms_per_step"] == pytest.approx(30e-3 / 2)


def test_kinds():
    assert kind_of("sm90_xmma_gemm_bf16") == "gemm/gemv"
    assert kind_of("loop_multiply_fusion") == "fusion (elementwise)"
    assert kind_of("dynamic-update-slice.3") == "scatter/dynamic-update"
    assert kind_of("memcpy32_post") == "copy/transpose"
    assert kind_of("weird") == "other"


def test_only_device_stream_events_are_kept_on_accelerators():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "XLA Ops"}}]
    events = meta + [ev("k1", 0, 1, pid=1, tid=1), ev("k1-op", 0, 1, pid=1, tid=2), ev("host", 0, 1, pid=2)]
    kept = _device_events({"traceEvents": events}, "gpu")
    assert [e["name"] for e in kept] == ["k1"]


def test_report_names_keep_the_model_name_whole():
    """Both Qwen sizes once shared the stem "qwen2" (Path.stem cut at the first dot), so the second
    report overwrote the first."""
    from experiments.profile_step import output_stem

    names = {output_stem(m, 1) for m in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")}
    assert names == {"qwen2.5-coder-1.5b-instruct_b1", "qwen2.5-coder-0.5b-instruct_b1"}
    assert output_stem("/models/SmolLM2-135M/", 8) == "SmolLM2-135M_b8"
