"""Nudging (Fei, Razeghi, Singh, ACL 2025): a base model steered by a small aligned model.

Default pair: Gemma-3-270M (base, registry "gemma-3-270m") nudged by SmolLM2-135M-Instruct
("smollm2-135m-instruct"): different tokenizers (262144 vs 49152 tokens), so the models
exchange text (`alignment.nudging`). Three systems are compared on two task sets:
  * base alone, aligned alone, nudged (gamma 0.3, 16-token chunks, greedy, `--max-tokens` 512);
  * GSM8K test (../shared/data/gsm8k/test.jsonl): accuracy of the final answer (the last number
    of the output, normalised and compared as a number: `experiments.answers`), with a Wilson 95%
    interval;
  * AlpacaEval instructions (../shared/data/alpaca_eval/instructions.jsonl): pairwise preference
    judged by Qwen2.5-Coder-1.5B-Instruct ("qwen2.5-coder-1.5b-instruct").
and the fraction of the nudged answers' tokens (words, characters) the aligned model wrote (the
paper: under 9%).

Prompts follow the paper's code: the base model sees "<instruction>\\nQuestion: <q>\\nAnswer: "
(AlpacaEval: "...\\nInstruction: <q>\\nResponse: "), the aligned model its chat template with the
same instruction as system message. Base and nudged outputs stop at the next "\\nQuestion:" /
"\\nInstruction:" (a base model goes on to invent the next example). Every output of every
system is then passed through `trim_repetition` (the paper's code strips repeated suffixes from
nudged answers; doing it for all systems keeps the comparison fair).

Judge: for instruction x and responses (X, Y), the judge's chat prompt shows both and asks
"Which response is better? Answer with a single letter, A or B."; its next-token logits of "A"
and "B" give P(first is better) = softmax over those two. Positions are swapped to cancel order
bias: pref(X over Y) = (P(A | X first) + P(B | Y first)) / 2. X wins if pref > 0.5 (a tie at
exactly 0.5 counts half). Win rates carry a 95% bootstrap interval over instructions (2000
resamples, seed 0); the mean soft preference and the judge's position bias (mean P(A)) are
reported beside them.

Timing: generation wall time per system (base and aligned alone batched with
`decoding.generate`, nudging one question at a time: its round loop is host-side Python). The
first nudged question includes compilation; the median per-question time does not.

Resuming: every answer (per task, system and item) and every judged pair is a row of
`<out>/results.jsonl`, written as it finishes (`experiments.store`); rerunning the same command
skips what is there, so a run cut off by a time limit continues where it stopped. A rerun with
other settings (models, gamma, chunk, limits, dtype) is refused; `--limit` may grow. `run.json`
lists the sessions (machine, versions, command) with the first row each wrote, and the report
says which device wrote the rows of each task and system when there were several.

    python -m experiments.nudging --limit 100 --out experiments/results/nudging
    python -m experiments.nudging --base smollm2-135m-instruct --limit 2 --max-tokens 64  # smoke test
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from . import environment
from .answers import extract_gsm8k, gsm8k_correct, gsm8k_gold
from .store import ResultsError, ResultsStore
from .summary import code_text, weights_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "experiments" / "results" / "nudging"
SYSTEMS = ("base", "aligned", "nudged")
PAIRS = (("nudged", "base"), ("nudged", "aligned"), ("aligned", "base"))
REASONING = "Answer the question by walking through the reasoning steps."
HELPFUL = "You are a helpful assistant."
JUDGE_SYSTEM = "You are a fair and careful judge of the quality of AI assistants' responses."
JUDGE_USER = (
    "Compare two responses to the same instruction and decide which one is better: more helpful, "
    "correct, relevant and clear.\n\n### Instruction:\n{instruction}\n\n### Response A:\n{a}\n\n"
    "### Response B:\n{b}\n\nWhich response is better? Answer with a single letter, A or B."
)


class DataError(FileNotFoundError):
    """A data file the experiment needs is missing or malformed."""


# ------------------------------------------------------------------------------------------
# Data and prompts
# ------------------------------------------------------------------------------------------


def load_task(data_dir: Path, task: str, limit: int | None) -> list[dict]:
    """The first `limit` items of a task in file order: dicts with `id`, `question`, `gold`."""
    rel = {"gsm8k": "gsm8k/test.jsonl", "alpaca": "alpaca_eval/instructions.jsonl"}[task]
    path = Path(data_dir) / rel
    if not path.is_file():
        raise DataError(f"{task} data not found at {path}. Pass --data-dir pointing at the shared data folder "
                        f"(the one holding gsm8k/ and alpaca_eval/; default {DEFAULT_DATA}).")
    items = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and len(items) >= limit:
                break
            row = json.loads(line)
            try:
                if task == "gsm8k":
                    items.append({"id": i, "question": row["question"], "gold": gsm8k_gold(row["answer"])})
                else:
                    items.append({"id": row["id"], "question": row["instruction"], "gold": None})
            except (KeyError, ValueError) as err:
                raise DataError(f"{path} line {i + 1} is not a {task} row ({err}).") from None
    if not items:
        raise DataError(f"{path} has no rows.")
    return items


def task_prompts(task: str):
    from alignment import Prompts

    if task == "gsm8k":
        return Prompts(base=REASONING + "\nQuestion: {question}\nAnswer: ", system=REASONING), ("\nQuestion:",)
    return Prompts(base=HELPFUL + "\nInstruction: {question}\nResponse: ", system=HELPFUL), ("\nInstruction:",)


def cut_at_stop(text: str, stop) -> str:
    hits = [text.find(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


# ------------------------------------------------------------------------------------------
# The three systems
# ------------------------------------------------------------------------------------------


def _batches(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def run_alone(store, task, system, model, items, prompt_ids, bucket, max_tokens, batch, stop, log=print) -> None:
    """Greedy answers of one model alone (batched `decoding.generate`), one row per item in
    `store`; items already there are skipped."""
    import decoding

    pending = [i for i, it in enumerate(items) if (task, system, it["id"]) not in store]
    if not pending:
        return
    log(f"[{task}] {system} alone: {len(pending)} of {len(items)} items to generate")
    for group in _batches(pending, batch):
        res = decoding.generate(model, [prompt_ids[i] for i in group], max_new_tokens=max_tokens, stop=list(stop),
                                prompt_bucket=bucket)
        batch_id = uuid.uuid4().hex[:12]
        for j, i in enumerate(group):
            store.append({"task": task, "system": system, "id": items[i]["id"],
                          "raw": cut_at_stop(res.texts[j], stop).strip(), "tokens": len(res.tokens[j]),
                          "batch_id": batch_id, "batch_run_s": res.stats.run_s,
                          "batch_compile_s": res.stats.compile_s, "batch_new_tokens": res.stats.new_tokens})


def run_nudged(store, task, items, base, aligned, config, log=print) -> None:
    """Nudged answers, one question at a time (the round loop is host-side), one row each."""
    from tqdm.auto import tqdm

    from alignment import nudge

    prompts, stop = task_prompts(task)
    pending = [it for it in items if (task, "nudged", it["id"]) not in store]
    if not pending:
        return
    log(f"[{task}] nudged: {len(pending)} of {len(items)} items to generate")
    for it in tqdm(pending, desc=f"{task} nudged"):
        r = nudge(base, aligned, it["question"], config, prompts, stop=stop)
        store.append({"task": task, "system": "nudged", "id": it["id"], "raw": r.text, "nudging": r.stats(),
                      "seconds": r.seconds})


def run_task(store, task, items, base, aligned, config, batch, log=print) -> None:
    """Every system's answer to every item of `task`, into `store` (resumable)."""
    from decoding.shapes import bucket

    prompts, stop = task_prompts(task)
    base_ids = [base.tokenizer.encode(prompts.base_prefix(it["question"]).rstrip(), add_special_tokens=True)
                for it in items]
    aligned_ids = [aligned.tokenizer.encode(prompts.aligned_prefix(aligned.tokenizer, it["question"]),
                                            add_special_tokens=False) for it in items]
    # One prompt bucket per (task, model), fixed by every item of the task: a resumed run pads
    # the same way, so its programs and outputs are those of an uninterrupted one.
    run_alone(store, task, "base", base, items, base_ids, bucket(max(map(len, base_ids))),
              config.max_tokens, batch, stop, log)
    run_alone(store, task, "aligned", aligned, items, aligned_ids, bucket(max(map(len, aligned_ids))),
              config.max_tokens, batch, (), log)
    run_nudged(store, task, items, base, aligned, config, log)


