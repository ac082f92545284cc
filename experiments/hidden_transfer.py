"""Hidden transfer on Qwen2.5-Coder-1.5B-Instruct: train transfer maps, then measure on Spec-Bench.

    python -m experiments.hidden_transfer --out experiments/results/hidden_transfer/h100 --steps 1000
    python -m experiments.hidden_transfer --toy --out /tmp/ht_toy          # tiny random model, CPU

Wu et al. 2024 ("Parallel Decoding via Hidden Transfer for Lossless Large Language Model
Acceleration"); the pieces are `drafting.hidden_transfer` (decoding) and
`distill.hidden_transfer` (training); the driver is `experiments.trainer_runs`. One run:

  1. loads the target through `decoding.load` (registry name; the toy target with --toy);
  2. builds the data once (under <out>/data, reused by reruns; `experiments.trainer_runs.build_data`):
     ShareGPT conversations and GSM8K train questions, a seeded split into training
     conversations and a held-out *tuning* split (never reported as a result, never trained
     on), the training answers written again by the target unless --stored-answers;
  3. for every row of --rows trains (a `distill.Trainer` under <out>/<row>/: checkpoints,
     metrics.jsonl, plot.png; a rerun resumes; --steps and --max-minutes bound each row):
       ht:layer=L:k=K   transfer maps at layer L (0 = the middle) for K pseudo positions
                        (`distill.HiddenTransferRecipe`), written to <row>/maps.safetensors;
       medusa:k=K       Medusa heads at the same training budget (same steps, batch, sequence
                        length, data; `distill.MedusaRecipe` with soft labels: the same target
                        distributions the maps' KL uses), <row>/heads.safetensors;
     then measures each row on the tuning split for every draft shape of --shapes that fits its
     depth (a chain `g3` or a static tree `4-2-2`) and, for maps, every --pseudo-modes (pseudo
     positions in the verify forward, the paper's, or in a separate partial forward), beside
     autoregressive decoding in the same process: tau, acceptance per future position,
     tokens/s, speedup; the fastest choice is the row's;
  4. runs Spec-Bench (all of it by default; `experiments.specbench`, which resumes by itself)
     once per --specbench-batch with `ar`, `pld`, every row's method at its shape and, with
     --eagle-head, an EAGLE-3-style head file, all in one process, so every speedup is over our
     autoregressive decoding measured beside it;
  5. writes results.jsonl (present rows are skipped: a rerun only does what is missing),
     summary.json and summary.md (training cost per row, the tuning-split table, the Spec-Bench
     table with acceptance per position).

Exit codes: 0 done, 2 bad arguments, 130 interrupted (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from experiments.trainer_runs import (REPO, Results, acceptance_per_position, add_dtype_and_rows, add_run_arguments,
                                      add_specbench_arguments, build_data, by_row, cast, device_name, finish_training,
                                      fmt, generate_timed, new_parser, run_specbench, split_list, train_config, trained,
                                      training_minutes, training_record, write_summary_files)
from experiments.trainer_runs import main as run_main

RESULTS = REPO / "experiments" / "results" / "hidden_transfer"
DEFAULT_ROWS = ("ht:layer=14:k=4", "ht:layer=20:k=4", "ht:layer=8:k=4", "medusa:k=4")
TOY_ROWS = ("ht:k=2", "medusa:k=2")


@dataclasses.dataclass(frozen=True)
class Row:
    """One trained drafter: hidden-transfer maps (layer, k) or Medusa heads (k)."""

    label: str
    kind: str  # "ht" | "medusa"
    k: int
    layer: int = 0  # 0: the target's middle layer

    @classmethod
    def parse(cls, text: str) -> "Row":
        name, *opts = text.split(":")
        if name not in ("ht", "medusa"):
            raise ValueError(f"unknown row {text!r}: use ht:layer=<L>:k=<K> or medusa:k=<K>.")
        kw = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "k" or (key == "layer" and name == "ht"):
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise ValueError(f"row {text!r}: {key} must be an integer, got {value!r}.") from None
            else:
                raise ValueError(f"row {text!r}: unknown option {key!r} ({'layer=, k=' if name == 'ht' else 'k='}).")
        if kw.get("k", 1) < 1:
            raise ValueError(f"row {text!r}: k must be >= 1.")
        return cls(label=text, kind=name, k=kw.get("k", 4), layer=kw.get("layer", 0))

    @property
    def slug(self) -> str:
        return self.label.replace(":", "_").replace("=", "")

    @property
    def file(self) -> str:
        return "maps.safetensors" if self.kind == "ht" else "heads.safetensors"


def parse_shape(text: str):
    """'g3' -> a chain of 3 (`decoding.Speculative`'s gamma); '4-2-2' -> static tree branching."""
    if text.startswith("g"):
        return ("chain", int(text[1:]))
    return ("tree", tuple(int(b) for b in text.split("-")))


def shape_depth(shape) -> int:
    return shape[1] if shape[0] == "chain" else len(shape[1])


def strategy_for(row: Row, shape, pseudo: str = "verify"):
    import decoding
    from drafting import HiddenTransfer, Medusa, TreeTopology

    drafter = HiddenTransfer(pseudo=pseudo) if row.kind == "ht" else Medusa()
    if shape[0] == "chain":
        return decoding.Speculative(drafter, gamma=shape[1])
    return decoding.TreeDecoding(drafter, tree=TreeTopology.from_branching(shape[1]))


def method_string(row: Row, shape, path: Path, pseudo: str = "verify") -> str:
    """The Spec-Bench method of a row (`experiments.methods`: ht / medusa)."""
    opt = f"gamma={shape[1]}" if shape[0] == "chain" else "tree=" + "-".join(map(str, shape[1]))
    if pseudo != "verify":
        opt += f":pseudo={pseudo}"
    return f"{row.kind}:{'maps' if row.kind == 'ht' else 'heads'}={path}:{opt}"


def split_choice(text: str) -> tuple[str, str]:
    """A tuning-split key 'g3' or 'g3/separate' -> (shape, pseudo mode)."""
    shape, _, pseudo = text.partition("/")
    return shape, pseudo or "verify"


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def load_target(args):
    import jax.numpy as jnp

    import decoding

    if args.toy:
        from experiments.toy import load_toy

        return load_toy("toy")
    return decoding.load(args.target, dtype=jnp.dtype(args.dtype))


def recipe_for(row: Row, target):
    import decoding
    import distill
    from drafting import hidden_transfer as ht
    from drafting import medusa

    options = decoding.Options.from_env()
    if row.kind == "ht":
        cfg = ht.config_for(target, row.k, layer=row.layer or None)
        return distill.HiddenTransferRecipe(target.config, cfg, options=options), cfg
    cfg = medusa.config_for(target, row.k)
    return distill.MedusaRecipe(target.config, cfg, soft=True, options=options), cfg


def load_drafter(row: Row, target, path: Path):
    from drafting import hidden_transfer as ht
    from drafting import medusa

    return ht.load_maps(path, target) if row.kind == "ht" else medusa.load_heads(path, target)


def train_row(args, row: Row, target, packed, heldout, out: Path) -> dict:
    """Train (or resume) the row's maps / heads; writes the file and returns the training record."""
    import jax
    import jax.numpy as jnp

    import distill
    from distill import hidden_transfer as dht
    from distill import medusa as dmedusa
    from distill.checkpoint import config_dict
    from drafting import HiddenTransfer, Medusa
    from drafting import hidden_transfer as ht
    from drafting import medusa

    row_dir = out / row.slug
    done = trained(row_dir)
    if done is not None:
        return done
    cfg = train_config(args)
    recipe, dcfg = recipe_for(row, target)
    trainable, frozen = recipe.init(target.params, frozen_dtype=jnp.float32 if args.toy else jnp.bfloat16)
    batches = distill.Batches(packed, cfg.batch_size, cfg.accumulate, seed=args.seed)
    eval_prompts = heldout[: args.eval_prompts]
    gamma = min(args.eval_gamma, row.k)

    def to_draft(params):
        if row.kind == "ht":
            return dht.drafter(target, recipe, params)
        return dmedusa.drafter(target, recipe, params)

    proposer = HiddenTransfer() if row.kind == "ht" else Medusa()

    def evaluate(params):
        return distill.acceptance(target, to_draft(params), eval_prompts, gamma=gamma, max_new_tokens=args.eval_tokens,
                                  batch_size=args.eval_batch, drafter=proposer)

    identity = {"target": config_dict(target.config), "row": row.label, "train": dataclasses.asdict(cfg),
                "drafter": dataclasses.asdict(dcfg)}
    trainer = distill.Trainer(recipe, cfg, trainable, frozen, lambda s, p: batches.batch(s), out_dir=row_dir,
                              evaluate=evaluate, identity=identity, progress=not args.no_progress)
    summary = trainer.run(max_minutes=args.max_minutes)
    minutes = training_minutes(row_dir, summary)
    params = jax.device_get(trainer.params)
    if row.kind == "ht":
        ht.save_maps(row_dir / row.file, dcfg, cast(recipe.map_params(params), jnp.float32))
    else:
        medusa.save_heads(row_dir / row.file, dcfg, cast(recipe.head_params(params), jnp.float32))
    record, last = training_record(row.label, summary, cfg, minutes, row_dir)
    record.update(final_train_top1={k: v for k, v in last.items() if k.startswith("top1_")},
                  trainable_params=int(dcfg.param_count()), device=device_name(), layer=getattr(dcfg, "layer", None),
                  k=row.k)
    return finish_training(row_dir, record, summary, cfg)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_heldout(args, row: Row, target, draft, heldout) -> dict:
    """Tau, acceptance per position, tokens/s and speedup over `ar` on the tuning split, per shape."""
    from decoding import shapes as dshapes

    prompts = heldout[: args.tune_prompts]
    bucket = dshapes.prompt_bucket(max(len(p) for p in prompts))
    kw = dict(max_new_tokens=args.eval_tokens, bucket=bucket)
    ar_tokens, ar_s, _, _ = generate_timed(target, prompts, args.eval_batch, **kw)
    ar_tps = ar_tokens / ar_s
    per_shape = {}
    choices = [(s, m) for s in args.shapes for m in (args.pseudo_modes if row.kind == "ht" else ["verify"])]
    for text, pseudo in choices:
        shape = parse_shape(text)
        if shape_depth(shape) > row.k:
            continue
        strategy = strategy_for(row, shape, pseudo)
        tokens, run_s, forwards, hist = generate_timed(target, prompts, args.eval_batch, strategy=strategy,
                                                       draft=draft, **kw)
        per_shape[text if pseudo == "verify" else f"{text}/{pseudo}"] = {
            "tau": tokens / max(forwards, 1), "tokens_per_s": tokens / run_s, "speedup": (tokens / run_s) / ar_tps,
            "acceptance_per_position": acceptance_per_position(hist)}
    if not per_shape:
        raise ValueError(f"no shape of --shapes {args.shapes} fits {row.label} (depth <= {row.k}).")
    best = max(per_shape, key=lambda s: per_shape[s]["speedup"])
    return {"ar_tokens_per_s": ar_tps, "per_shape": per_shape, "shape": best, **per_shape[best]}


def spec_bench(args, methods: list[str], batch: int, out: Path) -> dict:
    """Spec-Bench for every row's method at once; returns its overall figures per method."""
    sb = run_specbench(args, out / f"specbench_b{batch}", batch, f"Spec-Bench at batch {batch}",
                       ["--target", args.target, "--dtype", args.dtype, "--methods", ",".join(methods)])
    return {"batch": batch, **sb}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _pos(values) -> str:
    return ", ".join("-" if v is None else f"{v:.2f}" for v in values or [])


def write_summary(out: Path, results: list[dict], args) -> dict:
    rows = by_row(results)
    title = ("# Hidden transfer on Qwen2.5-Coder-1.5B-Instruct" if not args.toy
             else "# Hidden transfer (toy model: noise, not a result)")
    lines = [title, "", f"Command: `{args.command}`", "",
             "Training cost (each row at the same budget: steps x batch x sequence length):", "",
             "| row | steps | tokens seen | train minutes | train tok/s | trainable params | final loss | device |",
             "|" + "---|" * 8]
    for label, kinds in rows.items():
        t = kinds.get("train")
        if t:
            lines.append(f"| {label} | {t['steps']} | {t['tokens_seen']} | {fmt(t.get('train_minutes'))} | "
                         f"{fmt(t.get('train_tokens_per_s'))} | {t.get('trainable_params', '-')} | "
                         f"{fmt(t.get('final_loss'))} | {t.get('device', '-')} |")
    lines += ["", "Tuning split (held out from training; picks each row's shape), beside `ar` in the same process:",
              "", "| row | shape | tau | tok/s | speedup | acceptance per position |", "|---|---|---|---|---|---|"]
    for label, kinds in rows.items():
        h = kinds.get("heldout")
        for shape, d in (h or {}).get("per_shape", {}).items():
            mark = " (picked)" if shape == h["shape"] else ""
            lines.append(f"| {label} | {shape}{mark} | {fmt(d['tau'])} | {fmt(d['tokens_per_s'])} | "
                         f"{fmt(d['speedup'])} | {_pos(d['acceptance_per_position'])} |")
    for label, kinds in rows.items():
        for kind, v in kinds.items():
            if not kind.startswith("specbench"):
                continue
            lines += ["", f"Spec-Bench ({args.specbench_subset}, never trained or tuned on), batch {v['batch']}, "
                      "every speedup over `ar` of the same process:", "",
                      "| method | tau | tok/s | speedup | acceptance per position |", "|---|---|---|---|---|"]
            for m, o in v["methods"].items():
                lines.append(f"| {m} | {fmt(o.get('tau'))} | {fmt(o.get('tokens_per_s'))} | "
                             f"{fmt(o.get('speedup'))} | {_pos(o.get('acceptance_per_position'))} |")
    return write_summary_files(out, lines, rows, args)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = new_parser("python -m experiments.hidden_transfer", __doc__, RESULTS,
                   "the tiny random toy target and a few GSM8K questions (CPU)")
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    add_dtype_and_rows(p, DEFAULT_ROWS)
    p.add_argument("--shapes", default="g2,g3,g4,4-2-2,4-3-2-1", help="draft shapes tried on the tuning split")
    p.add_argument("--pseudo-modes", default="verify,separate",
                   help="hidden transfer's pseudo positions tried on the tuning split: in the verify forward "
                        "(the paper's) and/or in a separate partial forward (drafting.HiddenTransfer)")
    add_run_arguments(p, seq_len=512, accumulate=4, lr=1e-3,
                      seq_len_help="training sequence length (the pseudo forward costs T k (T + T k) attention per "
                                   "upper layer)")
    p.add_argument("--tune-prompts", type=int, default=32)
    p.add_argument("--eagle-head", default=None, help="an EAGLE-3-style head file to run beside (drafting.eagle)")
    add_specbench_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    return p


# Small settings for --toy (each only where the flag was left at its default).
TOY = dict(rows=",".join(TOY_ROWS), shapes="g1,g2,2-2", sources="gsm8k", limit_per_source=48, train_conversations=40,
           gen_tokens=16, gen_batch=8, max_prompt_len=448, heldout=8, seq_len=512, batch_size=2, accumulate=2,
           steps=6, lr=3e-3, warmup=1, log_every=2, eval_every=0, eval_prompts=4, eval_tokens=12, eval_batch=4,
           checkpoint_every=3, tune_prompts=4, specbench_batch="")


def check_arguments(args) -> None:
    args.shapes = split_list(args.shapes)
    args.pseudo_modes = split_list(args.pseudo_modes)
    bad = [m for m in args.pseudo_modes if m not in ("verify", "separate")]
    if bad or not args.pseudo_modes:
        raise ValueError(f"--pseudo-modes takes verify and/or separate, got {args.pseudo_modes}.")
    for s in args.shapes:
        parse_shape(s)


def run(args, rows: list[Row], batches: list[int], out: Path, results: Results) -> None:
    """Every row: train its maps or heads, pick its shape on the tuning split; then one Spec-Bench
    run per batch size with every row's method."""
    target = load_target(args)
    packed, heldout = build_data(args, target, out)
    methods = ["ar", "pld"]
    for row, have in results.each(rows):
        results.train(have, row.label, out / row.slug, lambda: train_row(args, row, target, packed, heldout, out))
        path = out / row.slug / row.file
        results.stage(have, row.label, "heldout",
                      lambda: evaluate_heldout(args, row, target, load_drafter(row, target, path), heldout))
        shape, pseudo = split_choice(results.get(row.label, "heldout")["shape"])
        methods.append(method_string(row, parse_shape(shape), path.resolve(), pseudo))
    if args.eagle_head:
        methods.append(f"eagle:head={Path(args.eagle_head).resolve()}")
    for b in batches:
        results.stage(results.have(), "specbench", f"specbench_b{b}", lambda: spec_bench(args, methods, b, out))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parser=parser, toy=TOY, parse_row=Row.parse, results_root=RESULTS, run=run,
                    summarize=write_summary, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
