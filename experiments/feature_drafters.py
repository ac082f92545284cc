"""Feature drafters on the real target: train an EAGLE-3-style head and Medusa heads, then measure.

    python -m experiments.feature_drafters --out experiments/results/feature_drafters/h100 \
        --rows eagle,medusa --steps 2000 --max-minutes 30
    python -m experiments.feature_drafters --toy --out /tmp/feature_drafters_toy   # tiny random target, CPU

EAGLE-3 (Li et al. 2025) and Medusa (Cai et al. 2024); the heads are `drafting.eagle` and
`drafting.medusa`, their recipes `distill.EagleRecipe` and `distill.MedusaRecipe` on the shared
trainer (docs/drafters.md, docs/distill.md). One run:

  1. loads the target through `decoding.load` (registry name: the Q4_K_M GGUF dequantized to
     bf16);
  2. builds the data once (under <out>/data, reused by reruns; `experiments.trainer_runs`'
     builder): ShareGPT conversations and GSM8K train questions, split by a seeded shuffle into
     training conversations and a held-out *tuning* split (never trained on, never reported as
     a result); the answers are written again by the target (`--stored-answers` keeps the
     stored ones);
  3. for every row of --rows trains the head (a `distill.Trainer` under <out>/<row>/:
     checkpoints, metrics.jsonl, plot.png; a rerun resumes; --steps and --max-minutes bound
     each row, and a row stopped by the time budget counts as trained at the step it reached),
     writes the head file (<out>/<row>/head.safetensors, bf16), and tunes on the tuning split:
     every gamma of --gammas (chains) and every shape of --trees (EAGLE-2 dynamic trees,
     depth x top_k x nodes), each against autoregressive decoding in the same process; the
     fastest chain and the fastest tree are the row's settings;
  4. runs Spec-Bench through the harness's command line (`experiments.specbench`, methods
     `ar`, the row's chain and the row's tree, at each --specbench-batch) in
     <out>/<row>/specbench_b<B>/ (the harness resumes by itself);
  5. writes results.jsonl (one record per row x stage; present records are skipped, so a
     rerun does only what is missing), summary.json, summary.md and summary.png.

Rows: `eagle` (options `:ttt=<unrolled steps>`, `:lr=<rate>`) and `medusa` (`:heads=<k>`,
`:soft=1` for the target's distributions as labels, `:lr=`). Default: eagle, medusa.
Training cost (device, minutes, tokens) is recorded per row.

Exit codes: 0 done, 2 bad arguments, 130 interrupted or stopped by the time budget mid-row
(rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from experiments.trainer_runs import (REPO, Results, acceptance_per_position, add_dtype_and_rows, add_run_arguments,
                                      add_specbench_arguments, build_data, by_row, device_name, finish_training, fmt,
                                      generate_timed, new_parser, plot_summary, run_specbench, split_list, train_config,
                                      trained, training_minutes, training_record, write_summary_files)
from experiments.trainer_runs import main as run_main

RESULTS = REPO / "experiments" / "results" / "feature_drafters"
DEFAULT_ROWS = ("eagle", "medusa")
DEFAULT_LR = {"eagle": 3e-4, "medusa": 1e-3}


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a head kind and its training options."""

    label: str
    kind: str
    ttt: int = 3
    heads: int = 4
    soft: bool = False
    lr: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Row":
        kind, *opts = text.split(":")
        if kind not in DEFAULT_LR:
            raise ValueError(f"unknown row {text!r}: use eagle (options ttt=, lr=) or medusa (heads=, soft=, lr=).")
        allowed = {"eagle": ("ttt", "lr"), "medusa": ("heads", "soft", "lr")}[kind]
        kw = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in allowed:
                raise ValueError(f"row {text!r}: unknown option {key!r} ({kind} takes {', '.join(allowed)}).")
            kw[key] = float(value) if key == "lr" else bool(int(value)) if key == "soft" else int(value)
        row = cls(label=text, kind=kind, **kw)
        if row.ttt < 1 or row.heads < 1:
            raise ValueError(f"row {text!r}: ttt and heads must be >= 1.")
        return row

    @property
    def slug(self) -> str:
        return self.label.replace(":", "_").replace("=", "")


