"""Tune a Spec-Bench method's gamma or tree shape on real models (`decoding.autotune` does the work).

    python -m experiments.autotune --method spec --gammas 1-8 --measure-top 2
    python -m experiments.autotune --method tree --depths 3-7 --top-ks 1,2,4,8 --nodes 16,32,48,64

Tuning and reporting sets are kept apart. The tuner runs on `--prompts` first-turn questions of
`--tune-subset` restricted to `--tune-categories` (by default four MT-bench categories that the
reference prompts do not use), spread one per category; `--report-subset` names the prompts the
chosen setting is reported on (default: reference16), and a report subset that shares a question
with the tuning prompts is refused. Both are recorded in `autotune.json` and `autotune.md`.

Each setting runs through the benchmark's method registry (`experiments.methods`), as a
Spec-Bench run would, with prompts padded to `--prompt-bucket` so each setting compiles once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from decoding import autotune, roofline

from . import environment, methods, questions, specbench

# MT-bench categories absent from the reference prompts (questions.REFERENCE16_CATEGORIES)
DEFAULT_TUNE_CATEGORIES = ("roleplay", "reasoning", "extraction", "stem")


class OverlapError(ValueError):
    """The tuning prompts and the report subset share a question."""


def generation_run(gen: methods.Generation) -> dict:
    """A `Generation`'s figures in the form `decoding.autotune.aggregate` adds up."""
    return {"new_tokens": sum(len(t) for t in gen.tokens), "run_s": gen.run_s,
            "target_forwards": gen.target_forwards, "extra": gen.extra}


def harness_measure(env, method: str, prompts: Sequence[list[int]], seed: int = 0) -> autotune.Measure:
    """measure(settings) that runs `method` with `settings` as its options on `prompts`
    (each warmed up first), through `experiments.methods`; `measure.prompts` are the prompts."""
    def measure(settings: dict) -> dict:
        item = ":".join([method, *(f"{k}={v}" for k, v in settings.items())])
        m = methods.parse(item).build(env)
        try:
            gens = []
            for p in prompts:
                m.warmup([p], seed)
                gens.append(m.generate([p], seed))
        finally:
            m.close()
        stats = autotune.aggregate([generation_run(g) for g in gens])
        stats["context"] = sum(len(p) for p in prompts) / len(prompts) + stats["new_tokens"] / len(prompts) / 2
        return stats
    measure.prompts = [list(p) for p in prompts]
    return measure


def spread(items: Sequence[questions.WorkItem], n: int) -> list[questions.WorkItem]:
    """n first-turn items taken one per category in turn (round robin, file order within one)."""
    by_cat: dict[str, list] = {}
    for it in items:
        if it.turn == 1:
            by_cat.setdefault(it.category, []).append(it)
    out, depth = [], 0
    while len(out) < n and any(depth < len(v) for v in by_cat.values()):
        out += [v[depth] for v in by_cat.values() if depth < len(v)][: n - len(out)]
        depth += 1
    return out


