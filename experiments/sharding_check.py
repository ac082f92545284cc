"""Does a mesh cost anything on one device? No mesh vs a 1-device mesh, in one process.

`decoding.sharding` must leave single-device speed where it was. This script loads the target
(and the draft) once, then measures, in the same process and on the same prompts, each method
with the models as loaded (no mesh) and laid out on a 1x1 ("data", "model") mesh
(`decoding.shard`): tokens/s of whole `generate` calls after a warm-up call per shape, and
whether the greedy outputs are identical. Methods: autoregressive, and the chain with the
0.5B draft (the best speculative method of experiments/results/specbench on these models).
Runs alternate between the two settings `--repeats` times and keep each one's best, so drift
of the machine does not favour either.

    python -m experiments.sharding_check                       # on the GPU: reference16 prompts
    python -m experiments.sharding_check --tiny --out /tmp/x   # CPU smoke test: tiny random models

Writes `<out>.json` and `<out>.md` (default experiments/results/sharding/sharding_check) after
every measured method, naming device and commit; a rerun with the same settings skips the
methods already measured (resumable).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from . import environment

METHODS = ("ar", "spec")


def tiny_models():
    """A tiny random target and draft sharing a vocabulary (no tokenizer): for the smoke test."""
    import decoding

    target_cfg = decoding.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    draft_cfg = decoding.ModelConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                     num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    target = decoding.Model(target_cfg, decoding.init_params(target_cfg, jax.random.PRNGKey(0), scale=0.5),
                            source="tiny-target")
    draft = decoding.Model(draft_cfg, decoding.init_params(draft_cfg, jax.random.PRNGKey(1), scale=0.5),
                           source="tiny-draft")
    prompts = [[int(t) for t in jax.random.randint(jax.random.PRNGKey(i), (5 + 3 * i,), 0, 96)] for i in range(4)]
    return target, draft, prompts


def strategy_of(method: str, gamma: int):
    import decoding
    import drafting

    return decoding.Autoregressive() if method == "ar" else decoding.Speculative(drafting.DraftModel(), gamma=gamma)


def measure(target, draft, prompts, method: str, args) -> dict:
    """(best of `repeats`) tokens/s with no mesh and with a 1-device mesh, and output identity."""
    import decoding
    from decoding import sharding
    from decoding.shapes import bucket as next_bucket

    mesh = sharding.make_mesh(data=1, model=1)
    sharded = {"target": decoding.shard(target, mesh), "draft": decoding.shard(draft, mesh) if draft else None}
    plain = {"target": target, "draft": draft}
    strategy = strategy_of(method, args.gamma)
    use_draft = method == "spec"
    bucket = next_bucket(max(len(p) for p in prompts))
    batches = [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]

    def run(models, timed: bool):
        tokens, run_s, compile_s, outs = 0, 0.0, 0.0, []
        for b in batches:
            res = decoding.generate(models["target"], b, strategy=strategy,
                                    draft=models["draft"] if use_draft else None,
                                    max_new_tokens=args.max_new_tokens, prompt_bucket=bucket,
                                    eos_token_id=() if args.tiny else None)
            if timed and res.stats.compile_s:
                raise RuntimeError("a timed call compiled: the warm-up did not cover its shape")
            tokens += res.stats.new_tokens
            run_s += res.stats.run_s
            compile_s += res.stats.compile_s
            outs.extend(res.tokens)
        return {"tokens": tokens, "run_s": run_s, "tokens_per_s": tokens / run_s, "compile_s": compile_s,
                "outputs": outs}

    out = {}
    for name, models in (("no_mesh", plain), ("mesh_1_device", sharded)):
        out[name] = {"compile_s": run(models, False)["compile_s"]}  # warm-up: compiles every shape
    best = {}
    for _ in range(args.repeats):
        for name, models in (("no_mesh", plain), ("mesh_1_device", sharded)):
            r = run(models, True)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    for name in best:
        out[name].update({k: v for k, v in best[name].items() if k not in ("outputs", "compile_s")})
    out["identical_outputs"] = best["no_mesh"]["outputs"] == best["mesh_1_device"]["outputs"]
    out["rows_identical"] = sum(a == b for a, b in zip(best["no_mesh"]["outputs"], best["mesh_1_device"]["outputs"]))
    out["rows"] = len(best["no_mesh"]["outputs"])
    out["mesh_over_no_mesh"] = out["mesh_1_device"]["tokens_per_s"] / out["no_mesh"]["tokens_per_s"]
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    dev = env.get("device", {})
    rev = env.get("git", {})
    s = report["settings"]
    lines = ["# One device: no mesh vs a 1-device mesh", "",
             f"Device: {dev.get('device_kind')} ({dev.get('platform')}); commit {rev.get('commit', rev)}; "
             f"target {s['target']}, draft {s['draft']}; prompts: {report['prompts']} x {report['n_prompts']}; "
             f"greedy; batch {s['batch']}; max_new_tokens {s['max_new_tokens']}; best of {s['repeats']}.", "",
             "| method | no mesh tok/s | 1-device mesh tok/s | mesh / no mesh | identical outputs "
             "| compile s (no mesh / mesh) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, r in report["methods"].items():
        lines.append(f"| {method} | {r['no_mesh']['tokens_per_s']:.1f} | {r['mesh_1_device']['tokens_per_s']:.1f} | "
                     f"{r['mesh_over_no_mesh']:.3f} | {r['rows_identical']}/{r['rows']} | "
                     f"{r['no_mesh']['compile_s']:.1f} / {r['mesh_1_device']['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the shared copy)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random models, token-id prompts")
    ap.add_argument("--out", default="experiments/results/sharding/sharding_check")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}.")
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "methods")}
    if args.tiny:
        settings.update(target="tiny-target", draft="tiny-draft")
    report = {"environment": environment.describe(), "settings": settings, "methods": {}}
    old = out.with_suffix(".json")
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("settings") == settings:  # same settings: keep what was measured, skip it
            report["methods"] = prev.get("methods", {})
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
    for method in methods:
        if method in report["methods"]:
            print(f"{method}: measured before, skipped", flush=True)
            continue
        r = measure(target, draft, prompts, method, args)
        r["environment"] = environment.describe()  # a resumed report keeps each method's own
        report["methods"][method] = r
        print(f"{method}: no mesh {r['no_mesh']['tokens_per_s']:.1f} tok/s, 1-device mesh "
              f"{r['mesh_1_device']['tokens_per_s']:.1f} tok/s ({r['mesh_over_no_mesh']:.3f}x), identical outputs "
              f"{r['rows_identical']}/{r['rows']}", flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
