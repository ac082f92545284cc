"""Entropy-adaptive decoding (Simonds 2025): accuracy against large-model use and cost.

    python -m experiments.ead --datasets gsm8k,math500 --limit 200 --batch-size 16
    python -m experiments.ead --small toy-draft --large toy --limit 2 --max-new-tokens 16  # no weights

The paper's experiment (MATH, with LLaMA pairs up to 11B and Qwen2.5 pairs up to 14B) run with
the registry's pair, Qwen2.5-Coder 0.5B (small) and 1.5B (large) Instruct, on GSM8K and
MATH-500 (both Q4_K_M GGUF files dequantized to --dtype): for each data set and each point (the small model alone, the large model alone, and EAD at every
`--thresholds` value, in bits) every question is answered with
`decoding.generate(large, prompts, strategy=EntropyAdaptive(threshold, window, min_dwell),
draft=small)`; the end points are EAD at threshold +inf / -inf, which are exactly each model's
own decoding (tests/test_entropy_adaptive.py).

Data (relative to the repository root, `--data-dir` to override; a missing file is a clear
error): GSM8K test (`gsm8k/test.jsonl`, gold after '####') and MATH-500 (`math500/test.jsonl`,
gold after 'The answer is:'). `--limit N` takes the first N questions of each, in file order.
Greedy by default; with --temperature > 0 each batch is seeded from --seed and the index of
its first question.

Prompt: the model's chat template around the question followed by INSTRUCTION ("reason step by
step, and put your final answer within \\boxed{}"). Answers are read from the output as
`experiments.answers` documents: the last \\boxed{} (GSM8K: else the last number), normalised,
exact match.

Figures per point (over the questions answered): accuracy with its 95% Wilson interval and the
sample size; the fraction of generated tokens the large model produced; the paper's cost
(N_small P_small + N_large P_large) / (N P_large) with P the parameter count, the same with
the catch-up tokens (what a model re-reads when it becomes active) added, and with forward
calls in place of tokens (`decoding/entropy_adaptive.py` explains the three); switches per
100 tokens; the share of answers cut by --max-new-tokens; measured tokens/s (compile time
excluded, kept apart), generation seconds and tokens/s relative to the large model alone.
Token fractions and costs are token-weighted over all questions, as in the paper. Accuracy relative to the large model alone is the paper's "% of the large model's
performance".

Outputs in --out: `results.jsonl` (one row per point x question, written as it finishes),
`run.json` (settings, models, device), `summary.json`, `summary.md`, and `<dataset>.png`
(accuracy against large-model fraction and against cost, with the CIs).

Batches: questions go in batches of --batch-size (the last one padded with repeats, discarded),
prompts padded to one length per data set, so each data set compiles one program for all points
(the threshold is a traced value of the program, the end points included).
Rows of one batch run in lockstep; a model runs in a step when any row needs it, so the
measured time of a mixed batch exceeds the per-row cost the paper's formula describes.

`--summarize-only` rewrites the report from results.jsonl and run.json alone (no model loaded).
run.json keeps every session's environment (device, versions, git commit); the report names the
commit of the rows each session wrote, by their time stamps.

Resuming: rerun the same command; rows already in results.jsonl (keyed by point, data set,
question index) are skipped. A rerun whose settings differ (models, dtype, window, dwell,
catch-up width, sampling, max new tokens, seed, prompt, data files) is refused: use another
--out. Thresholds, --limit, --datasets and --batch-size may change between runs.

Exit codes: 0 done, 2 bad arguments, settings or data, 3 the results file needs --repair,
130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from decoding.shapes import bucket

from . import answers
from .store import ResultsError, ResultsStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"  # relative to the repository root
RESULTS_DIR = REPO_ROOT / "experiments" / "results" / "ead"
DATASETS = {"gsm8k": Path("gsm8k") / "test.jsonl", "math500": Path("math500") / "test.jsonl"}
DATASET_NAMES = {"gsm8k": "GSM8K", "math500": "MATH-500"}
DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"
DEFAULT_THRESHOLDS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
KEY_FIELDS = ("point", "dataset", "index")
SMALL_POINT, LARGE_POINT = "small", "large"


class SetupError(ValueError):
    """Bad arguments, settings that differ from the stored run, or missing data."""


# ----------------------------------------------------------------------------------------------
# Data and prompts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Question:
    dataset: str
    index: int  # 0-based line number in the data file
    question: str
    gold: str


def data_file(dataset: str, data_dir: str | Path | None) -> Path:
    """The data set's file: under `data_dir` (as given, relative to the working directory),
    else under ../shared/data relative to the repository root."""
    base = Path(data_dir) if data_dir is not None else REPO_ROOT / DEFAULT_DATA_DIR
    return base.resolve() / DATASETS[dataset]


def load_questions(dataset: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Question]:
    """The first `limit` questions (all when None) of a data set, with their gold answers."""
    if dataset not in DATASETS:
        raise SetupError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}.")
    path = data_file(dataset, data_dir)
    if not path.exists():
        raise SetupError(
            f"{DATASET_NAMES[dataset]} is missing: {path} does not exist. The data sets live in "
            f"../shared/data relative to the repository root (see its README); pass --data-dir DIR if they "
            "are elsewhere.")
    gold_of = answers.GOLD[dataset]
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(Question(dataset, i, row["question"], gold_of(row["answer"])))
    if not out:
        raise SetupError(f"{path} holds no questions.")
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat-templated prompt: the question, a blank line, INSTRUCTION."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


# ----------------------------------------------------------------------------------------------
# Points and statistics
# ----------------------------------------------------------------------------------------------


def point_label(threshold: float) -> str:
    if threshold == math.inf:
        return SMALL_POINT
    if threshold == -math.inf:
        return LARGE_POINT
    return f"t={threshold:g}"


def threshold_text(threshold: float) -> str:
    """JSON has no infinities: the end points' thresholds are written '+inf' / '-inf'."""
    return "+inf" if threshold == math.inf else "-inf" if threshold == -math.inf else f"{threshold:g}"


