"""DistillSpec on the real Qwen pair: distil the 0.5B draft toward the 1.5B target, then measure.

    python -m experiments.distillspec --out experiments/results/distillspec/h100 --steps 2000 --max-minutes 40
    python -m experiments.distillspec --toy --out /tmp/distillspec_toy            # tiny random models, CPU

Zhou et al. 2023 ("DistillSpec"); the stack is `distill` (docs/distill.md). One run:

  1. loads teacher (target) and student (draft) through `decoding.load` (registry names: the
     Q4_K_M GGUFs dequantized to bf16) and refuses a pair with different tokenizers;
  2. builds the data once (kept under <out>/data, reused by reruns): ShareGPT conversations
     and GSM8K train questions, split by a seeded shuffle into training conversations and a
     held-out *tuning* split (never reported as a result, never trained on); the training
     answers are written again by the target through `decoding.generate` (target-written,
     "fixed" data) unless --stored-answers;
  3. for every row of --rows, trains the student (a `distill.Trainer` under <out>/<row>/:
     checkpoints, metrics.jsonl, plot.png; rerunning resumes from the checkpoint; --steps and
     --max-minutes bound each row, and a row stopped by the time budget counts as trained at
     the step it reached), exports the drafter as a Hugging Face directory, and evaluates it:
       heldout   our speculative decoding on the tuning split for each gamma of --gammas,
                 against autoregressive decoding in the same process; the gamma with the
                 best speed is the row's gamma;
       specbench Spec-Bench through the harness's command line (`experiments.specbench`,
                 methods ar and spec:gamma=<the row's gamma>, at each --specbench-batch), in
                 <out>/<row>/specbench_b<B>/ (the harness resumes by itself);
  4. writes results.jsonl (one row per row x evaluation; present rows are skipped, so a rerun
     only does what is missing), summary.json, summary.md and summary.png.

Rows: `untrained` (the draft as it is), `fkl`, `tvd`, `rkl`, `jsd`, each optionally with
`:onpolicy=<fraction>` (student-written data for that fraction of the steps) and
`:lora=<rank>`. Default: untrained, fkl, tvd, fkl:onpolicy=0.5.

Exit codes: 0 done, 2 bad arguments, 130 interrupted (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from experiments.trainer_runs import (REPO, Results, add_dtype_and_rows, add_run_arguments, add_specbench_arguments,
                                      build_data, by_row, cast, device_name, finish_training, fmt, new_parser,
                                      plot_summary, run_specbench, split_list, train_config, trained, training_minutes,
                                      training_record, write_summary_files)
from experiments.trainer_runs import main as run_main

RESULTS = REPO / "experiments" / "results" / "distillspec"
DEFAULT_ROWS = ("untrained", "fkl", "tvd", "fkl:onpolicy=0.5")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a divergence (or the untrained draft), on-policy fraction, LoRA rank."""

    label: str
    divergence: str | None
    on_policy: float = 0.0
    lora: int = 0

    @classmethod
    def parse(cls, text: str) -> "Row":
        from distill.losses import DIVERGENCES

        name, *opts = text.split(":")
        if name != "untrained" and name not in DIVERGENCES:
            raise ValueError(f"unknown row {text!r}: use 'untrained' or a divergence ({', '.join(DIVERGENCES)}), "
                             "optionally with :onpolicy=<fraction> and :lora=<rank>.")
        kw = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "onpolicy":
                kw["on_policy"] = float(value)
            elif key == "lora":
                kw["lora"] = int(value)
            else:
                raise ValueError(f"row {text!r}: unknown option {key!r} (onpolicy=, lora=).")
        if name == "untrained" and kw:
            raise ValueError("the untrained row takes no options.")
        return cls(label=text, divergence=None if name == "untrained" else name, **kw)

    @property
    def slug(self) -> str:
        return self.label.replace(":", "_").replace("=", "")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def load_models(args):
    import jax.numpy as jnp

    import decoding
    import distill

    if args.toy:
        from experiments.toy import load_toy

        teacher, student = load_toy("toy"), load_toy("toy-draft")
    else:
        dtype = jnp.dtype(args.dtype)
        teacher, student = decoding.load(args.teacher, dtype=dtype), decoding.load(args.student, dtype=dtype)
    distill.check_pair(teacher, student)
    return teacher, student


# --------------------------------------------------------------------------------------------
# Training and evaluation of one row
# --------------------------------------------------------------------------------------------


