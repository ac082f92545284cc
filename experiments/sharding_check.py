"""Does a mesh cost anything, and what do several devices give? Each mesh against no mesh, in one process.

This script loads the target (and the draft) once, then measures, in the same process and on
the same prompts, each method with the models as loaded (no mesh) and laid out on each
("data" x "model") mesh of `--meshes` (`decoding.shard`): tokens/s of whole `generate` calls
after a warm-up call per shape, milliseconds per decode step (run time over target forwards,
prefill included), and whether the greedy outputs are identical. Methods: autoregressive, and
the chain with the 0.5B draft (the best speculative method of experiments/results/specbench on
these models). Runs alternate between no mesh and the meshes `--repeats` times and keep each
one's best, so drift of the machine does not favour any.

Layouts: each model is sharded with `decoding.sharding.DEFAULT_RULES` where they divide it, and
otherwise with those rules less the logical axes the mesh's "model" size does not divide
(`fitting_rules`: Qwen2.5-1.5B's 2 kv heads and the 0.5B draft's 2 kv heads and 14 heads over
4 or 8 devices stay replicated, the MLP, vocabulary and fused inputs are still split), or, with
`--draft-layout replicate`, the draft whole on every device. The report names the rules used.
A mesh with a "data" size that does not divide the batch is skipped (recorded as such).

    python -m experiments.sharding_check                       # on the GPU: reference16 prompts, 1x1
    python -m experiments.sharding_check --meshes 1x1,1x2,2x1 --batch 1,8   # on 2 GPUs
    python -m experiments.sharding_check --tiny --out /tmp/x   # CPU smoke test: tiny random models

`--profile-collectives DIR` also traces, per method and batch, one generation of the first
batch (`--profile-tokens` new tokens) on the largest mesh (`jax.profiler`, traces kept in DIR)
and reports the share of device busy time in collective kernels (XLA's all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute; NCCL's kernels on GPUs).

Writes `<out>.json` and `<out>.md` (default experiments/results/sharding/sharding_check) after
every measured (method, batch, mesh), naming device and commit; a rerun with the same settings
skips the entries already measured (resumable).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import environment

METHODS = ("ar", "spec")
TENSOR_PARALLEL_AXES = ("heads", "kv_heads", "mlp", "vocab", "fused_in")
"""The logical axes `decoding.sharding.DEFAULT_RULES` maps to the "model" mesh axis."""
COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|allreduce|allgather|"
                        r"reducescatter|alltoall|sendrecv|nccl", re.I)
"""Kernel names of collectives: XLA's op names (CPU thunks) and NCCL's kernels (GPU)."""


def parse_meshes(text: str) -> list[tuple[int, int]]:
    """"1x1,1x2,2x1" -> [(1, 1), (1, 2), (2, 1)]: ("data", "model") sizes, in order, no repeats."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise SystemExit(f"--meshes: {item!r} is not DATAxMODEL with positive sizes; write e.g. "
                             "--meshes 1x1,1x2,2x1 (data-parallel size x tensor-parallel size).")
        mesh = (int(m.group(1)), int(m.group(2)))
        if mesh in out:
            raise SystemExit(f"--meshes names {item.strip()} twice.")
        out.append(mesh)
    return out


def parse_batches(text: str) -> list[int]:
    """"1,8" -> [1, 8]."""
    try:
        out = [int(b) for b in text.split(",")]
    except ValueError:
        raise SystemExit(f"--batch: {text!r} is not a comma list of batch sizes, e.g. --batch 1,8.") from None
    if any(b < 1 for b in out) or len(set(out)) != len(out):
        raise SystemExit(f"--batch: {text!r} must list distinct positive batch sizes.")
    return out


def mesh_name(mesh: tuple[int, int]) -> str:
    return f"{mesh[0]}x{mesh[1]}"


def check_device_count(meshes: list[tuple[int, int]], available: int) -> None:
    """Refuse meshes that need more devices than this process sees."""
    big = [f"{mesh_name(m)} ({m[0] * m[1]} devices)" for m in meshes if m[0] * m[1] > available]
    if big:
        raise SystemExit(f"--meshes {', '.join(big)} need more devices than the {available} jax.device_count() "
                         f"sees; use meshes of at most {available} devices (on CPU, set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts).")