def task_records(store, task, items) -> tuple[list[dict], dict]:
    """The per-item records (texts of the three systems, nudging stats) and per-system timing."""
    from alignment import trim_repetition

    records, timing = [], {}
    for it in items:
        rec = {"id": it["id"], "question": it["question"], "gold": it["gold"]}
        for s in SYSTEMS:
            row = store.get((task, s, it["id"]))
            rec[s] = {"raw": row["raw"], "text": trim_repetition(row["raw"])}
            if s == "nudged":
                rec["nudging"] = row["nudging"]
        records.append(rec)
    for s in ("base", "aligned"):
        rows = [store.get((task, s, it["id"])) for it in items]
        batches = {r["batch_id"]: r for r in rows}
        run_s = sum(r["batch_run_s"] for r in batches.values())
        tokens = sum(r["tokens"] for r in rows)
        timing[s] = {"tokens": tokens, "run_s": run_s, "compile_s": sum(r["batch_compile_s"] for r in batches.values()),
                     "tokens_per_s": tokens / run_s if run_s else float("nan")}
    rows = [store.get((task, "nudged", it["id"])) for it in items]
    seconds = [r["seconds"] for r in rows]
    tokens = sum(r["nudging"]["aligned_tokens"] + r["nudging"]["base_tokens"] for r in rows)
    timing["nudged"] = {"tokens": tokens, "run_s": float(sum(seconds)), "median_item_s": float(np.median(seconds)),
                        "tokens_per_s": tokens / sum(seconds) if sum(seconds) else float("nan")}
    return records, timing


