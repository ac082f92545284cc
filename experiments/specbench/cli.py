"""The command line of the Spec-Bench runner: `python -m experiments.specbench ...` (see the
package docstring for what it does and its exit codes)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .. import methods as methods_mod
from .. import questions as qmod
from ..store import ResultsError, ResultsStore
from .config import DEFAULT_DRAFT, DEFAULT_TARGET, RESULTS_DIR, BenchConfig, draft_from_arg
from .identity import SettingsMismatch, read_run_meta
from .merge import fill_missing_methods, merge_runs
from .report import write_summary
from .runner import run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.specbench",
        description="Run Spec-Bench for a list of decoding methods and write a leaderboard (resumable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET, help="registry name, .gguf file, HF directory or 'toy'")
    p.add_argument("--draft", default=None,
                   help=f"draft model for spec/tree/hf_assisted; 'none' for no draft (default: {DEFAULT_DRAFT} for "
                        "the default target, toy-draft for the toy, else none)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods, comma- or space-separated, each NAME or NAME:key=value:... "
                        f"(default: {','.join(methods_mod.DEFAULT_METHODS)} + the transformers peers when "
                        "torch is installed)")
    p.add_argument("--baseline", default="ar", help="label of the method speedups are taken against")
    p.add_argument("--plugin", action="append", default=[], help="module that registers extra methods")
    p.add_argument("--list-methods", action="store_true", help="print the known methods and exit")
    p.add_argument("--questions", default=None, help=f"question file (default: {qmod.DEFAULT_QUESTIONS})")
    p.add_argument("--subset", default="all", choices=qmod.SUBSETS)
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep")
    p.add_argument("--question-ids", default=None, help="comma-separated question ids to keep")
    p.add_argument("--first-turn-only", action="store_true", help="skip MT-bench's second turns")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batching", default="category", choices=("category", "mixed"),
                   help="category: a batch holds one category (per-category times are exact; the 16 reference "
                        "prompts then make batches of two); mixed: batches filled to --batch-size in order (each "
                        "row is charged the batch's time / its rows)")
    p.add_argument("--phase-times", action="store_true",
                   help="also time each speculative phase (propose / verify / accept+commit) as a separate "
                        "program on the first batch; recorded in events.jsonl")
    p.add_argument("--prompt-bucket", type=int, default=0,
                   help="pad every prompt to at least this many tokens (one compiled program per method "
                        "instead of one per prompt-length bucket); 0 = automatic buckets")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="plain text prompts instead of the chat template")
    p.add_argument("--out", default=None, help=f"output directory (default: under {RESULTS_DIR})")
    p.add_argument("--repair", action="store_true",
                   help="keep the valid rows of a damaged results file (the original is moved to .bak)")
    p.add_argument("--profile", default="auto",
                   help="device profile for roofline predictions: auto, measure, none, or a known name")
    p.add_argument("--summarize-only", action="store_true", help="rewrite the summary of --out and exit")
    p.add_argument("--merge", default=None, metavar="RUN_DIR",
                   help="add the rows of another run folder with the same settings to --out (a run continued "
                        "on another machine), rewrite the summary and exit")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing method")
    p.add_argument("--tuned-on", default=None, choices=qmod.SUBSETS,
                   help="the subset the methods' settings were tuned on: the report adds the figures without "
                        "every turn of its questions (held out)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        target=args.target, draft=draft_from_arg(args.target, args.draft), dtype=args.dtype,
        methods=args.methods or (), baseline=args.baseline, questions=args.questions, subset=args.subset,
        per_category=args.per_category,
        categories=[c for c in args.categories.split(",") if c] if args.categories else None,
        question_ids=[int(i) for i in args.question_ids.split(",") if i] if args.question_ids else None,
        first_turn_only=args.first_turn_only, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        batching=args.batching,
        prompt_bucket=args.prompt_bucket, phase_times=args.phase_times, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=not args.no_chat,
        out=args.out, repair=args.repair, profile=args.profile, fail_fast=args.fail_fast,
        progress=not args.no_progress, tuned_on=args.tuned_on)


def _prepare_memory(resolved: Sequence[methods_mod.Resolved]) -> None:
    """With PyTorch peers in the run, keep JAX from reserving most of the GPU up front."""
    if any(r.spec.uses_torch for r in resolved) and "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = lambda msg: print(f"error: {msg}", file=sys.stderr)  # noqa: E731
    try:
        for module in args.plugin:
            methods_mod.load_plugin(module)
        if args.list_methods:
            for name, spec in sorted(methods_mod.registered().items()):
                opts = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
                print(f"{name:12s} {spec.description}" + (f" [{opts}]" if opts else ""))
            return 0
        cfg = config_from_args(args)
        if args.merge:
            merge_runs(cfg.out_dir(), Path(args.merge), log=lambda m: print(m, file=sys.stderr))
        if args.summarize_only or args.merge:
            out_dir = cfg.out_dir()
            meta = read_run_meta(out_dir)
            if meta is None:
                err(f"{out_dir} has no run.json: nothing to summarize.")
                return 2
            with ResultsStore.open(out_dir / "results.jsonl", repair_file=cfg.repair) as store:
                fill_missing_methods(out_dir, meta, store.rows(), log=lambda m: print(m, file=sys.stderr))
                write_summary(out_dir, store.rows(), meta, cfg.baseline,
                              meta["identity"]["sampling"]["temperature"] == 0, tuned_on=cfg.tuned_on)
            print(out_dir / "summary.md")
            return 0
        _prepare_memory(methods_mod.resolve(cfg.methods or methods_mod.default_methods(), check=False))
        result = run(cfg)
    except KeyboardInterrupt:
        err("interrupted; the finished rows are saved: rerun the same command to continue.")
        return 130
    except ResultsError as e:
        err(str(e))
        return 3
    except (methods_mod.MethodSpecError, methods_mod.MethodUnavailable, qmod.QuestionsError, SettingsMismatch,
            ValueError) as e:
        err(str(e))
        return 2
    return 1 if result["failed"] else 0
