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
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
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


def build_data(args, teacher, out: Path):
    """(packed training dataset, held-out tuning prompts as token lists); cached under out/data."""
    import datasets

    from distill import data as D

    cache = out / "data"
    packed_dir, heldout_file = cache / f"packed_{args.seq_len}", cache / "heldout.json"
    if packed_dir.is_dir() and heldout_file.is_file():
        return datasets.load_from_disk(str(packed_dir)).with_format("numpy"), json.loads(heldout_file.read_text())
    parts = [D.load_conversations(s, limit=args.limit_per_source) for s in args.sources]
    convs = datasets.concatenate_datasets(parts).shuffle(seed=args.seed)
    n_held = min(args.heldout, len(convs) // 4)
    held, train = convs.select(range(n_held)), convs.select(range(n_held, len(convs)))
    if args.train_conversations:
        train = train.select(range(min(args.train_conversations, len(train))))
    heldout = [p for p in (D.prompt_ids(teacher.tokenizer, e["messages"], args.max_prompt_len) for e in held) if p]
    if args.stored_answers:
        rows = D.render(train, teacher.tokenizer, args.seq_len)
    else:
        rows_dir = cache / "target_written"
        if rows_dir.is_dir():
            rows = datasets.load_from_disk(str(rows_dir))
        else:
            print(f"writing {len(train)} answers with the target ({args.gen_tokens} tokens each) ...", file=sys.stderr)
            rows = D.regenerate(train, teacher, max_new_tokens=args.gen_tokens, max_prompt_len=args.max_prompt_len,
                                batch_size=args.gen_batch)
            rows.save_to_disk(str(rows_dir))
    packed = D.pack(rows, args.seq_len)
    packed.save_to_disk(str(packed_dir))
    cache.mkdir(parents=True, exist_ok=True)
    heldout_file.write_text(json.dumps(heldout))
    return datasets.load_from_disk(str(packed_dir)).with_format("numpy"), heldout


# --------------------------------------------------------------------------------------------
# Training and evaluation of one row
# --------------------------------------------------------------------------------------------


def train_config(args, learning_rate: float | None = None):
    """The `distill.TrainConfig` of a drafter-training experiment's flags (`add_run_arguments`)."""
    import distill

    return distill.TrainConfig(steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate,
                               seq_len=args.seq_len, learning_rate=args.lr if learning_rate is None else learning_rate,
                               warmup_steps=args.warmup, compute_dtype="float32" if args.toy else "bfloat16",
                               seed=args.seed, log_every=args.log_every, eval_every=max(args.eval_every, 0),
                               checkpoint_every=args.checkpoint_every)


def training_minutes(row_dir: Path, summary: dict) -> float:
    """Append this session's training time to <row_dir>/sessions.jsonl and return the minutes
    of every session so far (the training cost of a run resumed over several sessions)."""
    from distill.trainer import read_jsonl

    with (row_dir / "sessions.jsonl").open("a") as f:
        f.write(json.dumps({"session_s": summary["session_s"], "steps": summary["session_steps"]}) + "\n")
    return sum(m["session_s"] for m in read_jsonl(row_dir / "sessions.jsonl")) / 60.0


def train_row(args, row: Row, teacher, student, packed, heldout, out: Path) -> dict:
    """Train (or resume) the row's student; returns the training record (cost included)."""
    import jax
    import jax.numpy as jnp

    import decoding
    import distill
    from distill.checkpoint import config_dict

    row_dir = out / row.slug
    done_file = row_dir / "trained.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
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
    metrics = distill.trainer.read_jsonl(row_dir / "metrics.jsonl")
    train_rows = [m for m in metrics if m.get("kind") == "train"]
    record = {"row": row.label, "steps": summary["step"], "stopped": summary["stopped"],
              "tokens_seen": summary["step"] * cfg.batch_size * cfg.accumulate * cfg.seq_len,
              "train_tokens_per_s": train_rows[-1]["tokens_per_s"] if train_rows else None,
              "train_minutes": minutes,
              "final_loss": train_rows[-1]["loss"] if train_rows else None,
              "final_train_acceptance": train_rows[-1].get("acceptance") if train_rows else None,
              "device": device_name()}
    if summary["step"] >= cfg.steps or summary["stopped"] == "time budget":
        done_file.write_text(json.dumps(record, indent=1))
    return record


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


def cast(params, dtype):
    import jax

    return jax.tree.map(lambda x: x.astype(dtype), params)


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


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


def run_specbench(args, row: Row, drafter_dir: Path, gamma: int, batch: int, out: Path) -> dict:
    """Spec-Bench through the harness's command line; returns its overall figures per method."""
    run_dir = out / row.slug / f"specbench_b{batch}"
    cmd = [sys.executable, "-m", "experiments.specbench", "--target", args.teacher, "--draft", str(drafter_dir),
           "--methods", f"ar,spec:gamma={gamma}", "--batch-size", str(batch), "--subset", args.specbench_subset,
           "--max-new-tokens", str(args.specbench_tokens), "--out", str(run_dir), "--no-progress"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        raise RuntimeError(f"Spec-Bench run for {row.label} (batch {batch}) exited with {rc}; rerun to resume it.")
    summary = json.loads((run_dir / "summary.json").read_text())["summary"]["methods"]
    return {"gamma": gamma, "batch": batch, "command": " ".join(cmd),
            "methods": {label: d.get("overall", {}) for label, d in summary.items()}}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    from distill.trainer import read_jsonl

    return read_jsonl(path)


def append_result(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_summary(out: Path, results: list[dict], args) -> dict:
    by_row: dict[str, dict] = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["kind"]] = r
    lines = ["# DistillSpec: Qwen2.5-Coder-0.5B-Instruct distilled toward Qwen2.5-Coder-1.5B-Instruct"
             if not args.toy else "# DistillSpec (toy models: noise, not a result)", "",
             f"Command: `{args.command}`", "",
             "| row | steps | tokens seen | train tok/s | device | gamma (tuning split) | acceptance | tau | "
             "speedup (tuning) | acceptance per position |", "|" + "---|" * 10]
    for label, kinds in by_row.items():
        t, h = kinds.get("train", {}), kinds.get("heldout", {})
        pos = ", ".join(f"{x:.2f}" for x in h.get("acceptance_per_position", []))
        lines.append(f"| {label} | {t.get('steps', '-')} | {t.get('tokens_seen', '-')} | "
                     f"{_fmt(t.get('train_tokens_per_s'))} | {t.get('device', '-')} | {h.get('gamma', '-')} | "
                     f"{_fmt(h.get('acceptance_rate'))} | {_fmt(h.get('tau'))} | {_fmt(h.get('speedup'))} | {pos} |")
    sb = [(label, k, v) for label, kinds in by_row.items() for k, v in kinds.items() if k.startswith("specbench")]
    if sb:
        lines += ["", "Spec-Bench (never trained or tuned on), each against `ar` in the same process:", "",
                  "| row | batch | gamma | tau | speedup |", "|---|---|---|---|---|"]
        for label, _, v in sb:
            spec = next((d for m, d in v["methods"].items() if m.startswith("spec")), {})
            lines.append(f"| {label} | {v['batch']} | {v['gamma']} | {_fmt(spec.get('tau'))} | "
                         f"{_fmt(spec.get('speedup'))} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"rows": by_row, "command": args.command, "toy": args.toy}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(out, by_row)
    return summary


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _plot(out: Path, by_row: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.trainer import read_jsonl

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, kinds in by_row.items():
        h = kinds.get("heldout")
        if h:
            pos = h["acceptance_per_position"]
            axes[1].plot(range(1, len(pos) + 1), pos, "o-", label=label)
        slug = Row.parse(label).slug
        train = [m for m in read_jsonl(out / slug / "metrics.jsonl") if m.get("kind") == "train"]
        if train:
            axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], label=label)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("divergence"), axes[0].set_title("training loss")
    axes[1].set_xlabel("draft position"), axes[1].set_ylabel("acceptance")
    axes[1].set_title("acceptance (tuning split)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser, *, seq_len: int = 1024, accumulate: int = 8, steps: int = 1000,
                      lr: float | None = 5e-5, lr_help: str = "learning rate", seq_len_help: str = "",
                      eval_every_help: str = "acceptance on held-out prompts every N steps (0: end)") -> None:
    """The data, training and evaluation flags every drafter-training experiment shares
    (`experiments.distillspec`, `experiments.feature_drafters`, `experiments.hidden_transfer`)."""
    p.add_argument("--sources", default="sharegpt,gsm8k")
    p.add_argument("--limit-per-source", type=int, default=None, help="first N conversations of each source")
    p.add_argument("--train-conversations", type=int, default=4000, help="training conversations (0 = all)")
    p.add_argument("--stored-answers", action="store_true", help="train on the answers as stored (no target rewrite)")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens per target-written answer")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--heldout", type=int, default=64, help="conversations held out as the tuning split")
    p.add_argument("--seq-len", type=int, default=seq_len, help=seq_len_help or "training sequence length")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=accumulate, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per row")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget per row")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250, help=eval_every_help)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-gamma", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=100)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.distillspec", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random models and a few GSM8K questions (CPU, seconds)")
    p.add_argument("--out", default=None, help=f"output folder (default {RESULTS}/<run>)")
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--student", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (see the module doc)")
    add_run_arguments(p)
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the divergences")
    p.add_argument("--gammas", default="2,3,4,5,6,8", help="gammas tried on the tuning split")
    p.add_argument("--tune-prompts", type=int, default=32)
    p.add_argument("--specbench-batch", default="1,8", help="Spec-Bench batch sizes ('' to skip Spec-Bench)")
    p.add_argument("--specbench-subset", default="all")
    p.add_argument("--specbench-tokens", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    return p


def toy_defaults(args) -> None:
    """Small settings for --toy (each only where the flag was left at its default)."""
    defaults = parser().parse_args([])
    small = dict(sources="gsm8k", limit_per_source=48, train_conversations=40, gen_tokens=16, gen_batch=8,
                 max_prompt_len=448, heldout=8, seq_len=512, batch_size=2, accumulate=2, steps=6, lr=3e-3, warmup=1,
                 log_every=2, eval_every=0, eval_prompts=4, eval_tokens=12, eval_batch=4, checkpoint_every=3,
                 gammas="2,3", tune_prompts=4, specbench_batch="")
    for k, v in small.items():
        if getattr(args, k) == getattr(defaults, k):
            setattr(args, k, v)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.command = "python -m experiments.distillspec " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.toy:
        toy_defaults(args)
    try:
        rows = [Row.parse(r) for r in args.rows.split(",") if r]
        args.sources = [s for s in args.sources.split(",") if s]
        args.gammas = [int(g) for g in str(args.gammas).split(",") if g]
        batches = [int(b) for b in str(args.specbench_batch).split(",") if b]
        if args.toy and batches:
            raise ValueError("Spec-Bench needs the real target: drop --specbench-batch with --toy.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / ("toy" if args.toy else "run")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    try:
        teacher, student = load_models(args)
        packed, heldout = build_data(args, teacher, out)
        for row in rows:
            have = {(r["row"], r["kind"]) for r in read_results(results_path)}
            t0 = time.perf_counter()
            if row.divergence is None:
                drafter_dir, drafter = None, student
                if (row.label, "train") not in have:
                    append_result(results_path, {"row": row.label, "kind": "train", "steps": 0, "tokens_seen": 0,
                                                 "device": device_name()})
                drafter_dir = args.student  # Spec-Bench loads the draft as it is
            else:
                if (row.label, "train") not in have:
                    record = train_row(args, row, teacher, student, packed, heldout, out)
                    if not (out / row.slug / "trained.json").is_file():
                        print(f"{row.label}: stopped at step {record['steps']}; rerun to continue.", file=sys.stderr)
                        return 130
                    append_result(results_path, {**record, "kind": "train"})
                import distill

                drafter_dir = out / row.slug / "drafter"
                drafter = distill.load_drafter(drafter_dir, dtype=student.dtype, tokenizer=teacher.tokenizer)
            if (row.label, "heldout") not in have:
                h = evaluate_heldout(args, teacher, drafter, heldout)
                append_result(results_path, {"row": row.label, "kind": "heldout", **h})
            gamma = next(r["gamma"] for r in read_results(results_path)
                         if r["row"] == row.label and r["kind"] == "heldout")
            for b in batches:
                if (row.label, f"specbench_b{b}") not in have:
                    sb = run_specbench(args, row, drafter_dir, gamma, b, out)
                    append_result(results_path, {"row": row.label, "kind": f"specbench_b{b}", **sb})
            print(f"{row.label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        write_summary(out, read_results(results_path), args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue.", file=sys.stderr)
        return 130
    print(out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