def nudging_summary(records) -> dict:
    stats = [r["nudging"] for r in records]
    aligned = sum(s["aligned_tokens"] for s in stats)
    total = aligned + sum(s["base_tokens"] for s in stats)
    reasons: dict = {}
    for s in stats:
        reasons[s["stop_reason"]] = reasons.get(s["stop_reason"], 0) + 1
    return {
        "aligned_token_fraction": aligned / total if total else 0.0,
        "aligned_token_fraction_mean": float(np.mean([s["aligned_token_fraction"] for s in stats])),
        "aligned_word_fraction_mean": float(np.mean([s["aligned_word_fraction"] for s in stats])),
        "aligned_char_fraction_mean": float(np.mean([s["aligned_char_fraction"] for s in stats])),
        "rounds_mean": float(np.mean([s["rounds"] for s in stats])),
        "handoffs_mean": float(np.mean([s["handoffs"] for s in stats])),
        "stop_reasons": reasons,
    }


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def bootstrap(values, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, float)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def score_gsm8k(records) -> dict:
    out = {}
    for s in SYSTEMS:
        correct = 0
        for r in records:
            pred = extract_gsm8k(r[s]["text"])
            r[s]["prediction"] = pred
            r[s]["correct"] = gsm8k_correct(pred, r["gold"])
            correct += r[s]["correct"]
        n = len(records)
        out[s] = {"accuracy": correct / n, "correct": correct, "n": n, "ci95": wilson(correct, n)}
    return out