def train_row(args, row: Row, teacher, student, packed, heldout, out: Path) -> dict:
    """Train (or resume) the row's student; returns the training record (cost included)."""
    import jax
    import jax.numpy as jnp

    import decoding
    import distill
    from distill.checkpoint import config_dict

    row_dir = out / row.slug
    done = trained(row_dir)
    if done is not None:
        return done
    cfg = train_config(args)
    lora = distill.LoRA(rank=row.lora, alpha=2.0 * row.lora) if row.lora else None
    recipe = distill.DistillSpec(student.config, teacher.config, distill.Divergence(row.divergence, args.temperature),
                                 lora=lora, options=decoding.Options.from_env())
    frozen_dtype = jnp.float32 if args.toy else jnp.bfloat16
    trainable, frozen = recipe.init(student.params, teacher.params, frozen_dtype=frozen_dtype)
    fixed = distill.Batches(packed, cfg.batch_size, cfg.accumulate, seed=args.seed)
    on_policy = distill.OnPolicy(row.on_policy, max_new_tokens=args.gen_tokens) if row.on_policy else None
    batches = distill.batch_source(recipe, fixed, frozen=frozen, tokenizer=teacher.tokenizer, on_policy=on_policy,
                                   prompts=heldout_free_prompts(args, packed, teacher) if on_policy else (),
                                   seed=args.seed, compute_dtype=jnp.dtype(cfg.compute_dtype))
    eval_prompts = heldout[: args.eval_prompts]

    def evaluate(params):
        drafter = decoding.Model(student.config, cast(recipe.student_params(params, frozen), student.dtype),
                                 teacher.tokenizer)
        return distill.acceptance(teacher, drafter, eval_prompts, gamma=args.eval_gamma,
                                  max_new_tokens=args.eval_tokens, batch_size=args.eval_batch)

    identity = {"student": config_dict(student.config), "teacher": config_dict(teacher.config),
                "row": row.label, "train": dataclasses.asdict(cfg), "temperature": args.temperature}
    trainer = distill.Trainer(recipe, cfg, trainable, frozen, batches, out_dir=row_dir, evaluate=evaluate,
                              identity=identity, progress=not args.no_progress)
    summary = trainer.run(max_minutes=args.max_minutes)
    minutes = training_minutes(row_dir, summary)
    drafter_params = cast(recipe.student_params(jax.device_get(trainer.params), frozen), student.dtype)
    distill.export_drafter(student.config, drafter_params, row_dir / "drafter", teacher.tokenizer,
                           dtype="float32" if args.toy else "bfloat16")
    record, last = training_record(row.label, summary, cfg, minutes, row_dir)
    record.update(final_train_acceptance=last.get("acceptance"), device=device_name())
    return finish_training(row_dir, record, summary, cfg)


def heldout_free_prompts(args, packed, teacher) -> list[list[int]]:
    """Prompts for on-policy data: the training sequences' prompts (their first segment up to
    the first assistant token), never the held-out split."""
    import numpy as np

    prompts = []
    for i in range(min(len(packed), 4096)):
        row = packed[i]
        seg, loss = np.asarray(row["segments"]), np.asarray(row["loss_mask"])
        first = np.flatnonzero((seg == 1) & (loss > 0))
        if len(first):
            end = int(first[0]) + 1
            if end <= args.max_prompt_len:
                prompts.append(np.asarray(row["tokens"])[:end].tolist())
    return prompts


def evaluate_heldout(args, teacher, drafter, heldout) -> dict:
    """Acceptance, tau and speed per gamma on the tuning split, and the gamma picked by speed."""
    import decoding
    import distill
    from decoding import shapes

    prompts = heldout[: args.tune_prompts]
    bucket = shapes.prompt_bucket(max(len(p) for p in prompts))
    ar_s = ar_tokens = 0
    for start in range(0, len(prompts), args.eval_batch):
        chunk = prompts[start:start + args.eval_batch]
        chunk = chunk + [chunk[-1]] * (args.eval_batch - len(chunk))
        if start == 0:  # compile outside the timing
            decoding.generate(teacher, chunk, max_new_tokens=args.eval_tokens, prompt_bucket=bucket)
        res = decoding.generate(teacher, chunk, max_new_tokens=args.eval_tokens, prompt_bucket=bucket)
        ar_s += res.stats.run_s
        ar_tokens += res.stats.new_tokens
    ar_tps = ar_tokens / ar_s
    per_gamma = {}
    for g in args.gammas:
        distill.acceptance(teacher, drafter, prompts[: args.eval_batch], gamma=g, max_new_tokens=args.eval_tokens,
                           batch_size=args.eval_batch, prompt_bucket=bucket)  # compile outside the timing
        r = distill.acceptance(teacher, drafter, prompts, gamma=g, max_new_tokens=args.eval_tokens,
                               batch_size=args.eval_batch, prompt_bucket=bucket)
        r["speedup"] = r["tokens_per_s"] / ar_tps
        per_gamma[g] = r
    best = max(per_gamma, key=lambda g: per_gamma[g]["speedup"])
    return {"ar_tokens_per_s": ar_tps, "per_gamma": {str(g): v for g, v in per_gamma.items()}, "gamma": best,
            **{k: per_gamma[best][k] for k in ("acceptance_rate", "acceptance_per_position", "tau", "speedup")}}