def check_disjoint(tuning: Sequence[questions.WorkItem], report: Sequence[questions.WorkItem],
                   report_subset: str) -> None:
    """Refuse a report subset that holds a question the tuner saw."""
    shared = sorted({it.question_id for it in tuning} & {it.question_id for it in report})
    if shared:
        raise OverlapError(
            f"the report subset {report_subset!r} shares question(s) {shared} with the tuning prompts: a setting "
            "tuned on a prompt would be reported on it. Tune on other questions (--tune-subset, "
            "--tune-categories) or report on another subset (--report-subset).")


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.autotune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="spec", help="spec, pld, layerskip (chain) or tree")
    p.add_argument("--target", default=specbench.DEFAULT_TARGET)
    p.add_argument("--draft", default=None, help="draft model ('none': no draft; default as in specbench)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tune-subset", default="mt_bench", choices=questions.SUBSETS,
                   help="the questions the tuning prompts are taken from")
    p.add_argument("--tune-categories", default=",".join(DEFAULT_TUNE_CATEGORIES),
                   help="comma-separated categories of the tuning prompts ('' for all of --tune-subset)")
    p.add_argument("--prompts", type=int, default=4, help="tuning prompts (first turns, one per category in turn)")
    p.add_argument("--report-subset", default="reference16", help=f"{', '.join(questions.SUBSETS)} or 'none': "
                   "the prompts the choice is reported on; refused if it shares a question with the tuning prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-bucket", type=int, default=1024,
                   help="pad every prompt to this many tokens, so each setting compiles one program (0: per prompt)")
    p.add_argument("--gammas", default="1-8")
    p.add_argument("--depths", default="2-7")
    p.add_argument("--top-ks", default="1,2,4,8")
    p.add_argument("--nodes", default="8,16,32,48,64")
    p.add_argument("--measure-top", type=int, default=2, help="measure the N best-predicted settings for real")
    p.add_argument("--profile", default="auto", help="auto, measure or a known device profile name")
    p.add_argument("--questions", default=None)
    p.add_argument("--out", default=None, help="output directory (default: experiments/results/autotune/...)")
    args = p.parse_args(argv)

    chain_methods = ("spec", "pld", "layerskip")
    if args.method != "tree" and args.method not in chain_methods:
        p.error(f"--method must be spec, pld, layerskip or tree, got {args.method!r}")
    if args.report_subset != "none" and args.report_subset not in questions.SUBSETS:
        p.error(f"--report-subset must be one of {', '.join(questions.SUBSETS)} or 'none', got {args.report_subset!r}")
    try:
        bank = questions.load_questions(args.questions)
        cats = [c for c in args.tune_categories.split(",") if c] or None
        chosen = spread(questions.select(bank, args.tune_subset, categories=cats, first_turn_only=True), args.prompts)
        if args.report_subset != "none":
            check_disjoint(chosen, questions.select(bank, args.report_subset), args.report_subset)
    except (questions.QuestionsError, OverlapError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    cfg = specbench.BenchConfig(target=args.target, draft=specbench.draft_from_arg(args.target, args.draft),
                                dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                                prompt_bucket=args.prompt_bucket)
    env = specbench.BenchEnv(cfg)
    prompts = [specbench.build_prompt(env.tokenizer, it, []) for it in chosen]
    info = environment.describe()
    device = specbench.device_profile(args.profile, info["device"]["device_kind"]) or roofline.measure_profile()
    measure = harness_measure(env, args.method, prompts)
    baseline = harness_measure(env, "ar", prompts)
    target = env.target.config
    bpp = roofline.dtype_bytes(args.dtype)
    try:
        if args.method == "tree":
            result = autotune.tune_tree(measure, target=target, device=device, draft=env.draft.config,
                                        depths=_int_list(args.depths), top_ks=_int_list(args.top_ks),
                                        node_budgets=_int_list(args.nodes), bytes_per_param=bpp,
                                        measure_top=args.measure_top, baseline=lambda: baseline({}))
        else:
            draft = {"spec": lambda: env.draft.config, "pld": lambda: None,
                     "layerskip": lambda: roofline.truncated(target, max(1, target.num_layers // 2))}[args.method]()
            result = autotune.tune_chain(measure, target=target, device=device, draft=draft,
                                         gammas=_int_list(args.gammas), bytes_per_param=bpp,
                                         measure_top=args.measure_top, baseline=lambda: baseline({}))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (questions.REPO_ROOT / "experiments" / "results" / "autotune"
                                           / f"{Path(args.target).stem}_{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    tuning = {"subset": args.tune_subset, "categories": cats, **result.prompts,
              "questions": [f"{it.question_id}/turn1" for it in chosen]}
    record = {"result": result.as_dict(), "device_profile": device.as_dict(), "environment": info,
              "config": {"method": args.method, "target": args.target, "draft": cfg.draft, "dtype": args.dtype,
                         "prompts": tuning["questions"], "tuning": tuning, "report_subset": args.report_subset,
                         "max_new_tokens": args.max_new_tokens, "prompt_bucket": args.prompt_bucket,
                         "sampling": "greedy"}}
    (out / "autotune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    report = ("" if args.report_subset == "none" else
              f"; report on {args.report_subset} (no question in common with the tuning prompts)")
    md = (f"# Autotuning {args.method} on {args.target} ({info['device']['device_kind']})\n\n"
          f"Device profile: {device.name}; calibration: {result.calibration_settings}; tuning prompts "
          f"({args.tune_subset}{', ' + ', '.join(cats) if cats else ''}): {', '.join(tuning['questions'])}"
          f"{report}; greedy, {args.max_new_tokens} new tokens.\n\n" + result.to_markdown())
    (out / "autotune.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