class Judge:
    """Pairwise preference from a chat model's next-token logits of "A" and "B"."""

    def __init__(self, model, batch: int = 8):
        import jax

        from decoding.strategy import prefill

        self.model, self.batch = model, batch
        tok = model.tokenizer
        self.ids = []
        for letter in ("A", "B"):
            ids = tok.encode(letter, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"the judge's tokenizer splits {letter!r} into {ids}; pick a judge whose "
                                 "vocabulary has single-token 'A' and 'B'.")
            self.ids.append(ids[0])
        self._prefill = jax.jit(prefill, static_argnums=(0,))

    def prompt(self, instruction: str, a: str, b: str) -> list[int]:
        tok = self.model.tokenizer
        text = tok.apply_chat_template(
            [{"role": "system", "content": JUDGE_SYSTEM},
             {"role": "user", "content": JUDGE_USER.format(instruction=instruction, a=a, b=b)}],
            add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def p_first(self, prompts: list[list[int]]) -> list[float]:
        """P("A") / (P("A") + P("B")) for each prompt."""
        out = []
        for i in range(0, len(prompts), self.batch):
            group = prompts[i:i + self.batch]
            longest = max(len(p) for p in group)
            width = ((longest + 255) // 256) * 256
            buf = np.zeros((self.batch, width), np.int32)
            lengths = np.ones((self.batch,), np.int32)
            for j, p in enumerate(group):
                buf[j, :len(p)] = p
                lengths[j] = len(p)
            cache = self.model.init_cache(self.batch, width)
            logits, _ = self._prefill(self.model.config, self.model.params, buf, lengths, cache)
            ab = np.asarray(logits)[: len(group)][:, self.ids].astype(np.float64)
            ab -= ab.max(axis=1, keepdims=True)
            p = np.exp(ab)
            out.extend((p[:, 0] / p.sum(axis=1)).tolist())
        return out


def judge_pairs(judge: Judge, store, task: str, records, log=print) -> dict:
    """Order-swapped pairwise preferences for every pair of systems (one row per pair and item)."""
    for x, y in PAIRS:
        system = f"judge:{x}>{y}"
        pending = [r for r in records if (task, system, r["id"]) not in store]
        if pending:
            log(f"[{task}] judging {x} vs {y}: {len(pending)} of {len(records)} items")
        for group in _batches(pending, judge.batch):
            xy = [judge.prompt(r["question"], r[x]["text"], r[y]["text"]) for r in group]
            yx = [judge.prompt(r["question"], r[y]["text"], r[x]["text"]) for r in group]
            p_xy, p_yx = judge.p_first(xy), judge.p_first(yx)
            for r, a, b in zip(group, p_xy, p_yx):
                store.append({"task": task, "system": system, "id": r["id"], "p_xy": a, "p_yx": b,
                              "pref": (a + (1.0 - b)) / 2})
    return judge_summary(store, task, records)


def judge_summary(store, task: str, records) -> dict | None:
    """Win rates from the stored judge rows (None unless every pair of every record is judged)."""
    if any((task, f"judge:{x}>{y}", r["id"]) not in store for x, y in PAIRS for r in records):
        return None
    out = {}
    for x, y in PAIRS:
        rows = [store.get((task, f"judge:{x}>{y}", r["id"])) for r in records]
        pref = [row["pref"] for row in rows]
        wins = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in pref]
        for r, p in zip(records, pref):
            r.setdefault("judge", {})[f"{x}>{y}"] = p
        firsts = [row["p_xy"] for row in rows] + [row["p_yx"] for row in rows]
        out[f"{x} vs {y}"] = {
            "win_rate": float(np.mean(wins)), "ci95": bootstrap(wins),
            "soft_preference": float(np.mean(pref)), "soft_ci95": bootstrap(pref),
            "position_bias_p_first": float(np.mean(firsts)), "n": len(records),
        }
    return out


def provenance(rows: Sequence[dict], sessions: Sequence[dict]) -> dict:
    """Which device wrote the rows of each task and system: {"task/system": {device: rows}}.

    A session wrote the rows from its `first_row` (in file order) up to the next session's."""
    starts = [int(s["first_row"]) for s in sessions]
    out: dict = {}
    for i, row in enumerate(rows):
        k = bisect.bisect_right(starts, i) - 1
        device = sessions[k]["environment"].get("device", {}).get("device_kind", "?") if k >= 0 else "unknown"
        counts = out.setdefault(f"{row['task']}/{row['system']}", {})
        counts[device] = counts.get(device, 0) + 1
    return out


def sessions_after(run_file: Path, env: dict, first_row: int) -> list[dict]:
    """The run's sessions with this one appended. A run file written before sessions were
    recorded counts as one session that wrote every row before `first_row`."""
    old = json.loads(run_file.read_text()) if run_file.exists() else {}
    sessions = list(old.get("sessions") or
                    ([{"environment": old["environment"], "first_row": 0}] if "environment" in old else []))
    return sessions + [{"environment": env, "first_row": first_row}]


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Nudging", "",
        f"Base `{s['base']}` nudged by `{s['aligned']}`; gamma {s['gamma']}, chunk {s['chunk']}, "
        f"max tokens {s['max_tokens']}, greedy, dtype {s['dtype']}; {_devices_line(report)}.", "",
        "Weights: " + "; ".join(f"{role} {weights_text(s[role], s['dtype'])}" for role in ("base", "aligned", "judge")
                                if s.get(role)) + ".", "",
        f"Code: {_code_line(report)}.", "",
    ]
    if "gsm8k" in report["tasks"]:
        t = report["tasks"]["gsm8k"]
        lines += ["## GSM8K (test, first {} questions)".format(t["n"]), "",
                  "| system | accuracy | 95% CI | tokens/s | generation s |", "| --- | --- | --- | --- | --- |"]
        for sys_ in SYSTEMS:
            a, tm = t["accuracy"][sys_], t["timing"][sys_]
            lines.append(f"| {sys_} | {a['accuracy']:.3f} ({a['correct']}/{a['n']}) | {_ci(a['ci95'])} | "
                         f"{tm['tokens_per_s']:.1f} | {tm['run_s']:.1f} |")
        lines.append("")
    for task, t in report["tasks"].items():
        if t.get("requested", t["n"]) != t["n"]:
            lines += [f"**{task}: partial** - {t['n']} of the first {t['requested']} items have all three answers; "
                      "the figures below cover those items only.", ""]
        if task == "alpaca" and "judge" not in t:
            lines += ["AlpacaEval: not judged yet (the judge runs once every item has its three answers).", ""]
        n = t["nudging"]
        lines += [f"Nudging on {task}: aligned model wrote {n['aligned_token_fraction']:.3f} of the tokens "
                  f"(per-answer mean {n['aligned_token_fraction_mean']:.3f}; words "
                  f"{n['aligned_word_fraction_mean']:.3f}, characters {n['aligned_char_fraction_mean']:.3f}); "
                  f"{n['rounds_mean']:.1f} rounds and "
                  f"{n['handoffs_mean']:.1f} hand-offs per answer; stops: {n['stop_reasons']}.", ""]
    if "alpaca" in report["tasks"] and "judge" in report["tasks"]["alpaca"]:
        t = report["tasks"]["alpaca"]
        lines += [f"## AlpacaEval instructions (first {t['n']}), judged by `{s['judge']}`", "",
                  "| pair | win rate | 95% CI | soft preference | judge P(first) |", "| --- | --- | --- | --- | --- |"]
        for pair, j in t["judge"].items():
            lines.append(f"| {pair} | {j['win_rate']:.3f} | {_ci(j['ci95'])} | {j['soft_preference']:.3f} | "
                         f"{j['position_bias_p_first']:.3f} |")
        lines += ["", "Win: the judge's order-averaged P(X better) > 0.5 (see experiments/nudging.py).", ""]
    prov = report.get("provenance") or {}
    if len({d for counts in prov.values() for d in counts}) > 1:
        lines += ["## Where the rows were generated", "",
                  "The run was resumed on other machines; times compare only within one device.", "",
                  "| task/system | rows per device |", "| --- | --- |"]
        for key, counts in prov.items():
            lines.append(f"| {key} | {', '.join(f'{d}: {n}' for d, n in counts.items())} |")
        lines.append("")
    lines.append(f"Command: `{report['environment'].get('command', '')}`")
    return "\n".join(lines) + "\n"