def fitting_rules(config, model_size: int):
    """`DEFAULT_RULES` less the tensor-parallel logical axes whose unit count `model_size` does
    not divide (those stay replicated), and the names of the axes left out."""
    from decoding import sharding

    units = sharding.logical_units(config)
    dropped = tuple(a for a in TENSOR_PARALLEL_AXES if units.get(a) and units[a] % model_size)
    return sharding.DEFAULT_RULES.replace(**{a: None for a in dropped}), dropped


def layout_of(model, mesh: tuple[int, int], replicate: bool = False):
    """(the model laid out on a data x model mesh, a line saying how)."""
    import decoding
    from decoding import sharding

    jmesh = sharding.make_mesh(data=mesh[0], model=mesh[1])
    if replicate:
        rules = sharding.DEFAULT_RULES.replace(**{a: None for a in TENSOR_PARALLEL_AXES})
        return decoding.shard(model, jmesh, rules), "replicated over model (batch over data)"
    rules, dropped = fitting_rules(model.config, mesh[1])
    how = "default rules" if not dropped else f"default rules, {', '.join(dropped)} replicated"
    return decoding.shard(model, jmesh, rules), how


def tiny_models():
    """A tiny random target and draft sharing a vocabulary (no tokenizer): for the smoke test."""
    import decoding

    target_cfg = decoding.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    draft_cfg = decoding.ModelConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                     num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    params = jax.jit(lambda: (decoding.init_params(target_cfg, jax.random.PRNGKey(0), scale=0.5),  # one compilation
                              decoding.init_params(draft_cfg, jax.random.PRNGKey(1), scale=0.5)))()
    target = decoding.Model(target_cfg, params[0], source="tiny-target")
    draft = decoding.Model(draft_cfg, params[1], source="tiny-draft")
    prompts = [np.random.default_rng(i).integers(0, 96, 5 + 3 * i).tolist() for i in range(4)]
    return target, draft, prompts


def strategy_of(method: str, gamma: int):
    import decoding
    import drafting

    return decoding.Autoregressive() if method == "ar" else decoding.Speculative(drafting.DraftModel(), gamma=gamma)


def collective_share(trace: dict, backend: str, steps: int) -> dict:
    """Device time in collective kernels of a profiler trace, against the devices' busy time.

    Each device (GPU: its "/device:" process) is measured apart, overlaps merged, then summed:
    share = collective time / busy time over all devices; per step figures divide by `steps`."""
    from .profile_step import busy_us, device_events

    events = device_events(trace, backend)
    by_device: dict = {}
    for e in events:
        by_device.setdefault(e["pid"], []).append(e)
    busy = sum(busy_us(ev) for ev in by_device.values())
    coll = sum(busy_us([e for e in ev if COLLECTIVE.search(e["name"])]) for ev in by_device.values())
    kernels = sum(1 for e in events if COLLECTIVE.search(e["name"]) and not e["name"].startswith("end:"))
    devices = max(len(by_device), 1)
    return {"devices_traced": len(by_device), "steps": steps, "collective_share": coll / busy if busy else float("nan"),
            "collective_ms_per_step": coll / 1e3 / devices / steps, "busy_ms_per_step": busy / 1e3 / devices / steps,
            "collective_kernels_per_step": kernels / devices / steps}