def parse_thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SetupError(f"--thresholds takes comma-separated numbers of bits, got {text!r}.") from None
    if any(math.isnan(v) for v in values):
        raise SetupError("--thresholds must not contain nan.")
    return values


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% for the default z)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, min(p, centre - half))  # exact ends despite rounding
    hi = 1.0 if k == n else min(1.0, max(p, centre + half))
    return lo, hi


def summarize(rows: Sequence[dict], params_small: int, params_large: int) -> dict:
    """{dataset: {point: figures}} (see the module doc), points in sweep order."""
    from decoding.entropy_adaptive import cost_ratio

    out: dict = {}
    for dataset in DATASETS:
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        if not ds_rows:
            continue
        points: dict = {}
        for label in sorted({r["point"] for r in ds_rows}, key=lambda p: _point_order(ds_rows, p)):
            pr = [r for r in ds_rows if r["point"] == label]
            n, k = len(pr), sum(bool(r["correct"]) for r in pr)
            ns, nl = sum(r["small_tokens"] for r in pr), sum(r["large_tokens"] for r in pr)
            cs, cl = sum(r["catchup_small"] for r in pr), sum(r["catchup_large"] for r in pr)
            fs, fl = sum(r["small_calls"] for r in pr), sum(r["large_calls"] for r in pr)
            tokens = ns + nl
            batches = {r["batch_id"]: (r["batch_run_s"], r["batch_compile_s"]) for r in pr}
            run_s = sum(v[0] for v in batches.values())
            lo, hi = wilson(k, n)
            points[label] = {
                "threshold": pr[0]["threshold"], "n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi],
                "large_fraction": nl / tokens if tokens else float("nan"),
                "cost": cost_ratio(ns, nl, params_small, params_large),
                "cost_with_catchup": cost_ratio(ns, nl, params_small, params_large, cs, cl),
                "cost_calls": cost_ratio(ns, nl, params_small, params_large, fs - ns, fl - nl),
                "switches_per_100_tokens": 100 * sum(r["switches"] for r in pr) / tokens if tokens else float("nan"),
                "mean_tokens": tokens / n, "hit_limit": sum(bool(r["hit_limit"]) for r in pr) / n,
                "small_tokens": ns, "large_tokens": nl, "catchup_small": cs, "catchup_large": cl,
                "run_s": run_s, "compile_s": sum(v[1] for v in batches.values()),
                "tokens_per_s": tokens / run_s if run_s > 0 else float("nan"),
                "devices": sorted({r.get("device", "?") for r in pr}),
            }
        large_acc = points.get(LARGE_POINT, {}).get("accuracy")
        large_tps = points.get(LARGE_POINT, {}).get("tokens_per_s")
        for p in points.values():
            p["relative_accuracy"] = p["accuracy"] / large_acc if large_acc else float("nan")
            p["relative_speed"] = p["tokens_per_s"] / large_tps if large_tps else float("nan")
        out[dataset] = points
    return out


