"""Where a decode step's time goes: device kernels, their busy time, and the gaps between them.

Runs one model's jitted autoregressive generation (the whole `while_loop`) and, apart, a
single-token forward dispatched back to back (the same program as one loop step: the loop's
capacity, the cache donated), each under `jax.profiler.trace`, then reads the
trace (the `*.trace.json.gz` JAX writes) and reports, per decode step:

  * kernels launched (device events / steps),
  * device busy time (sum of kernel durations, overlaps merged) against wall time; the rest is
    time the device waits between kernels (launch latency, host round trips of the loop),
  * the kernels that take the time, grouped by kind (GEMM / fusion / copy / scatter / ...),
    with the 25 largest by total time.

On a CPU backend the "device" is the host's XLA thunks; the figures then describe XLA:CPU,
not a GPU, and serve only to check the tool.

It also reads the optimized HLO of the same whole-generation program (`hlo_report`, any
backend, no trace needed) and counts what one pass of the decode loop's body runs: top-level
instructions (about the kernels of a step), fusions, copies, dynamic-update-slices, scatters,
and which instructions produce a whole KV-cache buffer (a layer's `[2, B, K, S, Dh]`, or all
layers stacked) and how: in place by a dynamic-update-slice, or by a copy, a scatter or
an element-wise rewrite of the whole buffer (what the layout must avoid). `--hlo-only` skips
the traces (a CPU can check a GPU program's structure only on the GPU, so run it there too).

    python -m experiments.profile_step --model qwen2.5-coder-1.5b-instruct --out experiments/results/profile
    python -m experiments.profile_step --model qwen2.5-coder-1.5b-instruct --hlo-only --hlo-dump body.hlo
    python -m experiments.profile_step --model qwen2.5-coder-1.5b-instruct --layer-weights split

`--layer-weights split` profiles the same program with one weight array per layer
(`decoding.model.split_layers`) instead of slices of the stacked `[L, ...]` arrays: on an H100
the stacked loop ran 56 device copies (`memcpy128`, 24 us each, 1.36 ms of a 3.77 ms busy step)
that one forward alone does not run (experiments/results/profile_h100).
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


def device_events(trace: dict, backend: str) -> list[dict]:
    """The kernel (and memcpy) events of a trace's devices; on CPU, XLA's thunks on the host."""
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


def busy_us(events: list[dict]) -> float:
    """Microseconds covered by the events' spans, overlaps merged."""
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
    busy = busy_us(events)
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


# --------------------------------------------------------------------------------------------
# Optimized HLO of the loop body
# --------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?([^,}]+(?:, %[^,}]+)*)\}?")


def parse_hlo(text: str) -> tuple[dict[str, list[dict]], str]:
    """Optimized HLO text -> ({computation: [instruction]}, name of the entry computation).

    An instruction is {name, shape (the text before the opcode), op, root, called: {attr:
    [computations]}, line}."""
    comps: dict[str, list[dict]] = {}
    entry, cur = "", None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            cur = comps.setdefault(m.group(1), [])
            if line.startswith("ENTRY"):
                entry = m.group(1)
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTRUCTION.match(line) if cur is not None else None
        if not m:
            continue
        called = {attr: [c.strip().lstrip("%") for c in names.split(",")]
                  for attr, names in _CALLED.findall(m.group(5))}
        cur.append({"name": m.group(2), "shape": m.group(3).strip(), "op": m.group(4), "root": bool(m.group(1)),
                    "called": called, "line": line.strip()})
    return comps, entry


def _dims(shape: str) -> tuple[int, ...] | None:
    """The dimensions of an array shape text (`f32[1,2,128,8]{3,2,1,0}`); None for tuples."""
    m = re.fullmatch(r"[a-z]\w*\[([\d,]*)\](?:\{[^}]*\})?", shape)
    if not m:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _what(comps: dict, ins: dict) -> str:
    """An instruction's kind: its opcode, or for a fusion the opcode at its root
    ("fusion:dynamic-update-slice", "fusion:scatter", "fusion:copy", ...)."""
    if ins["op"] != "fusion":
        return ins["op"]
    called = ins["called"].get("calls", [])
    body = comps.get(called[0], []) if called else []
    roots = [i for i in body if i["root"]]
    return f"fusion:{roots[0]['op']}" if roots else "fusion"


def _flatten(comps: dict, name: str, seen=()) -> list[dict]:
    """The instructions run by computation `name`, with calls, conditionals and nested loops
    expanded in place (each nested body counted once); fusions stay one instruction."""
    out = []
    for ins in comps.get(name, []):
        if ins["op"] in ("call", "conditional", "while", "async-start"):
            for attr in ("to_apply", "calls", "branch_computations", "body"):
                for c in ins["called"].get(attr, []):
                    if c not in seen:
                        out += _flatten(comps, c, seen + (c,))
            continue
        out.append(ins)
    return out


