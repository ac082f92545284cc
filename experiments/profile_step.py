"""Where a decode step's time goes: device kernels, their busy time, and the gaps between them.

Runs one model's jitted autoregressive generation (the whole `while_loop`) and, apart, a
single-token forward dispatched back to back, each under `jax.profiler.trace`, then reads the
trace (the `*.trace.json.gz` JAX writes) and reports, per decode step:

  * kernels launched (device events / steps),
  * device busy time (sum of kernel durations, overlaps merged) against wall time; the rest is
    time the device waits between kernels (launch latency, host round trips of the loop),
  * the kernels that take the time, grouped by kind (GEMM / fusion / copy / scatter / ...),
    with the 25 largest by total time.

On a CPU backend the "device" is the host's XLA thunks; the figures then describe XLA:CPU,
not a GPU, and serve only to check the tool.

    python -m experiments.profile_step --model qwen2.5-coder-1.5b-instruct --out experiments/results/profile
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

KINDS = (  # (kind, pattern on the lower-cased kernel name), first match wins
    ("gemm/gemv", r"gemm|gemv|cublas|cutlass|matmul|dot|triton_gemm|sm\d+_xmma|ampere|hopper"),
    ("attention", r"attention|flash|softmax"),
    ("scatter/dynamic-update", r"scatter|dynamic_update|dynamic-update"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("reduce", r"reduce|argmax|topk|sort"),
    ("fusion (elementwise)", r"fusion|loop_|input_|wrapped_"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pat in KINDS:
        if re.search(pat, low):
            return kind
    return "other"


def _device_events(trace: dict, backend: str) -> list[dict]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    if backend == "cpu":
        keep = {pid for pid, n in procs.items() if n.startswith("/host:CPU")}
        skip = re.compile(r"^\$|PjRt|Pjit|Execute|Allocate|Parse|Handle|Python|Create|thunk_executor", re.I)
        return [e for e in events if e.get("ph") == "X" and e.get("pid") in keep and not skip.search(e["name"])]
    keep = {pid for pid, n in procs.items() if n.startswith("/device:")}
    # kernels and memcpys on the device's stream lines (not the per-device "XLA Ops" summary lines)
    lines = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in keep:
            continue
        line = lines.get((e["pid"], e.get("tid")), "")
        if "XLA Ops" in line or "XLA Modules" in line or "Steps" in line:
            continue
        out.append(e)
    return out


def _busy_us(events: list[dict]) -> float:
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events)
    busy, end = 0.0, float("-inf")
    for s, t in spans:
        if s >= end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    return busy


def summarize(events: list[dict], steps: int, wall_s: float) -> dict:
    """Per-step figures from the device events of `steps` decode steps that took `wall_s`."""
    by_name: dict[str, list] = {}
    for e in events:
        by_name.setdefault(e["name"], []).append(e.get("dur", 0.0))
    busy = _busy_us(events)
    kinds: dict[str, dict] = {}
    for name, durs in by_name.items():
        k = kinds.setdefault(kind_of(name), {"count": 0, "us": 0.0})
        k["count"] += len(durs)
        k["us"] += sum(durs)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "kernels_per_step": len(events) / steps,
        "device_busy_ms_per_step": busy / 1e3 / steps,
        "device_idle_fraction": max(0.0, 1.0 - (busy / 1e6) / wall_s) if wall_s > 0 else float("nan"),
        "kinds": {k: {"per_step": v["count"] / steps, "ms_per_step": v["us"] / 1e3 / steps}
                  for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["us"])},
        "top": [{"name": n[:120], "kind": kind_of(n), "per_step": len(d) / steps,
                 "ms_per_step": sum(d) / 1e3 / steps, "mean_us": sum(d) / len(d)} for n, d in top],
    }


def _read_trace(log_dir: str) -> dict:
    files = sorted(glob.glob(f"{log_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {log_dir}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def profile(fn, steps: int, backend: str) -> dict:
    """Trace `fn()` (which runs `steps` decode steps and blocks until done) and summarize it."""
    import jax

    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        events = _device_events(_read_trace(log_dir), backend)
    return summarize(events, steps, wall)


def run(model_name: str, batch: int, new_tokens: int, context: int, forwards: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp

    from decoding import Autoregressive, forward, generate, load

    from . import environment

    backend = jax.default_backend()
    model = load(model_name, dtype=getattr(jnp, dtype))
    prompt = [[(7 * i + 3) % 1000 + 10 for i in range(context)]] * batch
    kw = dict(strategy=Autoregressive(), max_new_tokens=new_tokens, eos_token_id=(), chat=False)
    first = generate(model, prompt, **kw)  # compiles
    report = {"environment": environment.describe(), "model": model_name, "batch": batch, "context": context,
              "new_tokens": new_tokens, "dtype": dtype, "compile_s": first.stats.compile_s}

    def loop():
        res = generate(model, prompt, **kw)
        report["loop_run_s"] = res.stats.run_s
        report["loop_target_forwards"] = res.stats.target_forwards

    # new_tokens - 1 decode steps plus the prefill, in one program
    report["loop"] = profile(loop, new_tokens - 1, backend)

    cache = model.init_cache(batch, context + 128).truncate(jnp.full((batch,), context, jnp.int32))
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), context, jnp.int32)
    f = jax.jit(lambda p, c: forward(model.config, p, tok, pos, c).logits)
    f(model.params, cache).block_until_ready()

    def alone():
        out = None
        for _ in range(forwards):
            out = f(model.params, cache)
        out.block_until_ready()

    report["forward_alone"] = profile(alone, forwards, backend)
    return report


def markdown(r: dict) -> str:
    dev = r["environment"]["device"].get("device_kind", "?")
    lines = [f"# Decode step profile: {r['model']}", "",
             f"Device {dev}; batch {r['batch']}; context {r['context']}; {r['new_tokens']} new tokens; {r['dtype']}.",
             "", "| program | wall ms/step | device busy ms/step | idle | kernels/step |", "| --- | --- | --- | --- | --- |"]
    for key, label in (("loop", "whole generation (while_loop), per step"), ("forward_alone", "one forward, back to back")):
        p = r[key]
        lines.append(f"| {label} | {p['wall_ms_per_step']:.3f} | {p['device_busy_ms_per_step']:.3f} | "
                     f"{100 * p['device_idle_fraction']:.0f}% | {p['kernels_per_step']:.0f} |")
    for key in ("loop", "forward_alone"):
        p = r[key]
        lines += ["", f"## {key}: time by kind", "", "| kind | kernels/step | ms/step |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['per_step']:.1f} | {v['ms_per_step']:.3f} |" for k, v in p["kinds"].items()]
        lines += ["", f"## {key}: largest kernels", "", "| kernel | kind | per step | ms/step | mean us |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{t['name']}` | {t['kind']} | {t['per_step']:.1f} | {t['ms_per_step']:.3f} | {t['mean_us']:.1f} |"
                  for t in p["top"]]
    return "\n".join(lines) + "\n"


def output_stem(model: str, batch: int) -> str:
    """File name stem of a report: the model's last path component, dots kept
    ("qwen2.5-coder-1.5b-instruct" -> "qwen2.5-coder-1.5b-instruct_b1")."""
    return f"{Path(model.rstrip('/')).name}_b{batch}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--forwards", type=int, default=100, help="single forwards traced back to back")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", default="experiments/results/profile", help="folder for <model>_b<batch>.{json,md}")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.forwards < 1 or args.batch < 1 or args.context < 1:
        raise SystemExit("--new-tokens must be >= 2 and --forwards, --batch, --context >= 1.")
    report = run(args.model, args.batch, args.new_tokens, args.context, args.forwards, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.model, args.batch)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