def parse_tree(text: str) -> tuple[int, int, int]:
    """'6x8x48' -> (depth, top_k, nodes)."""
    try:
        depth, top_k, nodes = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"tree shape {text!r}: write depth x top_k x nodes, e.g. 6x8x48.") from None
    return depth, top_k, nodes


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def recipe_for(row: Row, target, options=None):
    import distill
    from drafting import eagle, medusa

    if row.kind == "eagle":
        weights = tuple(round(0.8 ** i, 6) for i in range(row.ttt))  # EAGLE-3's step weights
        return distill.EagleRecipe(target.config, eagle.config_for(target), weights=weights, options=options)
    return distill.MedusaRecipe(target.config, medusa.config_for(target, row.heads), soft=row.soft, options=options)


def head_model(row: Row, target, recipe, params):
    """The trained head as the `draft=` model."""
    from distill import eagle as eagle_recipe
    from distill import medusa as medusa_recipe

    return (eagle_recipe if row.kind == "eagle" else medusa_recipe).drafter(target, recipe, params)


def proposer(row: Row):
    import drafting

    return drafting.Eagle() if row.kind == "eagle" else drafting.Medusa()


def save_head(row: Row, recipe, params, path: Path) -> Path:
    from drafting import eagle, medusa

    head = recipe.head_params(params)
    if row.kind == "eagle":
        return eagle.save_head(path, recipe.head, head)
    return medusa.save_heads(path, recipe.heads, head)


def train_row(args, row: Row, target, packed, heldout, out: Path) -> dict:
    """Train (or resume) the row's head; returns the training record (cost included)."""
    import jax
    import jax.numpy as jnp

    import decoding
    import distill
    from distill.checkpoint import config_dict

    row_dir = out / row.slug
    done = trained(row_dir)
    if done is not None:
        return done
    cfg = train_config(args, row.lr or args.lr or DEFAULT_LR[row.kind])
    recipe = recipe_for(row, target, decoding.Options.from_env())
    frozen_dtype = jnp.float32 if args.toy else jnp.bfloat16
    if row.kind == "eagle":
        trainable, frozen = recipe.init(target.params, jax.random.PRNGKey(args.seed), frozen_dtype=frozen_dtype)
    else:
        trainable, frozen = recipe.init(target.params, frozen_dtype=frozen_dtype)
    batches = distill.Batches(packed, cfg.batch_size, cfg.accumulate, seed=args.seed)
    eval_prompts = heldout[: args.eval_prompts]
    eval_gamma = min(args.eval_gamma, row.heads) if row.kind == "medusa" else args.eval_gamma  # k heads: <= k deep

    def evaluate(params):
        return distill.acceptance(target, head_model(row, target, recipe, params), eval_prompts,
                                  gamma=eval_gamma, max_new_tokens=args.eval_tokens, batch_size=args.eval_batch,
                                  drafter=proposer(row))

    identity = {"target": config_dict(target.config), "row": row.label, "train": dataclasses.asdict(cfg)}
    trainer = distill.Trainer(recipe, cfg, trainable, frozen, lambda step, params: batches.batch(step),
                              out_dir=row_dir, evaluate=evaluate if args.eval_every >= 0 else None, identity=identity, progress=not args.no_progress)
    summary = trainer.run(max_minutes=args.max_minutes)
    minutes = training_minutes(row_dir, summary)
    head_file = save_head(row, recipe, jax.device_get(trainer.params), row_dir / "head.safetensors")
    record, last = training_record(row.label, summary, cfg, minutes, row_dir)
    record.update(final_top1={k: v for k, v in last.items() if k.startswith("top1_")},
                  learning_rate=cfg.learning_rate, head_file=str(head_file), head_file_bytes=head_file.stat().st_size,
                  device=device_name())
    return finish_training(row_dir, record, summary, cfg)


# --------------------------------------------------------------------------------------------
# Tuning (held-out tuning split) and Spec-Bench
# --------------------------------------------------------------------------------------------


def timed(target, prompts, *, strategy=None, draft=None, batch: int, tokens: int, bucket: int) -> dict:
    """Tokens, tau and tokens/s of `decoding.generate` over `prompts` (`trainer_runs.generate_timed`),
    with the acceptance per position where the strategy reports its accept histogram."""
    new, run_s, forwards, hist = generate_timed(target, prompts, batch, strategy=strategy, draft=draft,
                                                max_new_tokens=tokens, bucket=bucket)
    out = {"tokens": int(new), "tau": new / forwards if forwards else None, "tokens_per_s": new / run_s}
    if hist is not None:
        out["acceptance_per_position"] = acceptance_per_position(hist)
    return out


