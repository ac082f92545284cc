"""Leaderboard math, Markdown and plots for benchmark result rows.

Definitions (each figure is a ratio of sums over rows, never a mean of ratios):
  * a row is one (method, question, turn); N = its new tokens (EOS included), F = the target
    calls that served it (prefill included), T = its time: the wall time of the call that
    produced it, compilation excluded, divided by the call's batch size;
  * tokens/s = sum N / sum T;
  * tau (mean accepted tokens per target call, bonus token included; 1.00 for
    autoregressive decoding) = sum N / sum F. With batch > 1 every row is charged all calls
    of its batch, so tau is then a lower bound;
  * speedup of method M over the baseline B (autoregressive, measured in the same run) on a
    set of questions = sum T_B / sum T_M over the (question, turn) pairs both have: how much
    less time M needs for the same questions;
  * speedup_tps = (sum N_M / sum T_M) / (sum N_B / sum T_B) over the same pairs: the ratio of
    tokens/s. The two are equal when M's outputs have B's lengths (always for lossless greedy
    methods whose outputs match); every report and doc quotes `speedup` unless it says otherwise;
  * speedup_specbench = mean over questions of (N / T of the question's turns) for M, over the
    same mean for B, on the questions both have: Spec-Bench's own formula (a ratio of mean
    per-question tokens/s), given beside the two above;
  * per-category and per-task figures take the rows of that category / task; "overall" takes
    all rows (so categories weigh by their time, as in Spec-Bench).
Greedy check: with greedy decoding every method's output tokens must equal the baseline's on
each (question, turn); mismatches are counted and listed.

Tuning vs reporting: `add_held_out` adds the same figures without every turn of the questions
the methods' settings were tuned on, so a report can give held-out figures beside the full ones.
The report's header names the weights (`weights_text`) and the code that wrote the rows
(`code_text`: a commit, and whether the tree had uncommitted changes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Collection, Iterable, Sequence

from . import questions as qmod
from .questions import CATEGORIES, TASK_NAMES, TASKS, task_of

SPEEDUP_DEFINITION = ("speedup = sum of the baseline's time / sum of the method's time over the (question, turn) "
                      "pairs both have (a ratio of times, compilation excluded); speedup_tps, the ratio of "
                      "tokens/s over the same pairs, and speedup_specbench, Spec-Bench's ratio of mean "
                      "per-question tokens/s, are in the roofline table; they differ when outputs differ in length")

DEFINITIONS = {
    "time_s": "wall time of the call that produced the row, compilation excluded, / batch size",
    "tokens_per_s": "sum of new tokens / sum of time_s",
    "tau": "sum of new tokens / sum of target calls (prefill included; 1.00 = autoregressive)",
    "speedup": "sum of baseline time_s / sum of method time_s over the (question, turn) pairs both have",
    "speedup_tps": "method tokens/s / baseline tokens/s over the same pairs",
    "speedup_specbench": "mean over shared questions of the method's per-question tokens/s (turns pooled) / the "
                         "same mean for the baseline: Spec-Bench's formula",
    "greedy = baseline": "outputs whose tokens equal the baseline's for the same (question, turn), of those compared; "
                         "in bf16 verifying several positions rounds differently from decoding one, so near-ties flip",
    "roofline prediction of speedup": "the method's roofline tokens/s / the baseline's: a ratio of two bounds, not "
                                      "a bound (a method whose steps are launch-bound can fall below or rise above it)",
    "aggregation": "ratios of sums over the rows of a category, task or the whole run",
    "warm-up + compile s": "compile time of the untimed warm-up runs (JAX methods; the warm-up's wall time for "
                           "others) + any compile time of timed calls, which their time excludes",
}


def _key(row: dict) -> tuple:
    return (row["question_id"], row["turn"])


def row_tau(row: dict) -> float:
    f = row.get("target_forwards") or 0
    return row["new_tokens"] / f if f else float("nan")


def aggregate(rows: Sequence[dict]) -> dict:
    """n, new_tokens, time_s, target_forwards, tokens_per_s and tau of some rows."""
    n_tok = sum(r["new_tokens"] for r in rows)
    t = sum(r["time_s"] for r in rows)
    f = sum(r.get("target_forwards") or 0 for r in rows)
    return {
        "n": len(rows),
        "new_tokens": n_tok,
        "time_s": t,
        "target_forwards": f,
        "tokens_per_s": n_tok / t if t > 0 else float("nan"),
        "tau": n_tok / f if f > 0 else float("nan"),
    }


def _mean_question_speed(rows: Sequence[dict]) -> float:
    """Mean over questions of (tokens / time of the question's turns): Spec-Bench's speed."""
    per_q = _group(rows, lambda r: r["question_id"])
    speeds = []
    for qrows in per_q.values():
        t = sum(r["time_s"] for r in qrows)
        if t > 0:
            speeds.append(sum(r["new_tokens"] for r in qrows) / t)
    return sum(speeds) / len(speeds) if speeds else float("nan")


def speedups(method_rows: Sequence[dict], baseline_rows: Sequence[dict]) -> dict:
    """speedup (time ratio), speedup_tps and speedup_specbench over the (question, turn) pairs
    both have (see the module docstring)."""
    base = {_key(r): r for r in baseline_rows}
    pairs = [(r, base[_key(r)]) for r in method_rows if _key(r) in base]
    if not pairs:
        return {"pairs": 0, "speedup": float("nan"), "speedup_tps": float("nan"), "speedup_specbench": float("nan")}
    tm = sum(m["time_s"] for m, _ in pairs)
    tb = sum(b["time_s"] for _, b in pairs)
    nm = sum(m["new_tokens"] for m, _ in pairs)
    nb = sum(b["new_tokens"] for _, b in pairs)
    speedup = tb / tm if tm > 0 else float("nan")
    tps = (nm / tm) / (nb / tb) if tm > 0 and tb > 0 and nb > 0 else float("nan")
    sm, sb = _mean_question_speed([m for m, _ in pairs]), _mean_question_speed([b for _, b in pairs])
    specbench = sm / sb if sb > 0 else float("nan")
    return {"pairs": len(pairs), "speedup": speedup, "speedup_tps": tps, "speedup_specbench": specbench}


def _group(rows: Iterable[dict], field) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[field(r)].append(r)
    return out


def _stats(rows, base_rows) -> dict:
    d = aggregate(rows)
    if base_rows is not None:
        d.update(speedups(rows, base_rows))
    return d


def acceptance(rows: Sequence[dict]) -> dict | None:
    """Rounds accepting exactly d draft tokens, summed over rows (from the strategies'
    `accept_histogram`), and the conditional acceptance rate at each draft position."""
    hists = [r.get("extra", {}).get("accept_histogram") for r in rows]
    hists = [h for h in hists if h]
    if not hists:
        return None
    width = max(len(h) for h in hists)
    total = [sum(h[d] for h in hists if d < len(h)) for d in range(width)]
    reach = [sum(total[d:]) for d in range(width)]
    rates = [reach[d] / reach[d - 1] if reach[d - 1] else None for d in range(1, width)]
    drafts = sum(r.get("extra", {}).get("draft_forwards", 0) or 0 for r in rows)
    return {"accept_histogram": total, "acceptance_per_position": rates, "draft_forwards": drafts}


def greedy_check(rows: Sequence[dict], baseline: str) -> dict:
    """Per method: pairs compared, and the (question, turn) pairs whose tokens differ."""
    by_method = _group(rows, lambda r: r["method"])
    base = {_key(r): r for r in by_method.get(baseline, [])}
    out = {}
    for method, mrows in by_method.items():
        if method == baseline:
            continue
        compared, mismatched = 0, []
        for r in sorted(mrows, key=_key):
            b = base.get(_key(r))
            if b is None or "output_tokens" not in r or "output_tokens" not in b:
                continue
            compared += 1
            if list(r["output_tokens"]) != list(b["output_tokens"]):
                mismatched.append(f"{r['question_id']}/turn{r['turn']}")
        out[method] = {"compared": compared, "mismatches": len(mismatched), "mismatched": mismatched}
    return out


def summarize(rows: Sequence[dict], *, baseline: str = "ar", methods: Sequence[str] | None = None,
              greedy: bool = False) -> dict:
    """The leaderboard of `rows`: per method, overall / per task / per category figures."""
    by_method = _group(rows, lambda r: r["method"])
    order = list(methods) if methods else []
    order += [m for m in by_method if m not in order]
    order = [m for m in order if m in by_method]
    if baseline in order:
        order.remove(baseline)
        order.insert(0, baseline)
    base_rows = by_method.get(baseline)
    base_by_cat = _group(base_rows or [], lambda r: r["category"])
    base_by_task = _group(base_rows or [], lambda r: task_of(r["category"]))
    present_cats = {r["category"] for r in rows}
    categories = [c for c in CATEGORIES if c in present_cats] + sorted(present_cats - set(CATEGORIES))
    tasks = [t for t in TASKS if any(task_of(c) == t for c in categories)]
    tasks += sorted({task_of(c) for c in categories} - set(tasks))
    out_methods = {}
    for m in order:
        mrows = by_method[m]
        cats = _group(mrows, lambda r: r["category"])
        tks = _group(mrows, lambda r: task_of(r["category"]))
        have_base = base_rows is not None
        out_methods[m] = {
            "overall": _stats(mrows, base_rows if have_base else None),
            "tasks": {t: _stats(tks[t], base_by_task.get(t, []) if have_base else None) for t in tasks if t in tks},
            "categories": {c: _stats(cats[c], base_by_cat.get(c, []) if have_base else None)
                           for c in categories if c in cats},
            "compile_s": sum(r.get("compile_s", 0.0) for r in mrows),
            "acceptance": acceptance(mrows),
            "sessions": sorted({r.get("session", "") for r in mrows}),
            # mean rows per batched call: rows / calls, each row being 1/batch_size of a call
            "rows_per_call": len(mrows) / sum(1.0 / r.get("batch_size", 1) for r in mrows),
        }
    summary = {
        "baseline": baseline if base_rows is not None else None,
        "methods": out_methods,
        "categories": categories,
        "tasks": tasks,
        "definitions": DEFINITIONS,
    }
    if greedy and base_rows is not None:
        summary["greedy_check"] = greedy_check(rows, baseline)
    return summary


# --------------------------------------------------------------------------------------------
# What the figures are of: tuning vs reporting prompts, the weights, the code
# --------------------------------------------------------------------------------------------


def tuning_question_ids(subset: str, questions_path: str | Path | None = None,
                        questions_sha256: str | None = None) -> list[int]:
    """The question ids of a named subset of Spec-Bench (`experiments.questions.SUBSETS`).

    `questions_path` is the run's question file when it exists here, else the default file;
    `questions_sha256` (the run's) must match the file read, so the ids are those the run saw."""
    path = Path(questions_path) if questions_path and Path(questions_path).is_file() else qmod.DEFAULT_QUESTIONS
    if not path.is_file():
        raise qmod.QuestionsError(f"the tuning subset {subset!r} needs the question file to name its questions; "
                                  f"{path} does not exist: put Spec-Bench's question.jsonl there.")
    if questions_sha256 and qmod.file_sha256(path) != questions_sha256:
        raise qmod.QuestionsError(f"{path} is not the question file this run used (its sha256 differs from the "
                                  "run's questions_sha256): pass the run's file, or the subset's ids would be wrong.")
    items = qmod.select(qmod.load_questions(path), subset)
    return sorted({it.question_id for it in items})


def add_held_out(summary: dict, rows: Sequence[dict], *, tuned_on: str, question_ids: Collection[int],
                 baseline: str = "ar", methods: Sequence[str] | None = None, greedy: bool = False) -> None:
    """Record the tuning set in `summary["tuned_on"]` and add `summary["held_out"]`: the same
    figures over the rows of every other question (all turns of `question_ids` dropped), or
    no `held_out` when the run has no other question."""
    ids = {int(i) for i in question_ids}
    kept = [r for r in rows if int(r["question_id"]) not in ids]
    summary["tuned_on"] = {
        "subset": tuned_on, "question_ids": sorted(ids),
        "questions_in_run": len({r["question_id"] for r in rows if int(r["question_id"]) in ids}),
        "held_out_questions": len({r["question_id"] for r in kept}),
        "held_out_pairs": len({_key(r) for r in kept}),
    }
    if kept:
        summary["held_out"] = summarize(kept, baseline=baseline, methods=methods, greedy=greedy)


def weights_text(source: str | None, dtype: str | None) -> str:
    """What weights a model name stands for, from the model registry: 'qwen2.5-coder-1.5b-instruct:
    Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (file.gguf) dequantized to bfloat16'."""
    from . import toy

    if not source:
        return "none"
    if source in toy.TOY_NAMES:
        return f"`{source}`: a random toy model (outputs are noise), {dtype}"
    if str(source).endswith(".gguf"):
        return f"`{Path(source).name}`: a GGUF file dequantized to {dtype}"
    from decoding import registry

    entry = registry.REGISTRY.get(source)
    if entry is not None and entry.filename.endswith(".gguf"):
        return f"`{source}`: {entry.identity} GGUF (`{entry.filename}`, the registry's file) dequantized to {dtype}"
    return f"`{source}`: a Hugging Face checkpoint (directory or hub id) in {dtype}"


def code_text(environments: Sequence[dict]) -> str:
    """The code that produced results, from each session's `environment.git`: 'commit abc1234',
    'commit abc1234 with uncommitted changes', or 'not recorded'; several, in order, when the
    sessions differ."""
    seen: list[str] = []
    for env in environments:
        git = (env or {}).get("git") or {}
        if not git.get("commit"):
            text = "commit not recorded"
        elif git.get("dirty"):
            text = f"commit {git['commit'][:7]} with uncommitted changes"
        else:
            text = f"commit {git['commit'][:7]}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) if seen else "commit not recorded"


# --------------------------------------------------------------------------------------------
# Roofline predictions next to the measurements
# --------------------------------------------------------------------------------------------


def add_predictions(summary: dict, rows: Sequence[dict], *, method_costs: dict, target_config, draft_config,
                    device, bytes_per_param: float = 2, batch: int = 1) -> None:
    """Add `predicted` (roofline) to each method whose cost is declared, using its measured tau.

    Context for the prediction: mean prompt length + half the mean output length.
    """
    from decoding import roofline

    if not rows:
        return
    prompt = sum(r.get("prompt_tokens", 0) for r in rows) / len(rows)
    new = sum(r["new_tokens"] for r in rows) / len(rows)
    context = prompt + new / 2
    for m, d in summary["methods"].items():
        cost = method_costs.get(m)
        tau = d["overall"]["tau"]
        if not cost or not math.isfinite(tau):
            continue
        try:
            pred = roofline.predict(cost, target=target_config, device=device, expected_tokens=tau,
                                    draft_config=draft_config, context=context, batch=batch,
                                    bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_param)
        except ValueError as err:
            d["predicted"] = {"error": str(err)}
            continue
        if pred is not None:
            d["predicted"] = dict(pred.as_dict(), context=context, device=device.name)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}", suffix="") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x) + suffix


def leaderboard_markdown(summary: dict) -> str:
    """Spec-Bench's leaderboard shape: speedup per task, overall, tau and tokens/s; with greedy
    decoding also how many outputs equal the baseline's."""
    tasks = summary["tasks"]
    check = summary.get("greedy_check")
    head = ["Method", *[TASK_NAMES.get(t, t) for t in tasks], "Overall", "tau", "tokens/s"]
    if check:
        head.append("greedy = baseline")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in summary["methods"].items():
        cells = [m]
        for t in tasks:
            cells.append(_f(d["tasks"].get(t, {}).get("speedup"), suffix="x"))
        cells += [_f(d["overall"].get("speedup"), suffix="x"), _f(d["overall"]["tau"]),
                  _f(d["overall"]["tokens_per_s"], "{:.1f}")]
        if check:
            c = check.get(m)
            cells.append("(baseline)" if m == summary.get("baseline") else
                         f"{c['compared'] - c['mismatches']} of {c['compared']}" if c else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def categories_markdown(summary: dict) -> str:
    cats = summary["categories"]
    head = ["Method", *cats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in summary["methods"].items():
        cells = [m]
        for c in cats:
            s = d["categories"].get(c)
            cells.append("" if s is None else f"{_f(s.get('speedup'), suffix='x')} / {_f(s['tau'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predictions_markdown(summary: dict) -> str:
    head = ["Method", "tau", "speedup (measured)", "speedup_tps (measured)", "speedup_specbench (measured)",
            "roofline prediction of speedup", "tokens/s (measured)", "tokens/s (roofline bound)",
            "warm-up + compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in summary["methods"].items():
        o, p = d["overall"], d.get("predicted") or {}
        lines.append("| " + " | ".join([
            m, _f(o["tau"]), _f(o.get("speedup"), suffix="x"), _f(o.get("speedup_tps"), suffix="x"),
            _f(o.get("speedup_specbench"), suffix="x"), _f(p.get("speedup"), suffix="x"),
            _f(o["tokens_per_s"], "{:.1f}"), _f(p.get("tokens_per_s"), "{:.0f}"),
            _f(d.get("warmup_s", 0.0) + d.get("compile_s", 0.0), "{:.1f}")]) + " |")
    return "\n".join(lines)


def acceptance_markdown(summary: dict) -> str:
    rows = [(m, d["acceptance"]) for m, d in summary["methods"].items() if d.get("acceptance")]
    if not rows:
        return ""
    width = max(len(a["acceptance_per_position"]) for _, a in rows)
    head = ["Method", *[f"pos {i}" for i in range(1, width + 1)], "draft forwards"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, a in rows:
        rates = [_f(x) for x in a["acceptance_per_position"]] + [""] * (width - len(a["acceptance_per_position"]))
        lines.append("| " + " | ".join([m, *rates, str(a["draft_forwards"])]) + " |")
    return "\n".join(lines)


def greedy_markdown(check: dict) -> str:
    lines = []
    for m, c in check.items():
        if c["mismatches"]:
            shown = ", ".join(c["mismatched"][:20]) + (" ..." if len(c["mismatched"]) > 20 else "")
            lines.append(f"- {m}: {c['compared'] - c['mismatches']} of {c['compared']} outputs equal the "
                         f"baseline's; {c['mismatches']} differ: {shown}")
        else:
            lines.append(f"- {m}: all {c['compared']} outputs equal the baseline's")
    return "\n".join(lines)


def add_phases(summary: dict, events: Sequence[dict], method_costs: dict, batch: int = 1) -> None:
    """Attach each method's phase times (the last `phases` event of `--phase-times`) and what
    they imply, against the baseline's measured time per decode step of the same run:

    - step_ms: baseline milliseconds per decode step = 1000 * batch / baseline tokens/s;
    - verify_steps: verify_ms / step_ms (one target forward over the draft, in AR steps);
    - draft_step_ratio: (propose_ms / draft steps per round) / step_ms, the measured
      draft/target cost ratio c (draft steps: gamma for a chain, depth for a tree);
    - implied_speedup: tau * step_ms / round_ms, the speedup the round time predicts (rounds
      only; prefill and the loop's exit are not in it), beside the measured speedup.
    """
    base = summary.get("baseline")
    b = summary["methods"].get(base, {}).get("overall", {}) if base else {}
    tps = b.get("tokens_per_s")
    step_ms = 1000.0 * batch / tps if tps else None
    latest: dict = {}
    for e in events:
        if e.get("event") == "phases":
            latest[e["method"]] = e
    for m, e in latest.items():
        d = summary["methods"].get(m)
        if d is None:
            continue
        ph = {k: e[k] for k in ("propose_ms", "verify_ms", "accept_commit_ms", "round_ms") if k in e}
        cost = method_costs.get(m) or {}
        steps = cost.get("gamma") if cost.get("kind") == "chain" else cost.get("depth")
        if step_ms:
            ph["step_ms"] = step_ms
            if "verify_ms" in ph:
                ph["verify_steps"] = ph["verify_ms"] / step_ms
            if steps and "propose_ms" in ph and cost.get("draft") != "free":
                ph["draft_steps"] = steps
                ph["draft_step_ratio"] = ph["propose_ms"] / steps / step_ms
            tau = d["overall"].get("tau")
            if tau and ph.get("round_ms"):
                ph["implied_speedup"] = tau * step_ms / ph["round_ms"]
        d["phases"] = ph


def phases_markdown(summary: dict) -> str:
    rows = [(m, d["phases"]) for m, d in summary["methods"].items() if d.get("phases")]
    if not rows:
        return ""

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else ""

    out = ["| Method | propose ms | verify ms | accept+commit ms | round ms | verify / AR step | "
           "draft step / AR step (c) | speedup implied by the round | speedup measured |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m, ph in rows:
        out.append(f"| {m} | {f(ph.get('propose_ms'), '.2f')} | {f(ph.get('verify_ms'), '.2f')} | "
                   f"{f(ph.get('accept_commit_ms'), '.2f')} | {f(ph.get('round_ms'), '.2f')} | "
                   f"{f(ph.get('verify_steps'), '.2f')} | {f(ph.get('draft_step_ratio'), '.2f')} | "
                   f"{f(ph.get('implied_speedup'), '.2f')}x | "
                   f"{f(summary['methods'][m]['overall'].get('speedup'), '.2f')}x |")
    step = next((ph["step_ms"] for _, ph in rows if "step_ms" in ph), None)
    if step:
        out += ["", f"AR step: {step:.2f} ms (the baseline's measured time per decode step). Each phase ran as "
                "its own program on the first batch, so the phases' sum exceeds the round."]
    return "\n".join(out)


def _batching_text(summary: dict, cfg: dict) -> str:
    """' (category batches: 2.0 rows per call on average)' for a run with batch size > 1."""
    if (cfg.get("batch_size") or 1) <= 1:
        return ""
    per_call = [d["rows_per_call"] for d in summary.get("methods", {}).values() if "rows_per_call" in d]
    mean = sum(per_call) / len(per_call) if per_call else float("nan")
    return f" ({cfg.get('batching', 'category')} batches: {mean:.1f} rows per call on average)"


def coverage_text(summary: dict) -> str:
    """'' when every method has rows for the same (question, turn) pairs; else which methods have
    fewer, so a partial run's figures are not read as the whole benchmark's."""
    counts = {m: d["overall"]["n"] for m, d in summary["methods"].items()}
    if not counts:
        return ""
    most = max(counts.values())
    short = [f"{m} has {n} of {most}" for m, n in counts.items() if n < most]
    if not short:
        return ""
    return ("; ".join(short) + " (question, turn) pairs: figures cover the pairs a method has, speedups "
            "the pairs it shares with the baseline")


def sessions_code_text(sessions: Sequence[dict]) -> str:
    """The code of each session that wrote rows, grouped: 'commit abc1234 with uncommitted
    changes (sessions s1, s2); commit def5678 (session s3)'."""
    groups: dict = {}
    for sess in sessions:
        groups.setdefault(code_text([sess.get("environment", {})]), []).append(sess.get("session") or "?")
    if len(groups) == 1 and len(sessions) == 1:
        return next(iter(groups))
    return "; ".join(f"{text} ({'sessions' if len(ids) > 1 else 'session'} {', '.join(ids)})"
                     for text, ids in groups.items())


def tuning_text(summary: dict, cfg: dict | None = None) -> str:
    """'tuned on: reference16 (16 questions); reported on: ...' for a report's header."""
    tuned = summary["tuned_on"]
    head = (f"tuned on: {tuned['subset']} ({len(tuned['question_ids'])} questions: the prompts the tree shapes and the "
            "autotune calibration were chosen on)")
    if summary.get("held_out"):
        return (f"{head}; reported on: all the run's questions (first table) and, held out, the "
                f"{tuned['held_out_questions']} questions outside {tuned['subset']} (second table)")
    return f"{head}; reported on: the same prompts (no held-out question in this run)"


def render_markdown(summary: dict, meta: dict | None = None) -> str:
    """The whole report: configuration, leaderboard, categories, predictions, checks, errors."""
    meta = meta or {}
    out = ["# Spec-Bench results", ""]
    if meta:
        cfg = meta.get("config", {})
        env = meta.get("environment", {})
        dev = env.get("device", {})
        ver = env.get("versions", {})
        out += [
            f"- device: {dev.get('device_kind', '?')} ({dev.get('platform', '?')})",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
            f"- target: {cfg.get('target')}; draft: {cfg.get('draft')}; dtype: {cfg.get('dtype')}",
            f"- questions: {cfg.get('selection_text', '?')}",
            f"- batch size: {cfg.get('batch_size')}{_batching_text(summary, cfg)}; max new tokens: "
            f"{cfg.get('max_new_tokens')}; sampling: {cfg.get('sampling')}; chat template: {cfg.get('chat')}",
        ]
        if cfg.get("target"):
            out.append(f"- weights: target {weights_text(cfg.get('target'), cfg.get('dtype'))}"
                       + (f"; draft {weights_text(cfg['draft'], cfg.get('dtype'))}" if cfg.get("draft") else ""))
        if meta.get("row_sessions") is not None:
            out.append(f"- code: {sessions_code_text(meta['row_sessions'])}")
        out.append(f"- {SPEEDUP_DEFINITION}")
        if summary.get("tuned_on"):
            out.append(f"- {tuning_text(summary, cfg)}")
        commands = [c for c in meta.get("commands") or [] if c]
        if len(commands) > 1:
            out.append("- commands, one per session that wrote rows:")
            out += [f"  - `{c}`" for c in commands]
        else:
            out.append(f"- command: `{commands[0] if commands else env.get('command', '')}`")
        short = coverage_text(summary)
        if short:
            out.append(f"- incomplete: {short}")
        if meta.get("sessions", 1) > 1:
            out.append(f"- note: the rows come from {meta['sessions']} sessions (the run was resumed); each "
                       "method's 'sessions' in summary.json says which, and speedups across sessions compare "
                       "different processes")
        out.append("")
    base = summary.get("baseline")
    out += [f"## Speedup over {base or 'the baseline (not in this run)'} (Spec-Bench leaderboard shape)", ""]
    tuned = summary.get("tuned_on")
    if tuned and summary.get("held_out"):
        out += [f"Tuned on: {tuned['subset']}; reported on: every (question, turn) pair of this run"
                + (f", the {tuned['questions_in_run']} tuning questions included." if tuned["questions_in_run"]
                   else " (none of them a tuning question)."), ""]
    elif tuned:
        out += [f"Tuned on: {tuned['subset']}; reported on: the same prompts (every question of this run is in "
                f"{tuned['subset']}, so there are no held-out figures).", ""]
    out += [leaderboard_markdown(summary), ""]
    held = summary.get("held_out")
    if tuned and held:
        out += [f"## Held out: without the questions the settings were tuned on ({tuned['subset']})", "",
                f"Tuned on: {tuned['subset']} ({len(tuned['question_ids'])} questions); reported on: this run's "
                f"questions minus every turn of those: {tuned['held_out_questions']} questions, "
                f"{tuned['held_out_pairs']} (question, turn) pairs.", "",
                leaderboard_markdown(held), ""]
    out += [
            "## Per category (speedup / tau)", "", categories_markdown(summary), "",
            "## Measured vs roofline", "",
            "tokens/s (roofline bound): the measured tau over the roofline time of a round (bytes of weights and "
            "KV cache / bandwidth, or FLOPs / peak, whichever is larger: a lower bound on time), so an upper "
            "bound on tokens/s at that tau. The roofline prediction of speedup is the ratio of two such bounds "
            "(the method's over the baseline's): a prediction, not a bound; launch-bound steps can put the "
            "measurement below or above it. "
            + (f"Device profile: {meta['device_profile']['name']}." if meta.get("device_profile") else
               "No device profile was available."), "",
            predictions_markdown(summary), ""]
    ph = phases_markdown(summary)
    if ph:
        out += ["## Phase times and the draft/target cost ratio", "", ph, ""]
    acc = acceptance_markdown(summary)
    if acc:
        out += ["## Acceptance rate per draft position (given the previous one was accepted)", "", acc, ""]
    if summary.get("greedy_check"):
        out += ["## Greedy outputs vs the baseline", "", greedy_markdown(summary["greedy_check"]), ""]
    errors = meta.get("errors") or []
    if errors:
        out += ["## Methods that failed", ""]
        out += [f"- {e['method']}: {e['error']}" for e in errors]
        out.append("")
    out += ["## Definitions", ""] + [f"- {k}: {v}" for k, v in summary["definitions"].items()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def plot(summary: dict, rows: Sequence[dict], out_dir: str | Path) -> list[str]:
    """speedup.png (per task and overall, per method) and tau.png (per-row tau distribution).

    Returns the files written; an empty list (and no error) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    written = []
    base = summary.get("baseline")
    methods = [m for m in summary["methods"] if m != base]
    if base and methods:
        groups = summary["tasks"] + ["overall"]
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            d = summary["methods"][m]
            vals = [d["tasks"].get(g, {}).get("speedup", float("nan")) if g != "overall"
                    else d["overall"].get("speedup", float("nan")) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([TASK_NAMES.get(g, g) for g in groups], rotation=20)
        ax.set_ylabel(f"speedup over {base}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup.png", dpi=120)
        plt.close(fig)
        written.append(str(out_dir / "speedup.png"))
    by_method = _group(rows, lambda r: r["method"])
    names = [m for m in summary["methods"] if m in by_method]
    if names:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
        data = [[t for t in (row_tau(r) for r in by_method[m]) if math.isfinite(t)] or [float("nan")] for m in names]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=20)
        ax.set_ylabel("tau per (question, turn)")
        fig.tight_layout()
        fig.savefig(out_dir / "tau.png", dpi=120)
        plt.close(fig)
        written.append(str(out_dir / "tau.png"))
    return written


# --------------------------------------------------------------------------------------------
# The index of committed results: what each one is, from its own files
# --------------------------------------------------------------------------------------------

# Reports rewritten from their data by a summarize-only path that states the weights and the code
# in the report itself; any other result is described only by the index.
REGENERATED = {
    "specbench": "python -m experiments.specbench --summarize-only [--tuned-on reference16] --out DIR",
    "ead": "python -m experiments.ead --summarize-only --out DIR",
    "nudging": "python -m experiments.nudging --summarize-only --limit 100 --out DIR",
}


def _walk(value, found: dict) -> None:
    """Collect the environments (dicts with `git` and `device`), model names and dtypes in a JSON value."""
    if isinstance(value, dict):
        if "git" in value and "device" in value:
            found["environments"].append(value)
        for k, v in value.items():
            if k == "dtype" and isinstance(v, str):
                found["dtypes"].add(v)
            _walk(k, found)
            _walk(v, found)
    elif isinstance(value, list):
        for v in value:
            _walk(v, found)
    elif isinstance(value, str) and value in found["names"]:
        found["models"].setdefault(value, None)


def describe_result(path: Path) -> dict:
    """What a committed result file says about itself: devices, the code of every recorded
    session, the weights of every registry model it names, and its dtypes."""
    from decoding import registry

    found = {"environments": [], "dtypes": set(), "models": {}, "names": set(registry.REGISTRY)}
    _walk(json.loads(path.read_text(encoding="utf-8")), found)
    envs = sorted({json.dumps(e, sort_keys=True) for e in found["environments"]})
    envs = sorted((json.loads(e) for e in envs), key=lambda e: e.get("time_utc", ""))
    dtype = ", ".join(sorted(found["dtypes"])) or "a dtype this file does not record"
    data = json.loads(path.read_text(encoding="utf-8"))
    tuned = (data.get("config") or {}).get("prompts") if isinstance(data, dict) and "result" in data else None
    return {
        "devices": sorted({(e.get("device") or {}).get("device_kind", "?") for e in envs}),
        "code": code_text(envs) if envs else "commit not recorded",
        "weights": [weights_text(m, dtype) for m in found["models"]],
        "tuned_on": list(tuned) if tuned else None,
    }


def results_index(root: str | Path) -> str:
    """Markdown: one line per committed result under `root` (a run folder's run.json, or a
    result JSON of a script without a summarize-only path), saying what it is."""
    root = Path(root)
    lines = ["# Committed results: what each one is", "",
             "Written by `python -m experiments.summary --index experiments/results` from the results' own "
             "files; do not edit. Code: the commit of every session a result records (\"with uncommitted "
             "changes\" when its tree was dirty). Weights: the model registry's entry for each model the "
             "result names. Regenerated: the report was rewritten from its data and its header states the "
             "same; otherwise the report predates these lines and this index is where they are stated.", "",
             f"Speedup, wherever a report gives one: {SPEEDUP_DEFINITION}.", ""]
    seen_dirs = set()
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root)
        if path.name in ("summary.json", "nudging.json") and (path.parent / "run.json").exists():
            continue  # a report of a run folder: described by its run.json
        if path.parent in seen_dirs:
            continue
        if path.name == "run.json":
            seen_dirs.add(path.parent)
        kind = rel.parts[0] if len(rel.parts) > 1 else ""
        d = describe_result(path)
        regen = f"regenerated (`{REGENERATED[kind]}`)" if path.name == "run.json" and kind in REGENERATED else (
            "not regenerated: its script has no summarize-only path")
        where = rel.parent if path.name == "run.json" else rel
        tuned = ""
        if d["tuned_on"]:  # a tuner's result: the prompts it chose its settings on
            tuned = (f"; tuned on the prompts {', '.join(d['tuned_on'])} (Spec-Bench question/turn), which the "
                     "reference16 reports also contain: reference16 figures of what it chose are tuning-set figures")
        lines.append(f"- `{where}`: {', '.join(d['devices']) or 'device not recorded'}; code: {d['code']}; "
                     f"weights: {'; '.join(d['weights']) or 'none named'}{tuned}; {regen}.")
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not any(path.glob("*.json")) and any(p.is_file() for p in path.iterdir()):
            lines.append(f"- `{path.relative_to(root)}`: no JSON result (a log and its description); code not "
                         "recorded.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.summary",
                                description="Write the index of committed results (README.md in the folder).")
    p.add_argument("--index", required=True, metavar="RESULTS_DIR", help="folder of committed results")
    args = p.parse_args(argv)
    root = Path(args.index)
    if not root.is_dir():
        print(f"error: {root} is not a folder of results.", file=sys.stderr)
        return 2
    (root / "README.md").write_text(results_index(root), encoding="utf-8")
    print(root / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