def _point_order(rows, label):
    t = next(r["threshold"] for r in rows if r["point"] == label)
    return -float(t)  # small (+inf) first, then falling thresholds, large (-inf) last


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def session_code(rows: Sequence[dict], meta: dict) -> str:
    """The code that wrote the rows: each recorded session's commit with the rows it wrote (by
    time stamp: a session wrote the rows from its start to the next session's), and the rows
    written before the first recorded session."""
    from .summary import code_text

    sessions = sorted(meta.get("sessions") or ([meta["environment"]] if meta.get("environment") else []),
                      key=lambda e: e.get("time_utc", ""))
    counts: dict = {}
    for r in rows:
        k = max((i for i, e in enumerate(sessions) if e.get("time_utc", "") <= r.get("time_utc", "")), default=-1)
        text = code_text([sessions[k]]) if k >= 0 else (
            "commit not recorded (written before the first session run.json records)")
        counts[text] = counts.get(text, 0) + 1
    return "; ".join(f"{text}: {n} rows" for text, n in counts.items()) or code_text(sessions)


def render_markdown(summary: dict, meta: dict, rows: Sequence[dict] = ()) -> str:
    from .summary import weights_text

    lines = ["# Entropy-adaptive decoding (Simonds 2025)", ""]
    lines.append(f"Small: `{meta['small']}` ({meta['params_small'] / 1e6:.4g}M parameters); large: "
                 f"`{meta['large']}` ({meta['params_large'] / 1e6:.4g}M); dtype {meta['dtype']}; "
                 f"{meta['sampling_text']}; window {meta['window']}, min dwell {meta['min_dwell']}, catch-up width "
                 f"{meta['catchup_width']}; at most {meta['max_new_tokens']} new tokens; device "
                 f"{meta.get('device_kind', '?')}.")
    lines.append("")
    lines.append(f"Weights: small {weights_text(meta['small'], meta['dtype'])}; large "
                 f"{weights_text(meta['large'], meta['dtype'])}.")
    lines.append("")
    batch = sorted({r.get("batch_size") for r in rows if r.get("batch_size")})
    if batch:
        lines.append(f"Batches of {', '.join(map(str, batch))} questions.")
        lines.append("")
    lines.append(f"Code: {session_code(rows, meta)}.")
    lines.append("")
    lines.append("Accuracy: exact final-answer match (`experiments/answers.py`), 95% Wilson interval. Large "
                 "fraction and costs are token-weighted; cost = (N_s P_s + N_l P_l) / (N P_l) (the paper's); "
                 "'w/ catch-up' adds the tokens a model re-reads when it becomes active (arithmetic view); "
                 "'calls' weighs each model's forward calls instead of tokens (weight-read view, see "
                 "`decoding/entropy_adaptive.py`). Wall clock: tok/s = generated tokens / generation seconds over "
                 "the point's batches (compilation excluded); 'vs large tok/s' divides by the large model alone. "
                 "Rows of a batch run in lockstep and a model runs in a step when any row needs it, so a mixed "
                 "batch costs more than the per-row cost formula says.")
    for dataset, points in summary.items():
        lines += ["", f"## {DATASET_NAMES[dataset]}", "",
                  "| point | threshold (bits) | n | accuracy [95% CI] | vs large | large fraction | cost | "
                  "cost w/ catch-up | cost (calls) | switches / 100 tok | mean tokens | hit limit | tok/s | "
                  "vs large tok/s | generation s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, p in points.items():
            lo, hi = p["ci95"]
            lines.append(
                f"| {label} | {p['threshold']} | {p['n']} | {_fmt(p['accuracy'])} [{_fmt(lo)}, {_fmt(hi)}] | "
                f"{_fmt(p['relative_accuracy'])} | {_fmt(p['large_fraction'])} | {_fmt(p['cost'])} | "
                f"{_fmt(p['cost_with_catchup'])} | {_fmt(p['cost_calls'])} | "
                f"{_fmt(p['switches_per_100_tokens'], '.2f')} | "
                f"{_fmt(p['mean_tokens'], '.1f')} | {_fmt(p['hit_limit'], '.2f')} | {_fmt(p['tokens_per_s'], '.1f')} | "
                f"{_fmt(p.get('relative_speed'), '.2f')} | {_fmt(p['run_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path) -> list[str]:
    """One PNG per data set: accuracy against large fraction and against cost (with CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, points in summary.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, key, xlabel in ((axes[0], "large_fraction", "fraction of tokens by the large model"),
                                (axes[1], "cost", "cost (N_s P_s + N_l P_l) / (N P_l)")):
            sweep = [(p, label) for label, p in points.items() if label not in (SMALL_POINT, LARGE_POINT)]
            xs = [p[key] for p, _ in sweep]
            ys = [p["accuracy"] for p, _ in sweep]
            err = [[p["accuracy"] - p["ci95"][0] for p, _ in sweep], [p["ci95"][1] - p["accuracy"] for p, _ in sweep]]
            if sweep:
                ax.errorbar(xs, ys, yerr=err, fmt="o-", color="tab:blue", capsize=3, label="EAD (threshold, bits)")
                for (p, _), x, y in zip(sweep, xs, ys):
                    ax.annotate(p["threshold"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if key == "cost" and sweep:
                ax.plot([p["cost_with_catchup"] for p, _ in sweep], ys, "o", mfc="none", color="tab:blue",
                        alpha=0.6, label="EAD, cost with catch-up")
            for label, marker, color in ((SMALL_POINT, "s", "tab:orange"), (LARGE_POINT, "*", "tab:red")):
                if label in points:
                    p = points[label]
                    ax.errorbar([p[key]], [p["accuracy"]], yerr=[[p["accuracy"] - p["ci95"][0]],
                                                                 [p["ci95"][1] - p["accuracy"]]],
                                fmt=marker, color=color, markersize=9, capsize=3, label=f"{label} model only")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (95% Wilson CI)")
        n = max(p["n"] for p in points.values())
        fig.suptitle(f"Entropy-adaptive decoding on {DATASET_NAMES[dataset]} (n = {n} questions per point)")
        axes[1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    small: str = DEFAULT_SMALL
    large: str = DEFAULT_LARGE
    dtype: str = "bfloat16"
    datasets: Sequence[str] = ("gsm8k", "math500")
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    endpoints: bool = True
    window: int = 5
    min_dwell: int = 5
    catchup_width: int = 16
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None
    repair: bool = False
    progress: bool = True
    summarize_only: bool = False

    def points(self) -> list[float]:
        pts = ([math.inf] if self.endpoints else []) + sorted(set(self.thresholds), reverse=True)
        return pts + ([-math.inf] if self.endpoints else [])

    def sampling_text(self) -> str:
        if self.temperature == 0:
            return "greedy decoding"
        return f"sampling at temperature {self.temperature}, top_p {self.top_p}, seed {self.seed}"

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        def short(name):
            return Path(name).stem if ("/" in name or name.endswith(".gguf")) else name
        mode = "greedy" if self.temperature == 0 else f"t{self.temperature:g}"
        return RESULTS_DIR / f"{short(self.small)}__{short(self.large)}_{mode}_{self.max_new_tokens}tok"

    def identity(self, data_sha: dict) -> dict:
        """What stored rows depend on: a resumed run must match it."""
        return {"small": self.small, "large": self.large, "dtype": self.dtype, "window": self.window,
                "min_dwell": self.min_dwell, "catchup_width": self.catchup_width,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "instruction": INSTRUCTION, "data_sha256": data_sha}


def load_model(source: str, dtype: str):
    from . import toy

    if source in toy.TOY_NAMES:
        return toy.load_toy(source)
    import jax.numpy as jnp

    import decoding

    return decoding.load(source, dtype=getattr(jnp, dtype))


def _check_run_file(path: Path, identity: dict) -> None:
    if not path.exists():
        return
    stored = json.loads(path.read_text()).get("identity", {})
    # Data files not used before may be added; everything else must match.
    diff = [k for k in identity if k != "data_sha256" and stored.get(k) != identity[k]]
    diff += [f"data file of {d}" for d, sha in identity["data_sha256"].items()
             if d in stored.get("data_sha256", {}) and stored["data_sha256"][d] != sha]
    if diff:
        shown = "; ".join(f"{k}: stored {stored.get(k)!r}, now {identity[k]!r}" if k in identity else k for k in diff)
        raise SetupError(f"{path.parent} holds results made with other settings ({shown}). Use another --out, "
                         "or the stored settings.")


def run(cfg: Config, log=print) -> dict:
    """Run every pending (point, question); write the outputs; return the summary."""
    from decoding import generate, make_sampling
    from decoding.entropy_adaptive import EntropyAdaptive
    from .environment import describe

    for name, v, lo in (("batch-size", cfg.batch_size, 1), ("max-new-tokens", cfg.max_new_tokens, 1),
                        ("window", cfg.window, 1), ("min-dwell", cfg.min_dwell, 1),
                        ("catchup-width", cfg.catchup_width, 1)):
        if v < lo:
            raise SetupError(f"--{name} must be >= {lo}, got {v}.")
    if cfg.limit is not None and cfg.limit < 1:
        raise SetupError(f"--limit must be >= 1, got {cfg.limit}.")
    if not cfg.points():
        raise SetupError("nothing to run: give --thresholds or keep the end points.")
    questions = {d: load_questions(d, cfg.data_dir, cfg.limit) for d in cfg.datasets}
    data_sha = {d: file_sha256(data_file(d, cfg.data_dir)) for d in cfg.datasets}
    out_dir = cfg.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = cfg.identity(data_sha)
    _check_run_file(out_dir / "run.json", identity)

    sampling = make_sampling(cfg.temperature, top_p=cfg.top_p)
    small, large = load_model(cfg.small, cfg.dtype), load_model(cfg.large, cfg.dtype)
    tok = large.tokenizer
    if tok is None:
        raise SetupError(f"{cfg.large!r} was loaded without a tokenizer; the chat prompt needs one.")
    env = describe()
    device_kind = env["device"]["device_kind"]
    old = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    sessions = list(old.get("sessions") or ([old["environment"]] if "environment" in old else [])) + [env]
    meta = {"identity": {**identity, "data_sha256": _merged_sha(out_dir / "run.json", data_sha)},
            "small": cfg.small, "large": cfg.large, "dtype": cfg.dtype, "window": cfg.window,
            "min_dwell": cfg.min_dwell, "catchup_width": cfg.catchup_width, "max_new_tokens": cfg.max_new_tokens,
            "sampling_text": cfg.sampling_text(), "params_small": small.config.param_count(),
            "params_large": large.config.param_count(), "small_config": dataclasses.asdict(small.config),
            "large_config": dataclasses.asdict(large.config), "device_kind": device_kind, "environment": env,
            "sessions": sessions}
    (out_dir / "run.json").write_text(json.dumps(meta, indent=1, default=str))

    prompts = {d: [prompt_ids(tok, q.question) for q in qs] for d, qs in questions.items()}
    with ResultsStore.open(out_dir / "results.jsonl", repair_file=cfg.repair, key_fields=KEY_FIELDS, log=log) as store:
        work = []
        for d, qs in questions.items():
            for threshold in cfg.points():
                pending = [i for i, q in enumerate(qs) if (point_label(threshold), d, q.index) not in store]
                for s in range(0, len(pending), cfg.batch_size):
                    work.append((d, threshold, pending[s : s + cfg.batch_size]))
        total = sum(len(w[2]) for w in work)
        log(f"{total} answers to generate ({len(store)} already in {store.path}); {len(work)} batches of up to "
            f"{cfg.batch_size}.")
        bar = None
        if cfg.progress and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="answer", dynamic_ncols=True)
        for d, threshold, idx in work:
            qs, ps = questions[d], prompts[d]
            batch = [ps[i] for i in idx]
            batch += [batch[-1]] * (cfg.batch_size - len(batch))  # one shape per data set
            strategy = EntropyAdaptive(threshold=threshold, window=cfg.window, min_dwell=cfg.min_dwell,
                                       catchup_width=cfg.catchup_width)
            seed = cfg.seed * 1_000_003 + qs[idx[0]].index
            res = generate(large, batch, strategy=strategy, draft=small, sampling=sampling,
                           max_new_tokens=cfg.max_new_tokens, seed=seed,
                           prompt_bucket=bucket(max(len(p) for p in ps)))
            extra = res.stats.extra
            eos = set(_eos_ids(tok))
            batch_id = uuid.uuid4().hex[:12]
            for j, i in enumerate(idx):
                q = qs[i]
                text = res.texts[j]
                pred = answers.EXTRACT[d](text)
                row_tokens = res.tokens[j]
                store.append({
                    "point": point_label(threshold), "threshold": threshold_text(threshold), "dataset": d,
                    "index": q.index, "gold": q.gold, "prediction": pred,
                    "correct": bool(answers.CORRECT[d](pred, q.gold)), "output": text,
                    "new_tokens": len(row_tokens),
                    "hit_limit": len(row_tokens) >= cfg.max_new_tokens and not (row_tokens and row_tokens[-1] in eos),
                    "small_tokens": extra["small_tokens_per_row"][j], "large_tokens": extra["large_tokens_per_row"][j],
                    "catchup_small": extra["catchup_small_per_row"][j],
                    "catchup_large": extra["catchup_large_per_row"][j], "switches": extra["switches_per_row"][j],
                    "small_calls": extra["small_calls_per_row"][j], "large_calls": extra["large_calls_per_row"][j],
                    "batch_id": batch_id, "batch_rows": len(idx), "batch_size": cfg.batch_size,
                    "batch_run_s": res.stats.run_s, "batch_compile_s": res.stats.compile_s,
                    "prompt_tokens": len(ps[i]), "device": device_kind,
                    "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                })
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix_str(f"{DATASET_NAMES[d]} {point_label(threshold)}")
        if bar is not None:
            bar.close()
        rows = [r for r in store.rows() if r["dataset"] in cfg.datasets]
    return write_report(out_dir, rows, meta, log)


def write_report(out_dir: Path, rows: Sequence[dict], meta: dict, log=print) -> dict:
    """summary.json, summary.md and the plots of `rows`; returns the summary."""
    summary = summarize(rows, meta["params_small"], meta["params_large"])
    (out_dir / "summary.json").write_text(json.dumps({"meta": {k: v for k, v in meta.items()
                                                               if k not in ("environment", "sessions")},
                                                      "code": session_code(rows, meta),
                                                      "points": summary}, indent=1, default=str))
    (out_dir / "summary.md").write_text(render_markdown(summary, meta, rows))
    plots = plot(summary, out_dir)
    log(f"wrote {out_dir / 'summary.md'}, {out_dir / 'summary.json'} and {', '.join(plots)}")
    return summary


def summarize_only(out_dir: Path, log=print) -> dict:
    """Rewrite the report of a run folder from its results.jsonl and run.json (no model loaded)."""
    run_file = out_dir / "run.json"
    if not run_file.is_file():
        raise SetupError(f"{run_file} not found: nothing to summarize (run the experiment first, or pass its --out).")
    meta = json.loads(run_file.read_text())
    with ResultsStore.open(out_dir / "results.jsonl", repair_file=False, key_fields=KEY_FIELDS, log=log) as store:
        rows = store.rows()
    return write_report(out_dir, rows, meta, log)


def _eos_ids(tokenizer) -> tuple:
    from decoding.generation import default_eos_ids

    return default_eos_ids(tokenizer)


def _merged_sha(run_file: Path, data_sha: dict) -> dict:
    if not run_file.exists():
        return dict(data_sha)
    stored = json.loads(run_file.read_text()).get("identity", {}).get("data_sha256", {})
    return {**stored, **data_sha}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m experiments.ead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default=DEFAULT_SMALL, help="small model: registry name, path, or 'toy-draft'")
    p.add_argument("--large", default=DEFAULT_LARGE, help="large model: registry name, path, or 'toy'")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--datasets", default="gsm8k,math500", help="comma-separated: gsm8k, math500")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                   help="EAD thresholds in bits (rolling mean entropy above which the large model generates)")
    p.add_argument("--no-endpoints", action="store_true", help="skip the small-only and large-only points")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--min-dwell", type=int, default=5)
    p.add_argument("--catchup-width", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each data set (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder holding gsm8k/ and math500/ (default: ../shared/data "
                   "relative to the repository root)")
    p.add_argument("--out", default=None, help=f"output folder (default: under {RESULTS_DIR})")
    p.add_argument("--repair", action="store_true", help="keep the valid rows of a damaged results.jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summarize-only", action="store_true",
                   help="rewrite the report of --out from its results.jsonl and run.json and exit (no model loaded)")
    a = p.parse_args(argv)
    datasets = tuple(d.strip() for d in a.datasets.split(",") if d.strip())
    bad = [d for d in datasets if d not in DATASETS]
    if bad or not datasets:
        raise SetupError(f"--datasets takes a comma-separated subset of {', '.join(DATASETS)}, got {a.datasets!r}.")
    return Config(small=a.small, large=a.large, dtype=a.dtype, datasets=datasets,
                  thresholds=parse_thresholds(a.thresholds), endpoints=not a.no_endpoints, window=a.window,
                  min_dwell=a.min_dwell, catchup_width=a.catchup_width, limit=a.limit, batch_size=a.batch_size,
                  max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                  data_dir=a.data_dir, out=a.out, repair=a.repair, progress=not a.no_progress,
                  summarize_only=a.summarize_only)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        t0 = time.perf_counter()
        if cfg.summarize_only:
            summarize_only(cfg.out_dir())
            return 0
        run(cfg)
        print(f"done in {time.perf_counter() - t0:.0f} s")
        return 0
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