def tune(args, row: Row, target, head, heldout) -> dict:
    """Chains (--gammas) and dynamic trees (--trees) on the tuning split, against `ar`."""
    import decoding
    import drafting
    from decoding import shapes

    prompts = heldout[: args.tune_prompts]
    bucket = shapes.prompt_bucket(max(len(p) for p in prompts))
    kw = dict(batch=args.eval_batch, tokens=args.eval_tokens, bucket=bucket)
    ar = timed(target, prompts, **kw)
    chains, trees = {}, {}
    max_gamma = row.heads if row.kind == "medusa" else None
    for g in args.gammas:
        if max_gamma is not None and g > max_gamma:
            continue
        r = timed(target, prompts, strategy=decoding.Speculative(proposer(row), gamma=g), draft=head, **kw)
        chains[str(g)] = {**r, "speedup": r["tokens_per_s"] / ar["tokens_per_s"]}
    for text in args.trees:
        depth, top_k, nodes = parse_tree(text)
        if max_gamma is not None and depth > max_gamma:
            continue
        strategy = decoding.TreeDecoding(proposer(row), tree=drafting.DynamicTree(depth=depth, top_k=top_k,
                                                                                  total_tokens=nodes))
        r = timed(target, prompts, strategy=strategy, draft=head, **kw)
        trees[text] = {**r, "speedup": r["tokens_per_s"] / ar["tokens_per_s"]}
    best_chain = max(chains, key=lambda g: chains[g]["speedup"]) if chains else None
    best_tree = max(trees, key=lambda t: trees[t]["speedup"]) if trees else None
    return {"ar_tokens_per_s": ar["tokens_per_s"], "chains": chains, "trees": trees, "gamma": best_chain,
            "tree": best_tree, "prompts": len(prompts)}


def specbench_methods(row: Row, head_file: Path, tuned: dict) -> list[str]:
    """`ar`, the tuned chain and the tuned dynamic tree as the harness's head-file methods."""
    head = f"eagle:head={head_file}" if row.kind == "eagle" else f"medusa:heads={head_file}"
    methods = ["ar"]
    if tuned.get("gamma"):
        methods.append(f"{head}:gamma={tuned['gamma']}:depth=0")
    if tuned.get("tree"):
        depth, top_k, nodes = parse_tree(tuned["tree"])
        methods.append(f"{head}:depth={depth}:top_k={top_k}:nodes={nodes}")
    return methods


def spec_bench(args, row: Row, methods: list[str], batch: int, out: Path) -> dict:
    """Spec-Bench for the row's methods; returns its overall figures per method."""
    sb = run_specbench(args, out / row.slug / f"specbench_b{batch}", batch,
                       f"Spec-Bench run for {row.label} (batch {batch})",
                       ["--target", args.target, "--methods", ",".join(methods)],
                       ["--questions", args.questions] if args.questions else [])
    return {"batch": batch, **sb}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def write_summary(out: Path, results: list[dict], args) -> dict:
    rows = by_row(results)
    title = ("# Feature drafters for " + args.target) if not args.toy else "# Feature drafters (toy target: noise, not a result)"
    lines = [title, "", f"Command: `{args.command}`", "",
             "Training (cost per row) and tuning on the held-out tuning split (never trained on; the settings "
             "chosen here are the ones Spec-Bench measures):", "",
             "| row | steps | tokens seen | train tok/s | minutes | device | head file MB | best chain (gamma: tau, "
             "speedup) | best tree (shape: tau, speedup) |", "|" + "---|" * 9]
    for label, kinds in rows.items():
        t, h = kinds.get("train", {}), kinds.get("tuning", {})
        chain = h.get("chains", {}).get(str(h.get("gamma")), {})
        tree = h.get("trees", {}).get(str(h.get("tree")), {})
        mb = t.get("head_file_bytes")
        lines.append(f"| {label} | {t.get('steps', '-')} | {t.get('tokens_seen', '-')} | "
                     f"{fmt(t.get('train_tokens_per_s'))} | {fmt(t.get('train_minutes'))} | {t.get('device', '-')} | "
                     f"{fmt(mb / 2**20 if mb else None)} | {h.get('gamma', '-')}: {fmt(chain.get('tau'))}, "
                     f"{fmt(chain.get('speedup'))}x | {h.get('tree', '-')}: {fmt(tree.get('tau'))}, "
                     f"{fmt(tree.get('speedup'))}x |")
    sb = [(label, v) for label, kinds in rows.items() for k, v in kinds.items() if k.startswith("specbench")]
    if sb:
        lines += ["", "Spec-Bench (never trained or tuned on), each method against `ar` in the same process "
                  "(speedup = tokens/s ratio):", "", "| row | batch | method | tau | tokens/s | speedup |",
                  "|---|---|---|---|---|---|"]
        for label, v in sb:
            for m, d in v["methods"].items():
                lines.append(f"| {label} | {v['batch']} | {m.split(':')[0]}{_settings(m)} | {fmt(d.get('tau'))} | "
                             f"{fmt(d.get('tokens_per_s'))} | {fmt(d.get('speedup'))} |")
    summary = write_summary_files(out, lines, rows, args)

    def chain_acceptance(ax, label, kinds):
        h = kinds.get("tuning")
        chain = h and h.get("chains", {}).get(str(h.get("gamma")))
        if chain and chain.get("acceptance_per_position"):
            pos = chain["acceptance_per_position"]
            ax.plot(range(1, len(pos) + 1), [p if p is not None else float("nan") for p in pos], "o-",
                    label=f"{label}, chain gamma {h['gamma']}")

    plot_summary(out, rows, lambda label: Row.parse(label).slug, loss_label="loss", right_title="tuning split",
                 draw_right=chain_acceptance)
    return summary