def _code_line(report: dict) -> str:
    """The commit of each session with the rows it wrote ('commit abc1234 with uncommitted
    changes (rows 0-555 of results.jsonl)'), from the sessions' recorded environments."""
    sessions = report.get("sessions") or []
    if not sessions:
        return code_text([report.get("environment", {})])
    parts = []
    for i, sess in enumerate(sessions):
        end = sessions[i + 1]["first_row"] if i + 1 < len(sessions) else None
        rows = f"rows {sess['first_row']}-{end - 1}" if end is not None else f"rows {sess['first_row']} on"
        parts.append(f"{code_text([{'git': sess.get('git')}])} ({rows} of results.jsonl)")
    return "; ".join(parts)


def _devices_line(report: dict) -> str:
    devices = []
    for counts in (report.get("provenance") or {}).values():
        devices += [d for d in counts if d not in devices]
    if len(devices) > 1:
        return "devices " + " and ".join(devices) + " (see the last section)"
    return f"device {devices[0] if devices else report['environment'].get('device', {}).get('device_kind', '?')}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    panels = [k for k in ("gsm8k", "alpaca") if k in tasks and (k == "gsm8k" or "judge" in tasks[k])]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.4))
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, panels):
        if k == "gsm8k":
            acc = tasks[k]["accuracy"]
            vals = [acc[s]["accuracy"] for s in SYSTEMS]
            err = np.array([[v - acc[s]["ci95"][0], acc[s]["ci95"][1] - v] for v, s in zip(vals, SYSTEMS)]).T
            ax.bar(SYSTEMS, vals, yerr=err, capsize=4, color=["#999", "#6a9", "#369"])
            ax.set_title("GSM8K accuracy")
        else:
            j = tasks[k]["judge"]
            names = list(j)
            vals = [j[n]["win_rate"] for n in names]
            err = np.array([[v - j[n]["ci95"][0], j[n]["ci95"][1] - v] for v, n in zip(vals, names)]).T
            ax.barh(names, vals, xerr=err, capsize=4, color="#369")
            ax.axvline(0.5, color="k", lw=0.8, ls="--")
            ax.set_xlim(0, 1)
            ax.set_title("AlpacaEval win rate")
    ax = axes[-1]
    for k, t in tasks.items():
        fr = [r["nudging"]["aligned_token_fraction"] for r in t["records"]]
        ax.hist(fr, bins=np.linspace(0, 1, 21), alpha=0.6, label=k)
    ax.set_title("tokens written by the aligned model")
    ax.set_xlabel("fraction per answer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="gemma-3-270m", help="base model: registry name, .gguf or HF directory")
    p.add_argument("--aligned", default="smollm2-135m-instruct", help="aligned (instruct) model")
    p.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct", help="judge of the AlpacaEval pairs")
    p.add_argument("--tasks", default="gsm8k,alpaca", help="comma-separated: gsm8k, alpaca")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length limit (nudged: both models together)")
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max-rounds", type=int, default=150)
    p.add_argument("--batch", type=int, default=16, help="batch of the single-model runs and the judge")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-judge", action="store_true", help="skip the AlpacaEval judging")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder holding gsm8k/ and alpaca_eval/")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (JSON, Markdown, PNG)")
    p.add_argument("--repair", action="store_true", help="keep the valid rows of a damaged results.jsonl")
    p.add_argument("--summarize-only", action="store_true",
                   help="rewrite the report from --out's rows and run.json (no models, no generation, no judge); "
                        "items not yet answered by all three systems are left out and counted")
    return p