def measure(target, draft, prompts, method: str, batch: int, meshes: list[tuple[int, int]], args,
            profile_dir: str | None = None) -> dict:
    """Best of `repeats` runs with no mesh and on each mesh, alternating: {mesh name: entry}.

    Each entry holds the no-mesh figures it was measured beside, its own, their ratio, output
    identity and the layouts used; `profile_dir` traces a generation on the last mesh."""
    import decoding
    from decoding.shapes import bucket as next_bucket

    strategy = strategy_of(method, args.gamma)
    use_draft = method == "spec"
    settings = {"no_mesh": {"target": target, "draft": draft}}
    layouts = {}
    for mesh in meshes:
        t, t_how = layout_of(target, mesh)
        d, d_how = layout_of(draft, mesh, replicate=args.draft_layout == "replicate") if use_draft else (None, None)
        settings[mesh_name(mesh)] = {"target": t, "draft": d}
        layouts[mesh_name(mesh)] = {"target": t_how, "draft": d_how}
    bucket = next_bucket(max(len(p) for p in prompts))
    chunks = [prompts[i: i + batch] for i in range(0, len(prompts), batch)]

    def run(models, timed: bool):
        tokens, run_s, compile_s, forwards, outs = 0, 0.0, 0.0, 0, []
        for rows in chunks:
            res = decoding.generate(models["target"], rows, strategy=strategy,
                                    draft=models["draft"] if use_draft else None,
                                    max_new_tokens=args.max_new_tokens, prompt_bucket=bucket,
                                    eos_token_id=() if args.tiny else None)
            if timed and res.stats.compile_s:
                raise RuntimeError("a timed call compiled: the warm-up did not cover its shape")
            tokens += res.stats.new_tokens
            run_s += res.stats.run_s
            compile_s += res.stats.compile_s
            forwards += res.stats.target_forwards
            outs.extend(res.tokens)
        return {"tokens": tokens, "run_s": run_s, "tokens_per_s": tokens / run_s, "steps": forwards,
                "ms_per_step": 1e3 * run_s / forwards, "compile_s": compile_s, "outputs": outs}

    compile_s = {name: run(models, False)["compile_s"] for name, models in settings.items()}  # warm-up
    best = {}
    for _ in range(args.repeats):
        for name, models in settings.items():
            r = run(models, True)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    figures = {name: {**{k: v for k, v in r.items() if k not in ("outputs", "compile_s")},
                      "compile_s": compile_s[name]} for name, r in best.items()}
    out = {}
    for mesh in meshes:
        name = mesh_name(mesh)
        want, got = best["no_mesh"]["outputs"], best[name]["outputs"]
        out[name] = {"method": method, "batch": batch, "mesh": name, "devices": mesh[0] * mesh[1],
                     "layout": layouts[name], "no_mesh": figures["no_mesh"], "on_mesh": figures[name],
                     "mesh_over_no_mesh": figures[name]["tokens_per_s"] / figures["no_mesh"]["tokens_per_s"],
                     "identical_outputs": want == got, "rows_identical": sum(a == b for a, b in zip(want, got)),
                     "rows": len(want)}
    if profile_dir is not None:
        name = mesh_name(meshes[-1])
        out[name]["collectives"] = profile_collectives(settings[name], chunks[0], strategy, use_draft, bucket, args,
                                                       Path(profile_dir) / f"{method}_b{batch}_{name}")
    return out


def profile_collectives(models, rows, strategy, use_draft: bool, bucket: int, args, trace_dir: Path) -> dict:
    """Trace one generation of `rows` (`args.profile_tokens` new tokens, compiled first) and
    measure its collectives (`collective_share`); the trace stays under `trace_dir`."""
    import decoding

    from .profile_step import read_trace

    def once():
        return decoding.generate(models["target"], rows, strategy=strategy,
                                 draft=models["draft"] if use_draft else None, max_new_tokens=args.profile_tokens,
                                 prompt_bucket=bucket, eos_token_id=() if args.tiny else None)

    once()  # compiles this length
    trace_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(trace_dir)):
        res = once()
    files = sorted(trace_dir.glob("**/*.trace.json.gz"))
    return {**collective_share(read_trace(str(trace_dir)), jax.default_backend(), res.stats.target_forwards),
            "new_tokens": res.stats.new_tokens, "trace": str(files[-1]) if files else None}