def loop_body(comps: dict, entry: str) -> str:
    """The body of the decode loop: the largest body among the while loops the entry runs."""
    bodies = [c for ins in _flatten_calls(comps, entry) if ins["op"] == "while" for c in ins["called"].get("body", [])]
    if not bodies:
        raise ValueError("the program has no while loop: pass the whole-generation program "
                         "(decoding.generation.compiled).")
    return max(bodies, key=lambda b: len(_flatten(comps, b, (b,))))


def _flatten_calls(comps: dict, name: str) -> list[dict]:
    """The entry's instructions with plain calls expanded (while loops kept)."""
    out = []
    for ins in comps.get(name, []):
        if ins["op"] == "call":
            for c in ins["called"].get("to_apply", []):
                out += _flatten_calls(comps, c)
        else:
            out.append(ins)
    return out


SKIP_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast"})


def hlo_counts(text: str, cache_shapes=()) -> dict:
    """Counts of one pass of the decode loop's body in optimized HLO `text`.

    `cache_shapes`: the dims a KV-cache buffer takes (`cache_shapes(config, ...)`: a layer's
    `[2, B, K, S, Dh]` and all of them stacked). Returns {instructions: the body's instructions that
    do work (about its kernels), fusions, copies (copy ops and fusions rooted in a copy or a
    transpose), dynamic_update_slices and scatters (plain or as a fusion root), by_kind: the
    count per kind, cache_writes: {kind: count} of the instructions that produce a whole cache
    buffer, whole_cache_copies: those of them that are not an in-place dynamic-update-slice}.
    """
    comps, entry = parse_hlo(text)
    body = loop_body(comps, entry)
    kinds: dict[str, int] = {}
    cache_writes: dict[str, int] = {}
    shapes = {tuple(s) for s in cache_shapes}
    for ins in _flatten(comps, body, (body,)):
        if ins["op"] in SKIP_OPS:
            continue
        what = _what(comps, ins)
        kinds[what] = kinds.get(what, 0) + 1
        if _dims(ins["shape"]) in shapes:
            cache_writes[what] = cache_writes.get(what, 0) + 1

    def count(*names):
        return sum(n for k, n in kinds.items() if k in names or k.split(":")[-1] in names and k.startswith("fusion:"))

    return {
        "body": body,
        "instructions": sum(kinds.values()),
        "fusions": sum(n for k, n in kinds.items() if k.startswith("fusion")),
        "copies": count("copy", "transpose"),
        "dynamic_update_slices": count("dynamic-update-slice"),
        "scatters": count("scatter"),
        "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "cache_writes": cache_writes,
        "whole_cache_copies": sum(n for k, n in cache_writes.items() if k.split(":")[-1] != "dynamic-update-slice"),
    }


def cache_shapes(config, batch: int, capacity: int) -> tuple[tuple[int, ...], ...]:
    """The dims a KV-cache buffer of `config` takes in HLO: one layer's kv `[2, B, K, S, Dh]`
    (`decoding.KVCache`), and all layers stacked (XLA may stack loop-carried buffers itself)."""
    layer = (2, batch, config.num_kv_heads, capacity, config.head_dim)
    return layer, (config.num_layers, *layer)


def hlo_report(model, prompt, new_tokens: int, strategy=None, options=None, dump: str | None = None) -> dict:
    """Compile `decoding.generate`'s whole-generation program for `model` on `prompt` (lists of
    token ids) and count its loop body (`hlo_counts`); `dump` writes the optimized HLO there."""
    import decoding
    from decoding import generation

    prep = generation.prepare(model, prompt, strategy=strategy or decoding.Autoregressive(),
                              max_new_tokens=new_tokens, eos_token_id=(), chat=False, options=options)
    exe, _ = generation.compiled(prep)
    text = exe.as_text()
    if dump:
        Path(dump).write_text(text)
    report = hlo_counts(text, cache_shapes(model.config, len(prompt), prep.ctx.capacity))
    report["capacity"] = prep.ctx.capacity
    report["unroll_layers"] = prep.ctx.options.unroll_layers
    return report


def read_trace(log_dir: str) -> dict:
    """The newest trace jax.profiler wrote under `log_dir` (its parsed *.trace.json.gz)."""
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
        events = device_events(read_trace(log_dir), backend)
    return summarize(events, steps, wall)