KEY_FIELDS = ("task", "system", "id")
IDENTITY_FIELDS = ("base", "aligned", "judge", "max_tokens", "gamma", "chunk", "max_rounds", "dtype")


def _check_run_file(path: Path, identity: dict) -> None:
    """Refuse to resume a run whose settings differ (its stored rows would not match)."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["identity"]
    except (ValueError, KeyError) as err:
        raise SystemExit(f"error: {path} is not a run file of this experiment ({err}); use another --out.") from None
    diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
    if diff:
        raise SystemExit(f"error: {path.parent} holds a run with other settings "
                         + ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                         + ". Use another --out (or the stored settings) to keep results comparable.")


def run(args, load=None, log=print) -> dict:
    """Generate (resuming what `args.out` already holds), judge and write the report.

    `load(name, dtype) -> decoding.Model` loads the models (default `decoding.load`)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = sorted(set(tasks) - {"gsm8k", "alpaca"})
    if bad or not tasks:
        raise SystemExit(f"--tasks must name gsm8k and/or alpaca, got {args.tasks!r}.")
    try:  # fail early, before loading models, on missing data
        data = {t: load_task(Path(args.data_dir), t, args.limit) for t in tasks}
    except DataError as err:
        raise SystemExit(f"error: {err}") from None

    import jax.numpy as jnp

    import decoding
    from alignment import Nudging

    if load is None:
        def load(name, dtype):
            return decoding.load(name, dtype=dtype)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {k: getattr(args, k) for k in IDENTITY_FIELDS}
    _check_run_file(out / "run.json", identity)
    env = environment.describe()

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    config = Nudging(gamma=args.gamma, chunk=args.chunk, max_tokens=args.max_tokens, max_rounds=args.max_rounds)
    t0 = time.perf_counter()
    base, aligned = load(args.base, dtype), load(args.aligned, dtype)
    load_s = time.perf_counter() - t0
    report = {
        "settings": {**{k: getattr(args, k) for k in ("base", "aligned", "judge", "limit", "max_tokens", "gamma",
                                                      "chunk", "max_rounds", "batch", "dtype")},
                     "load_s": load_s, "judge_method": "order-swapped next-token P(A)/P(B)"},
        "environment": env,
        "tasks": {},
    }
    with ResultsStore.open(out / "results.jsonl", repair_file=args.repair, key_fields=KEY_FIELDS, log=log) as store:
        log(f"{len(store)} rows already in {store.path}")
        sessions = sessions_after(out / "run.json", env, len(store))
        (out / "run.json").write_text(json.dumps({"identity": identity, "environment": env, "sessions": sessions},
                                                 indent=1, default=str))
        for task, items in data.items():
            run_task(store, task, items, base, aligned, config, args.batch, log)
            records, timing = task_records(store, task, items)
            entry = {"n": len(items), "timing": timing, "nudging": nudging_summary(records), "records": records}
            if task == "gsm8k":
                entry["accuracy"] = score_gsm8k(records)
            report["tasks"][task] = entry
        if "alpaca" in data and not args.no_judge:
            judge = Judge(load(args.judge, dtype), batch=min(args.batch, 8))
            report["tasks"]["alpaca"]["judge"] = judge_pairs(judge, store, "alpaca",
                                                             report["tasks"]["alpaca"]["records"], log)
        report["sessions"] = [_session_brief(x) for x in sessions]
        report["provenance"] = provenance(store.rows(), sessions)
    return write_report(out, report, log)