def entry_key(method: str, batch: int, mesh: str) -> str:
    return f"{method} b{batch} {mesh}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Meshes against no mesh", "",
             environment.device_commit_line(report["environment"], report.get("device_count", 1)) + "; "
             f"target {s['target']}, draft {s['draft']} (draft layout: "
             f"{s['draft_layout']}); prompts: {report['prompts']} x {report['n_prompts']}; greedy; "
             f"max_new_tokens {s['max_new_tokens']}; best of {s['repeats']}. ms/step: run time over target "
             "forwards (prefill included).", "",
             "| method | batch | mesh (data x model) | no mesh tok/s | mesh tok/s | mesh / no mesh | ms/step no mesh "
             "| ms/step mesh | identical outputs | collectives share | layout (target; draft) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = lambda r: (METHODS.index(r["method"]), r["batch"], r.get("devices", 0), r["mesh"])  # noqa: E731
    for r in sorted(report["entries"].values(), key=order):
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['mesh']} | skipped: {r['skipped']} "
                         "| | | | | | | |")
            continue
        coll = r.get("collectives")
        share = f"{100 * coll['collective_share']:.1f}%" if coll else "-"
        lay = r["layout"]["target"] + (f"; {r['layout']['draft']}" if r["layout"]["draft"] else "")
        lines.append(f"| {r['method']} | {r['batch']} | {r['mesh']} | {r['no_mesh']['tokens_per_s']:.1f} | "
                     f"{r['on_mesh']['tokens_per_s']:.1f} | {r['mesh_over_no_mesh']:.3f} | "
                     f"{r['no_mesh']['ms_per_step']:.2f} | {r['on_mesh']['ms_per_step']:.2f} | "
                     f"{r['rows_identical']}/{r['rows']} | {share} | {lay} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--meshes", default="1x1", help="comma list of DATAxMODEL meshes, each against no mesh")
    ap.add_argument("--draft-layout", choices=("fit", "replicate"), default="fit",
                    help="fit: the draft sharded by the rules that divide it; replicate: whole on every device")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--batch", default="1", help="batch size, or a comma list (1,8)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the shared copy)")
    ap.add_argument("--profile-collectives", default=None, metavar="DIR",
                    help="trace the largest mesh's generations into DIR; report the collectives' share")
    ap.add_argument("--profile-tokens", type=int, default=32, help="new tokens of the traced generation")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random models, token-id prompts")
    ap.add_argument("--out", default="experiments/results/sharding/sharding_check")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}.")
    meshes, batches = parse_meshes(args.meshes), parse_batches(args.batch)
    check_device_count(meshes, jax.device_count())
    out = Path(args.out)
    # what entries are measured under; the lists of methods, meshes and batches only pick entries
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "methods", "meshes", "batch", "profile_collectives", "profile_tokens")}
    if args.tiny:
        settings.update(target="tiny-target", draft="tiny-draft")
    report = {"environment": environment.describe(), "device_count": jax.device_count(), "settings": settings,
              "entries": {}}
    old = out.with_suffix(".json")
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("settings") == settings:  # same settings: keep what was measured, skip it
            report["entries"] = prev.get("entries", {})
    if args.tiny:
        target, draft, prompts = tiny_models()
        report["prompts"] = "random token ids (smoke test)"
    else:
        import decoding
        from decoding.generation import encode_prompts

        from .bench_autoregressive import reference_prompts

        t0 = time.perf_counter()
        target = decoding.load(args.target, dtype=jnp.bfloat16)
        draft = decoding.load(args.draft, dtype=jnp.bfloat16) if "spec" in methods else None
        report["load_s"] = time.perf_counter() - t0
        prompts = encode_prompts(target.tokenizer, reference_prompts(args.questions), chat=True)
        report["prompts"] = "reference16 (Spec-Bench, first turns)"
    report["n_prompts"] = len(prompts)
    out.parent.mkdir(parents=True, exist_ok=True)
    largest = max(meshes, key=lambda m: (m[0] * m[1], m[1]))  # the one profiled
    for method in methods:
        for batch in batches:
            todo = []
            for mesh in meshes:
                key = entry_key(method, batch, mesh_name(mesh))
                if key in report["entries"]:
                    print(f"{key}: measured before, skipped", flush=True)
                elif batch % mesh[0]:
                    report["entries"][key] = {"method": method, "batch": batch, "mesh": mesh_name(mesh),
                                              "devices": mesh[0] * mesh[1],
                                              "skipped": f"batch {batch} does not divide over data={mesh[0]}"}
                    print(f"{key}: {report['entries'][key]['skipped']}", flush=True)
                else:
                    todo.append(mesh)
            for mesh in todo:  # one mesh at a time beside no mesh: each entry is saved as it is measured
                profile = args.profile_collectives if mesh == largest else None
                for name, r in measure(target, draft, prompts, method, batch, [mesh], args, profile).items():
                    r["environment"] = environment.describe()  # a resumed report keeps each entry's own
                    report["entries"][entry_key(method, batch, name)] = r
                    print(f"{entry_key(method, batch, name)}: no mesh {r['no_mesh']['tokens_per_s']:.1f} tok/s, mesh "
                          f"{r['on_mesh']['tokens_per_s']:.1f} tok/s ({r['mesh_over_no_mesh']:.3f}x), "
                          f"{r['on_mesh']['ms_per_step']:.2f} ms/step, identical outputs "
                          f"{r['rows_identical']}/{r['rows']}", flush=True)
                out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
                out.with_suffix(".md").write_text(markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