def run(model_name: str, batch: int, new_tokens: int, context: int, forwards: int, dtype: str,
        hlo_only: bool = False, hlo_dump: str | None = None, layer_weights: str = "stacked") -> dict:
    import jax
    import jax.numpy as jnp

    from decoding import Autoregressive, Options, forward, generate, load

    from . import environment

    backend = jax.default_backend()
    model = load(model_name, dtype=getattr(jnp, dtype))
    if layer_weights == "split":  # one array per layer (decoding.model.split_layers)
        model = model.split_layers()
    prompt = [[(7 * i + 3) % 1000 + 10 for i in range(context)]] * batch
    options = Options.from_env()
    report = {"environment": environment.describe(), "model": model_name, "batch": batch, "context": context,
              "new_tokens": new_tokens, "dtype": dtype, "layer_weights": layer_weights,
              "hlo": hlo_report(model, prompt, new_tokens, options=options, dump=hlo_dump)}
    if hlo_only:
        return report
    kw = dict(strategy=Autoregressive(), max_new_tokens=new_tokens, eos_token_id=(), chat=False, options=options)
    first = generate(model, prompt, **kw)  # compiled above: run once to warm up
    report["compile_s"] = first.stats.compile_s

    def loop():
        res = generate(model, prompt, **kw)
        report["loop_run_s"] = res.stats.run_s
        report["loop_target_forwards"] = res.stats.target_forwards

    # new_tokens - 1 decode steps plus the prefill, in one program
    report["loop"] = profile(loop, new_tokens - 1, backend)

    # The same program as one loop step: the loop's capacity and options, the cache donated
    # and written in place, the cursor held at the context (each call rewrites one slot).
    cache = model.init_cache(batch, report["hlo"]["capacity"]).truncate(jnp.full((batch,), context, jnp.int32))
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), context, jnp.int32)

    def one_step(p, c):
        out = forward(model.config, p, tok, pos, c, options=options.resolved())
        return out.logits, out.cache.truncate(c.lengths)

    f = jax.jit(one_step, donate_argnums=1)
    logits, cache = f(model.params, cache)
    logits.block_until_ready()
    state = {"cache": cache}

    def alone():
        out, c = None, state["cache"]
        for _ in range(forwards):
            out, c = f(model.params, c)
        out.block_until_ready()
        state["cache"] = c

    report["forward_alone"] = profile(alone, forwards, backend)
    return report


def hlo_markdown(h: dict) -> list[str]:
    """The loop-body counts of `hlo_report` as Markdown lines."""
    lines = ["## Optimized HLO of the loop body (one pass)", "",
             f"Capacity {h['capacity']} slots; layers {'unrolled' if h['unroll_layers'] else 'in a scan'}.", "",
             "| instructions | fusions | copies | dynamic-update-slices | scatters | whole-cache copies |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {h['instructions']} | {h['fusions']} | {h['copies']} | {h['dynamic_update_slices']} | "
             f"{h['scatters']} | {h['whole_cache_copies']} |", "",
             "Instructions producing a whole KV buffer: " + (", ".join(
                 f"{k} x{n}" for k, n in h["cache_writes"].items()) or "none") + ".", "",
             "| kind | count |", "| --- | --- |"]
    return lines + [f"| {k} | {n} |" for k, n in h["by_kind"].items()]


def markdown(r: dict) -> str:
    dev = r["environment"]["device"].get("device_kind", "?")
    lines = [f"# Decode step profile: {r['model']}", "",
             f"Device {dev}; batch {r['batch']}; context {r['context']}; {r['new_tokens']} new tokens; {r['dtype']}; "
             f"layer weights {r.get('layer_weights', 'stacked')}.",
             ""]
    if "loop" not in r:  # --hlo-only
        return "\n".join(lines + hlo_markdown(r["hlo"])) + "\n"
    lines += ["| program | wall ms/step | device busy ms/step | idle | kernels/step |", "| --- | --- | --- | --- | --- |"]
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
    lines += [""] + hlo_markdown(r["hlo"])
    return "\n".join(lines) + "\n"


def output_stem(model: str, batch: int, layer_weights: str = "stacked") -> str:
    """File name stem of a report: the model's last path component, dots kept
    ("qwen2.5-coder-1.5b-instruct" -> "qwen2.5-coder-1.5b-instruct_b1"; split layer weights add
    "_split")."""
    return f"{Path(model.rstrip('/')).name}_b{batch}" + ("_split" if layer_weights == "split" else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--forwards", type=int, default=100, help="single forwards traced back to back")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", default="experiments/results/profile", help="folder for <model>_b<batch>.{json,md}")
    ap.add_argument("--hlo-only", action="store_true", help="only count the optimized HLO of the loop body (no traces)")
    ap.add_argument("--hlo-dump", default=None, help="also write the whole program's optimized HLO text to this file")
    ap.add_argument("--layer-weights", default="stacked", choices=("stacked", "split"),
                    help="stacked: per-layer weights sliced from [L, ...] arrays (as loaded); split: one array per "
                         "layer (decoding.model.split_layers)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.forwards < 1 or args.batch < 1 or args.context < 1:
        raise SystemExit("--new-tokens must be >= 2 and --forwards, --batch, --context >= 1.")
    report = run(args.model, args.batch, args.new_tokens, args.context, args.forwards, args.dtype,
                 hlo_only=args.hlo_only, hlo_dump=args.hlo_dump, layer_weights=args.layer_weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.model, args.batch, args.layer_weights)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
