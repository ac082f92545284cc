"""experiments/profile_step.py: trace parsing and per-step figures on hand-made events."""

import pytest

from experiments.profile_step import busy_us, device_events, kind_of, summarize


def ev(name, ts, dur, pid=1, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_busy_time_merges_overlaps_and_counts_gaps_as_idle():
    events = [ev("gemv_a", 0, 10), ev("fusion.1", 5, 10), ev("fusion.2", 30, 5), ev("gemv_a", 100, 20)]
    assert busy_us(events) == pytest.approx(15 + 5 + 20)
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
    kept = device_events({"traceEvents": events}, "gpu")
    assert [e["name"] for e in kept] == ["k1"]


def test_report_names_keep_the_model_name_whole():
    """Both Qwen sizes once shared the stem "qwen2" (Path.stem cut at the first dot), so the second
    report overwrote the first."""
    from experiments.profile_step import output_stem

    names = {output_stem(m, 1) for m in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")}
    assert names == {"qwen2.5-coder-1.5b-instruct_b1", "qwen2.5-coder-0.5b-instruct_b1"}
    assert output_stem("/models/SmolLM2-135M/", 8) == "SmolLM2-135M_b8"
    assert output_stem("qwen2.5-coder-1.5b-instruct", 1, "split") == "qwen2.5-coder-1.5b-instruct_b1_split"


HLO = """HloModule m

%fused_dus (p0: f32[2,1,2,8,4], p1: f32[2,1,2,1,4], p2: s32[]) -> f32[2,1,2,8,4] {
  %p0 = f32[2,1,2,8,4]{4,3,2,1,0} parameter(0)
  %p1 = f32[2,1,2,1,4]{4,3,2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = f32[2,1,2,8,4]{4,3,2,1,0} dynamic-update-slice(%p0, %p1, %c, %c, %c, %p2, %c)
}

%body (arg: (f32[2,1,2,8,4], s32[])) -> (f32[2,1,2,8,4], s32[]) {
  %arg = (f32[2,1,2,8,4]{4,3,2,1,0}, s32[]) parameter(0)
  %kv = f32[2,1,2,8,4]{4,3,2,1,0} get-tuple-element(%arg), index=0
  %i = s32[] get-tuple-element(%arg), index=1
  %new = f32[2,1,2,1,4]{4,3,2,1,0} broadcast(%i), dimensions={}
  %copy.1 = f32[2,1,2,8,4]{4,3,2,1,0} copy(%kv)
  %w = f32[2,1,2,8,4]{4,3,2,1,0} fusion(%copy.1, %new, %i), kind=kLoop, calls=%fused_dus
  ROOT %t = (f32[2,1,2,8,4]{4,3,2,1,0}, s32[]) tuple(%w, %i)
}

%cond (arg: (f32[2,1,2,8,4], s32[])) -> pred[] {
  %arg = (f32[2,1,2,8,4]{4,3,2,1,0}, s32[]) parameter(0)
  ROOT %p = pred[] constant(false)
}

ENTRY %main (x: f32[2,1,2,8,4]) -> (f32[2,1,2,8,4], s32[]) {
  %x = f32[2,1,2,8,4]{4,3,2,1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (f32[2,1,2,8,4]{4,3,2,1,0}, s32[]) tuple(%x, %z)
  ROOT %loop = (f32[2,1,2,8,4]{4,3,2,1,0}, s32[]) while(%init), condition=%cond, body=%body
}
"""


def test_hlo_counts_reads_the_loop_body_and_names_whole_cache_copies():
    from experiments.profile_step import hlo_counts

    r = hlo_counts(HLO, [(2, 1, 2, 8, 4)])
    assert r["body"] == "body"
    assert r["by_kind"] == {"broadcast": 1, "copy": 1, "fusion:dynamic-update-slice": 1}
    assert r["dynamic_update_slices"] == 1 and r["copies"] == 1 and r["scatters"] == 0
    assert r["cache_writes"] == {"copy": 1, "fusion:dynamic-update-slice": 1}
    assert r["whole_cache_copies"] == 1


@pytest.mark.parametrize("batch", [1, 2])
def test_a_decode_step_writes_each_layer_in_place_with_no_whole_cache_copy(batch):
    """The compiled whole-generation loop of a tiny model (unrolled layers, as on GPUs): every
    instruction of the loop body that produces a whole KV buffer is one in-place
    dynamic-update-slice per layer per row (k and v together); no copy, scatter or element-wise
    rewrite of a buffer. Keys and values in two buffers per layer compiled here to two copies
    of each key buffer per step (XLA:CPU duplicated the write into the attention's operand);
    the stacked [L, B, K, S, Dh] layout before them wrote k and v apart (two writes per layer)."""
    import decoding
    from experiments.profile_step import hlo_report
    from tiny import tiny_model

    model = tiny_model()
    prompt = [[5, 6, 7, 8, 9], [3, 4]][:batch]
    r = hlo_report(model, prompt, new_tokens=4, options=decoding.Options(unroll_layers=True))
    n = model.config.num_layers
    assert r["whole_cache_copies"] == 0, r["cache_writes"]
    writes = sum(c for k, c in r["cache_writes"].items() if k.endswith("dynamic-update-slice"))
    assert writes == n * batch, r["cache_writes"]
