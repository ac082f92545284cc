"""Autoregressive decoding speed of the JAX decoder vs the physical limit and transformers.

For each model: our jitted autoregressive decoder (bf16) at each batch size on the Spec-Bench
"reference16" prompts (chat template, greedy, 256 new tokens), beside transformers on the same
weights and prompts in the same process (`--hf-modes`: eager `generate`, and the fair peer
`static`: `generate` with a static cache, which transformers compiles itself with
`torch.compile(..., mode="reduce-overhead")`; prompts left-padded to power-of-two widths, every
width warmed up twice so compilation and CUDA-graph recording stay out of the timing), and as a fraction of the
physical limit of batch-1 decoding: every step must read every weight once, so
tokens/s <= memory bandwidth / weight bytes (batch b: b times that).

The bandwidth used for the limit is the one measured on the device (a large device-to-device
copy through JAX, bytes read + written), with the datasheet figure recorded beside it.

Throughput counts generated tokens (EOS included, rows stop at EOS) over wall time of whole
`generate` calls (prefill included), after a warm-up call per shape that compiles; compile
time is reported apart.

    python -m experiments.bench_autoregressive --models qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct \
        --batch-sizes 1,8 --max-new-tokens 256 --hf --out experiments/results/autoregressive
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from decoding import roofline

from . import environment, questions


def reference_prompts(path=None, subset="reference16") -> list[str]:
    items = questions.select(questions.load_questions(path), subset)
    return [it.question.turns[0] for it in items]


def weight_bytes(config, itemsize: int = 2) -> int:
    """Bytes one decode step must read: every weight except the (gathered) input embedding
    table when the head is untied."""
    return roofline.weight_params(config) * itemsize


def run_ours(model, prompts, batch: int, max_new_tokens: int, options=None):
    from decoding import Autoregressive
    from decoding import generate as _generate
    from decoding.shapes import bucket as next_bucket

    bucket = next_bucket(max(len(p) for p in prompts))  # one compiled program for every batch

    def generate(*a, **k):
        return _generate(*a, prompt_bucket=bucket, options=options, **k)

    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    compile_s = 0.0
    for b in batches:  # warm-up: compile every shape that will be timed
        compile_s += generate(model, b, strategy=Autoregressive(), max_new_tokens=max_new_tokens).stats.compile_s
    tokens, run_s, outs, forwards = 0, 0.0, [], 0
    for b in batches:
        res = generate(model, b, strategy=Autoregressive(), max_new_tokens=max_new_tokens)
        assert res.stats.compile_s == 0.0, "a timed call compiled"
        tokens += res.stats.new_tokens
        run_s += res.stats.run_s
        forwards += res.stats.target_forwards
        outs.extend(res.tokens)
    return {"tokens": tokens, "run_s": run_s, "tokens_per_s": tokens / run_s, "compile_s": compile_s,
            "target_forwards": forwards, "outputs": outs}


def best_variant(ours: dict, batch: int) -> str | None:
    """The key of the fastest of our variants measured at `batch` ("1", "1 (split layer weights)", ...)
    in `ours` (report["models"][name]["ours"]), or None when none was."""
    keys = [k for k in ours if k == str(batch) or k.startswith(f"{batch} (")]
    return max(keys, key=lambda k: ours[k]["tokens_per_s"]) if keys else None


def forward_only_ms(model, context: int = 512, batch: int = 1, iters: int = 50, options=None) -> float:
    """Time of one jitted single-token decode forward dispatched back to back (no loop around
    it): what a decode step costs when kernel launches overlap with GPU work."""
    from decoding import forward

    cache = model.init_cache(batch, context + 128).truncate(jnp.full((batch,), context, jnp.int32))
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), context, jnp.int32)
    f = jax.jit(lambda p, c: forward(model.config, p, tok, pos, c, options=options).logits)
    f(model.params, cache).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(model.params, cache)
    out.block_until_ready()
    return 1e3 * (time.perf_counter() - t0) / iters


def run_hf(source: str, prompt_ids: list[list[int]], eos: tuple, batch: int, max_new_tokens: int,
           mode: str = "eager"):
    """transformers generate (bf16, CUDA when present), greedy, left-padded batches; `mode`
    "eager" (the default dynamic cache) or "static" (static cache, compiled by transformers)."""
    import torch

    from decoding.shapes import bucket

    from .hf_peers import dynamo_graphs, load_hf_model

    if mode not in ("eager", "static"):
        raise ValueError(f"--hf-modes takes eager and/or static, not {mode!r}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_hf_model(source, "bfloat16", dev)
    if mode == "static":
        model.generation_config.cache_implementation = "static"
    pad = eos[0] if eos else 0

    def gen(rows):
        width = max(len(r) for r in rows)
        if mode == "static":
            width = bucket(width)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=list(eos), pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        res = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            res.append(row[:cut])
        return res

    batches = [prompt_ids[i : i + batch] for i in range(0, len(prompt_ids), batch)]
    warm = batches[:1] if mode == "eager" else list({bucket(max(len(r) for r in b)): b for b in batches}.values())
    t0 = time.perf_counter()
    for rows in warm:  # static: compile, then record CUDA graphs, for every padded width
        for _ in range(1 if mode == "eager" else 2):
            gen(rows)
    warmup_s = time.perf_counter() - t0
    graphs = dynamo_graphs() if mode == "static" else None
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = []
    for rows in batches:
        outs.extend(gen(rows))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    run_s = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    del model
    recompiled = (dynamo_graphs() or 0) - (graphs or 0) if mode == "static" else None
    return {"mode": mode, "tokens": tokens, "run_s": run_s, "tokens_per_s": tokens / run_s, "outputs": outs,
            "warmup_s": warmup_s, "compiled_graphs": graphs, "graphs_compiled_while_timed": recompiled}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default ../shared/data/...)")
    ap.add_argument("--hf", action="store_true", help="run transformers' generate beside")
    ap.add_argument("--hf-modes", default="eager,static",
                    help="comma-separated transformers modes: eager (dynamic cache), static (static cache, "
                         "compiled by transformers: the fair peer)")
    ap.add_argument("--hf-batch-sizes", default="1")
    ap.add_argument("--attention", default="xla",
                    help="comma-separated attention implementations to measure in turn: xla, pallas "
                         "(decoding.Options.attention)")
    ap.add_argument("--projections", default="xla",
                    help="comma-separated projection implementations to measure in turn: xla, pallas "
                         "(decoding.Options.projections: the fused norm/projection kernels)")
    ap.add_argument("--layer-weights", default="stacked",
                    help="comma-separated layer-weight layouts to measure in turn: stacked (as loaded: slices of "
                         "[L, ...] arrays), split (one array per layer, decoding.model.split_layers)")
    ap.add_argument("--command-buffers", default="default",
                    help="comma-separated XLA:GPU command buffer settings to measure in turn: default, while "
                         "(decoding.Options.command_buffers: the decode loop as a CUDA graph)")
    ap.add_argument("--random-weights", action="store_true",
                    help="smoke test: the models' configs with random weights (speed only; no quality)")
    ap.add_argument("--out", default="experiments/results/autoregressive")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="merge earlier reports (one model per run, later files win) into --out and exit")
    args = ap.parse_args(argv)
    if args.merge:
        report = merge([json.loads(Path(f).read_text()) for f in args.merge])
        write_report(report, Path(args.out))
        print(markdown(report))
        return

    from decoding import Model, Options, init_params, load
    from decoding.generation import default_eos_ids, encode_prompts

    prompts = reference_prompts(args.questions)
    env = environment.describe()
    bw_measured = roofline.measure_profile().memory_bandwidth if jax.default_backend() == "gpu" else None
    datasheet = roofline.profile_for_device(jax.devices()[0].device_kind)
    report = {"environment": env, "settings": vars(args), "prompts": "reference16 (Spec-Bench, first turns)",
              "n_prompts": len(prompts), "bandwidth_measured_Bps": bw_measured,
              "bandwidth_datasheet_Bps": datasheet.memory_bandwidth if datasheet else None, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model = load(name, dtype=jnp.bfloat16)
        if args.random_weights:
            model = Model(model.config, init_params(model.config, jax.random.PRNGKey(0), jnp.bfloat16),
                          model.tokenizer, model.source + " (random weights)")
        load_s = time.perf_counter() - t0
        wb = weight_bytes(model.config)
        # The limit uses the datasheet bandwidth (the stricter bound); the measured copy rate is recorded.
        bw = datasheet.memory_bandwidth if datasheet else (bw_measured or float("nan"))
        limit = bw / wb
        entry = {"environment": env, "params": model.config.param_count(), "weight_bytes_per_step": wb, "load_s": load_s,
                 "physical_limit_tokens_per_s_batch1": limit, "ours": {}, "hf_eager": {}, "hf_static": {}}
        ids = encode_prompts(model.tokenizer, prompts, chat=True)
        eos = default_eos_ids(model.tokenizer)
        layouts = args.layer_weights.split(",")
        bad = [w for w in layouts if w not in ("stacked", "split")]
        if bad:
            raise SystemExit(f"--layer-weights takes stacked and/or split, got {bad}.")
        variants = [(lw, impl, proj, cb) for lw in layouts for impl in args.attention.split(",")
                    for proj in args.projections.split(",") for cb in args.command_buffers.split(",")]
        split_model = None
        for lw, impl, proj, cb in variants:
            if lw == "split" and split_model is None:
                split_model = model.split_layers()  # one copy of the weights, kept beside the stacked ones
            m = split_model if lw == "split" else model
            options = Options(attention=impl, projections=proj, command_buffers="" if cb == "default" else cb)
            tags = (([f"{lw} layer weights"] if lw != "stacked" else []) + ([f"{impl} attention"] if impl != "xla" else [])
                    + ([f"{proj} projections"] if proj != "xla" else [])
                    + ([f"command buffers {cb}"] if cb != "default" else []))
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                r = run_ours(m, ids, bs, args.max_new_tokens, options)
                r["layer_weights"] = lw
                r["attention"] = impl
                r["projections"] = proj
                r["command_buffers"] = cb
                r["fraction_of_physical_limit"] = r["tokens_per_s"] / (bs * limit)
                r["ms_per_step_in_loop"] = 1e3 * r["run_s"] / r["target_forwards"] if r["target_forwards"] else None
                r["ms_forward_only"] = forward_only_ms(m, batch=bs, options=options)
                r["ms_weights_at_bandwidth"] = 1e3 * wb / bw
                key = f"{bs} ({', '.join(tags)})" if tags else str(bs)
                if tags and str(bs) in entry["ours"]:  # same process, same prompts: the default beside it
                    base = entry["ours"][str(bs)]
                    r["identical_to_default"] = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
                    r["speedup_over_default"] = r["tokens_per_s"] / base["tokens_per_s"]
                entry["ours"][key] = r
                print(f"{name} ours batch {key}: {r['tokens_per_s']:.1f} tok/s "
                      f"({100 * r['fraction_of_physical_limit']:.1f}% of {bs * limit:.0f} tok/s limit), "
                      f"compile {r['compile_s']:.1f} s", flush=True)
        if args.hf and not args.random_weights:
            for mode in args.hf_modes.split(","):
                for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
                    try:
                        h = run_hf(name, ids, eos, bs, args.max_new_tokens, mode)
                    except Exception as e:  # a peer that breaks is reported, not fatal
                        h = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:500], "outputs": []}
                        entry[f"hf_{mode}"][str(bs)] = h
                        print(f"{name} transformers {mode} batch {bs} failed: {h['error']}", flush=True)
                        continue
                    ours = entry["ours"].get(str(bs))
                    if ours:
                        h["ours_speedup"] = ours["tokens_per_s"] / h["tokens_per_s"]
                        h["identical_outputs"] = sum(a == b for a, b in zip(ours["outputs"], h["outputs"]))
                    best = best_variant(entry["ours"], bs)
                    if best is not None and best != str(bs):  # a switch beat the default: the peer beside it too
                        h["best_ours"] = best
                        h["best_ours_speedup"] = entry["ours"][best]["tokens_per_s"] / h["tokens_per_s"]
                    entry[f"hf_{mode}"][str(bs)] = h
                    print(f"{name} transformers {mode} batch {bs}: {h['tokens_per_s']:.1f} tok/s; ours is "
                          f"{h.get('ours_speedup', float('nan')):.2f}x"
                          + (f" ({h['best_ours_speedup']:.2f}x as {h['best_ours']})" if "best_ours" in h else "")
                          + f"; identical outputs {h.get('identical_outputs')}/{len(ids)}", flush=True)
        report["models"][name] = entry
        del model, split_model
        write_report(report, Path(args.out))  # after every model, so a cut-off run keeps what it measured
    print(markdown(report))


def merge(reports: list[dict]) -> dict:
    """One report from several runs (e.g. one model per command): models of later reports
    replace those of earlier ones; each model keeps the environment of the run that measured it."""
    if not reports:
        raise ValueError("merge needs at least one report")
    out = dict(reports[-1])
    out["models"] = {}
    for r in reports:
        for name, m in r["models"].items():
            m = dict(m)
            m.setdefault("environment", r["environment"])
            m.setdefault("bandwidth_measured_Bps", r.get("bandwidth_measured_Bps"))
            out["models"][name] = m
    out["merged_from"] = [r["environment"].get("time_utc") for r in reports]
    return out


def write_report(report, out: Path) -> None:
    import copy

    report = copy.deepcopy(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in report["models"].values():
        for part in ("ours", "hf_eager", "hf_static"):
            for r in m.get(part, {}).values():
                if r["outputs"] and not isinstance(r["outputs"][0], int):
                    r["outputs"] = [len(o) for o in r["outputs"]]  # lengths only in the JSON
    # `out` names the pair without its extension; a dot in a model name is not one
    # ("runs/qwen2.5-coder-1.5b-instruct" -> runs/qwen2.5-coder-1.5b-instruct.json and .md)
    path = out if out.suffix == ".json" else out.parent / f"{out.name}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    path.with_suffix(".md").write_text(markdown(report))


def markdown(report) -> str:
    env = report["environment"]
    dev = env.get("device", {})
    lines = [
        "# Autoregressive decoding speed", "",
        f"Device: {dev.get('device_kind', dev)} ({dev.get('platform', '')}); jax {env.get('versions', {}).get('jax')}; "
        f"prompts: {report['prompts']} x {report['n_prompts']}; greedy; bf16; "
        f"max_new_tokens {report['settings']['max_new_tokens']}.",
        f"Physical limit = datasheet bandwidth {report['bandwidth_datasheet_Bps'] or float('nan'):.3g} B/s "
        f"(measured copy through JAX: {report['bandwidth_measured_Bps'] or float('nan'):.3g}) / weight bytes read per step.", "",
        "| model | system | batch | tokens/s | % of physical limit | ms/step in loop | ms/forward alone | ms weights@bw | compile s | ours vs transformers | same greedy output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report["models"].items():
        for bs, r in m["ours"].items():
            lines.append(f"| {name} | ours (JAX) | {bs} | {r['tokens_per_s']:.1f} | "
                         f"{100 * r['fraction_of_physical_limit']:.1f}% | {r['ms_per_step_in_loop']:.2f} | "
                         f"{r['ms_forward_only']:.2f} | {r['ms_weights_at_bandwidth']:.2f} | {r['compile_s']:.1f} | | |")
        for part, label in (("hf_eager", "transformers eager"), ("hf_static", "transformers static cache, compiled")):
            for bs, r in m.get(part, {}).items():
                if "error" in r:
                    lines.append(f"| {name} | {label} | {bs} | failed: {r['error'][:120]} | | | | | | | |")
                    continue
                speedup = f"{r['ours_speedup']:.2f}x" if r.get("ours_speedup") else ""
                if r.get("best_ours_speedup"):
                    speedup += f" ({r['best_ours_speedup']:.2f}x with {r['best_ours'].split('(', 1)[1].rstrip(')')})"
                same = f"{r['identical_outputs']}/{len(r['outputs'])}" if r.get("identical_outputs") is not None else ""
                lines.append(f"| {name} | {label} | {bs} | {r['tokens_per_s']:.1f} | "
                             f"{100 * r['tokens_per_s'] / (int(bs) * m['physical_limit_tokens_per_s_batch1']):.1f}% | | | | - "
                             f"| {speedup} | {same} |")
        lines.append(f"| {name} | physical limit | 1 | {m['physical_limit_tokens_per_s_batch1']:.0f} | 100% | | | | - | | |")
    runs = {n: m.get("environment", env).get("time_utc") for n, m in report["models"].items()}
    if len(set(runs.values())) > 1:
        lines += ["", "Runs merged, one per model: " + "; ".join(f"{n} measured {t}" for n, t in runs.items()) + "."]
    lines += ["", "Compile s is the first call's compile time; a figure of a few seconds means the program came "
              "from JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) filled by an earlier run on "
              "the same machine. Speed and outputs are unaffected."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