def spec_bench(args, row: Row, drafter_dir: Path, gamma: int, batch: int, out: Path) -> dict:
    """Spec-Bench for the row's drafter at its gamma; returns its overall figures per method."""
    sb = run_specbench(args, out / row.slug / f"specbench_b{batch}", batch, f"Spec-Bench run for {row.label} "
                       f"(batch {batch})", ["--target", args.teacher, "--draft", str(drafter_dir), "--methods",
                                            f"ar,spec:gamma={gamma}"])
    return {"gamma": gamma, "batch": batch, **sb}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def write_summary(out: Path, results: list[dict], args) -> dict:
    rows = by_row(results)
    lines = ["# DistillSpec: Qwen2.5-Coder-0.5B-Instruct distilled toward Qwen2.5-Coder-1.5B-Instruct"
             if not args.toy else "# DistillSpec (toy models: noise, not a result)", "",
             f"Command: `{args.command}`", "",
             "| row | steps | tokens seen | train tok/s | device | gamma (tuning split) | acceptance | tau | "
             "speedup (tuning) | acceptance per position |", "|" + "---|" * 10]
    for label, kinds in rows.items():
        t, h = kinds.get("train", {}), kinds.get("heldout", {})
        pos = ", ".join(f"{x:.2f}" for x in h.get("acceptance_per_position", []))
        lines.append(f"| {label} | {t.get('steps', '-')} | {t.get('tokens_seen', '-')} | "
                     f"{fmt(t.get('train_tokens_per_s'))} | {t.get('device', '-')} | {h.get('gamma', '-')} | "
                     f"{fmt(h.get('acceptance_rate'))} | {fmt(h.get('tau'))} | {fmt(h.get('speedup'))} | {pos} |")
    sb = [(label, k, v) for label, kinds in rows.items() for k, v in kinds.items() if k.startswith("specbench")]
    if sb:
        lines += ["", "Spec-Bench (never trained or tuned on), each against `ar` in the same process:", "",
                  "| row | batch | gamma | tau | speedup |", "|---|---|---|---|---|"]
        for label, _, v in sb:
            spec = next((d for m, d in v["methods"].items() if m.startswith("spec")), {})
            lines.append(f"| {label} | {v['batch']} | {v['gamma']} | {fmt(spec.get('tau'))} | "
                         f"{fmt(spec.get('speedup'))} |")
    summary = write_summary_files(out, lines, rows, args)

    def acceptance(ax, label, kinds):
        h = kinds.get("heldout")
        if h:
            pos = h["acceptance_per_position"]
            ax.plot(range(1, len(pos) + 1), pos, "o-", label=label)

    plot_summary(out, rows, lambda label: Row.parse(label).slug, loss_label="divergence",
                 right_title="acceptance (tuning split)", draw_right=acceptance)
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = new_parser("python -m experiments.distillspec", __doc__, RESULTS,
                   "tiny random models and a few GSM8K questions (CPU, seconds)")
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--student", default="qwen2.5-coder-0.5b-instruct")
    add_dtype_and_rows(p, DEFAULT_ROWS)
    add_run_arguments(p)
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the divergences")
    p.add_argument("--gammas", default="2,3,4,5,6,8", help="gammas tried on the tuning split")
    p.add_argument("--tune-prompts", type=int, default=32)
    add_specbench_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    return p


# Small settings for --toy (each only where the flag was left at its default).
TOY = dict(sources="gsm8k", limit_per_source=48, train_conversations=40, gen_tokens=16, gen_batch=8,
           max_prompt_len=448, heldout=8, seq_len=512, batch_size=2, accumulate=2, steps=6, lr=3e-3, warmup=1,
           log_every=2, eval_every=0, eval_prompts=4, eval_tokens=12, eval_batch=4, checkpoint_every=3,
           gammas="2,3", tune_prompts=4, specbench_batch="")


def check_arguments(args) -> None:
    args.gammas = [int(g) for g in split_list(args.gammas)]


def run(args, rows: list[Row], batches: list[int], out: Path, results: Results) -> None:
    """Every row: train (or record the untrained draft), tune gamma on the tuning split, Spec-Bench."""
    import distill

    teacher, student = load_models(args)
    packed, heldout = build_data(args, teacher, out)
    for row, have in results.each(rows):
        if row.divergence is None:
            if (row.label, "train") not in have:
                results.append({"row": row.label, "kind": "train", "steps": 0, "tokens_seen": 0,
                                "device": device_name()})
            drafter_dir, drafter = args.student, student  # Spec-Bench loads the draft as it is
        else:
            results.train(have, row.label, out / row.slug,
                          lambda: train_row(args, row, teacher, student, packed, heldout, out))
            drafter_dir = out / row.slug / "drafter"
            drafter = distill.load_drafter(drafter_dir, dtype=student.dtype, tokenizer=teacher.tokenizer)
        results.stage(have, row.label, "heldout", lambda: evaluate_heldout(args, teacher, drafter, heldout))
        gamma = results.get(row.label, "heldout")["gamma"]
        for b in batches:
            results.stage(have, row.label, f"specbench_b{b}", lambda: spec_bench(args, row, drafter_dir, gamma, b, out))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parser=parser, toy=TOY, parse_row=Row.parse, results_root=RESULTS, run=run,
                    summarize=write_summary, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