def _settings(method: str) -> str:
    """The options of a head method without its file path."""
    parts = [p for p in method.split(":")[1:] if not p.startswith(("head=", "heads="))]
    return (":" + ":".join(parts)) if parts else ""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = new_parser("python -m experiments.feature_drafters", __doc__, RESULTS,
                   "a tiny random target and a few GSM8K questions (CPU)")
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    add_dtype_and_rows(p, DEFAULT_ROWS)
    add_run_arguments(p, accumulate=4, steps=2000, lr=None, lr_help="learning rate (default: eagle 3e-4, medusa 1e-3)",
                      eval_every_help="acceptance on held-out prompts every N steps (0: at the end only; -1: never, "
                                      "the tuning stage measures it)")
    p.add_argument("--gammas", default="3,4,5,6", help="chain lengths tried on the tuning split")
    p.add_argument("--trees", default="5x4x32,6x8x48", help="dynamic tree shapes (depth x top_k x nodes) tried")
    p.add_argument("--tune-prompts", type=int, default=32)
    add_specbench_arguments(p)
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: ../shared/data/...)")
    p.add_argument("--no-progress", action="store_true")
    return p


# Small settings for --toy (each only where the flag was left at its default); the toy target's
# answers are noise, so the stored ones are as good as rewritten ones.
TOY = dict(sources="gsm8k", limit_per_source=48, train_conversations=40, max_prompt_len=448, heldout=8,
           seq_len=512, batch_size=2, accumulate=1, steps=4, warmup=1, log_every=2, eval_every=0,
           eval_prompts=4, eval_tokens=12, eval_batch=4, checkpoint_every=2, gammas="2,3", trees="2x2x4",
           tune_prompts=4, specbench_batch="", stored_answers=True)


def check_arguments(args) -> None:
    args.gammas = [int(g) for g in split_list(args.gammas)]
    args.trees = split_list(args.trees)
    for t in args.trees:
        parse_tree(t)


def run(args, rows: list[Row], batches: list[int], out: Path, results: Results) -> None:
    """Every row: train the head, tune chains and trees on the tuning split, Spec-Bench."""
    import jax.numpy as jnp

    import decoding
    from drafting import eagle, medusa

    if args.toy:
        from experiments.toy import load_toy

        target = load_toy("toy")
    else:
        target = decoding.load(args.target, dtype=jnp.dtype(args.dtype))
    packed, heldout = build_data(args, target, out)
    for row, have in results.each(rows):
        results.train(have, row.label, out / row.slug, lambda: train_row(args, row, target, packed, heldout, out))
        head_file = out / row.slug / "head.safetensors"
        head = (eagle.load_head if row.kind == "eagle" else medusa.load_heads)(head_file, target)
        results.stage(have, row.label, "tuning", lambda: tune(args, row, target, head, heldout))
        tuned = results.get(row.label, "tuning")
        for b in batches:
            results.stage(have, row.label, f"specbench_b{b}",
                          lambda: spec_bench(args, row, specbench_methods(row, head_file, tuned), b, out))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parser=parser, toy=TOY, parse_row=Row.parse, results_root=RESULTS, run=run,
                    summarize=write_summary, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