def _session_brief(session: dict) -> dict:
    env = session.get("environment", {})
    return {"first_row": session.get("first_row"), "device": env.get("device", {}).get("device_kind"),
            "git": env.get("git") or {},
            "versions": {k: env.get("versions", {}).get(k) for k in ("jax", "transformers")},
            "command": env.get("command"), "time_utc": env.get("time_utc")}


def write_report(out: Path, report: dict, log=print) -> dict:
    """nudging.json, nudging.md and nudging.png in `out`."""
    (out / "nudging.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "nudging.md").write_text(markdown(report))
    plot(report, out / "nudging.png")
    log(markdown(report))
    log(f"wrote {out / 'nudging.json'}, nudging.md, nudging.png")
    return report


def summarize_only(args, log=print) -> dict:
    """The report of a run folder as it stands, without loading a model (e.g. on another machine
    than the one that generated the rows: the device and versions come from its run.json)."""
    out = Path(args.out)
    run_file = out / "run.json"
    if not run_file.is_file():
        raise SystemExit(f"error: {run_file} not found: nothing to summarize (run the experiment first).")
    meta = json.loads(run_file.read_text())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        data = {t: load_task(Path(args.data_dir), t, args.limit) for t in tasks}
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    ident = meta.get("identity", {})
    report = {"settings": {**ident, "limit": args.limit, "batch": args.batch,
                           "judge_method": "order-swapped next-token P(A)/P(B)"},
              "environment": meta.get("environment", {}), "tasks": {}}
    with ResultsStore.open(out / "results.jsonl", repair_file=False, key_fields=KEY_FIELDS, log=log) as store:
        for task, items in data.items():
            done = [it for it in items if all((task, s_, it["id"]) in store for s_ in SYSTEMS)]
            if not done:
                log(f"[{task}] no item has all three answers yet")
                continue
            records, timing = task_records(store, task, done)
            entry = {"n": len(done), "requested": len(items), "timing": timing,
                     "nudging": nudging_summary(records), "records": records}
            if task == "gsm8k":
                entry["accuracy"] = score_gsm8k(records)
            if task == "alpaca" and len(done) == len(items):
                judged = judge_summary(store, task, records)
                if judged is not None:
                    entry["judge"] = judged
            report["tasks"][task] = entry
        sessions = meta.get("sessions") or [{"environment": meta.get("environment", {}), "first_row": 0}]
        report["sessions"] = [_session_brief(x) for x in sessions]
        report["provenance"] = provenance(store.rows(), sessions)
    return write_report(out, report, log)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        if args.summarize_only:
            return summarize_only(args)
        return run(args)
    except ResultsError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
