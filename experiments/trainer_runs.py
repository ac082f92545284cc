"""What the drafter-training experiments share (`experiments.distillspec`,
`experiments.feature_drafters`, `experiments.hidden_transfer`): their data, training and
evaluation flags, the data builder, the resumable run over rows, Spec-Bench through the
harness's command line, and the summary files. Each script keeps its rows, training, tuning
and tables; docs/distill.md describes the runs.

A run writes <out>/results.jsonl, one record per (row, kind): "train", the script's tuning kind
and "specbench_b<B>". A stage whose record is present is skipped, so rerunning the same command
does only what is missing. Exit codes of `main`: 0 done, 2 bad arguments, 130 interrupted or a
row's training stopped before its budget (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def new_parser(prog: str, doc: str, results_root: Path, toy_help: str) -> argparse.ArgumentParser:
    """An experiment's parser (`prog`: "python -m experiments.<name>"; its description: the first
    line of `doc`) with --toy and --out."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--toy", action="store_true", help=toy_help)
    p.add_argument("--out", default=None, help=f"output folder (default {results_root}/<run>)")
    return p


def add_dtype_and_rows(p: argparse.ArgumentParser, default_rows: Sequence[str]) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rows", default=",".join(default_rows), help="comma-separated rows (see the module doc)")


def add_specbench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--specbench-batch", default="1,8", help="Spec-Bench batch sizes ('' to skip Spec-Bench)")
    p.add_argument("--specbench-subset", default="all")
    p.add_argument("--specbench-tokens", type=int, default=256)


def add_run_arguments(p: argparse.ArgumentParser, *, seq_len: int = 1024, accumulate: int = 8, steps: int = 1000,
                      lr: float | None = 5e-5, lr_help: str = "learning rate", seq_len_help: str = "",
                      eval_every_help: str = "acceptance on held-out prompts every N steps (0: end)") -> None:
    """The data, training and evaluation flags every drafter-training experiment shares."""
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


def split_list(text) -> list[str]:
    """A comma-separated flag as its non-empty items ('' -> [])."""
    return [s for s in str(text).split(",") if s]


def apply_toy(args, parser: Callable[[], argparse.ArgumentParser], small: dict) -> None:
    """The small --toy settings `small`, each only where its flag was left at its default."""
    defaults = parser().parse_args([])
    for k, v in small.items():
        if getattr(args, k) == getattr(defaults, k):
            setattr(args, k, v)


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------


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


def trained(row_dir: Path) -> dict | None:
    """The training record of a row whose training is done (<row_dir>/trained.json), else None."""
    done_file = row_dir / "trained.json"
    return json.loads(done_file.read_text()) if done_file.is_file() else None


def training_record(label: str, summary: dict, cfg, minutes: float, row_dir: Path) -> tuple[dict, dict]:
    """(the record fields every row's training reports, the last "train" metrics row or {}), from
    `distill.Trainer.run`'s summary and <row_dir>/metrics.jsonl."""
    from distill.trainer import read_jsonl

    train_rows = [m for m in read_jsonl(row_dir / "metrics.jsonl") if m.get("kind") == "train"]
    last = train_rows[-1] if train_rows else {}
    return {"row": label, "steps": summary["step"], "stopped": summary["stopped"],
            "tokens_seen": summary["step"] * cfg.batch_size * cfg.accumulate * cfg.seq_len,
            "train_tokens_per_s": last.get("tokens_per_s"), "train_minutes": minutes,
            "final_loss": last.get("loss")}, last


def finish_training(row_dir: Path, record: dict, summary: dict, cfg) -> dict:
    """Mark the row trained (write `record` to <row_dir>/trained.json) when it reached its steps
    or stopped at the time budget; returns `record`."""
    if summary["step"] >= cfg.steps or summary["stopped"] == "time budget":
        (row_dir / "trained.json").write_text(json.dumps(record, indent=1))
    return record


def cast(params, dtype):
    import jax

    return jax.tree.map(lambda x: x.astype(dtype), params)


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


# --------------------------------------------------------------------------------------------
# Evaluation on the tuning split and Spec-Bench
# --------------------------------------------------------------------------------------------


def generate_timed(target, prompts, batch: int, *, strategy=None, draft=None, max_new_tokens: int, bucket: int):
    """(new tokens, run seconds, target forwards, accept histogram or None) of `decoding.generate`
    over `prompts` in batches of `batch` (the last one filled by repeating its last prompt;
    repeats do not count), after one untimed call on the first batch (compiling)."""
    import numpy as np

    import decoding

    kw = dict(strategy=strategy, draft=draft, max_new_tokens=max_new_tokens, prompt_bucket=bucket)
    tokens = forwards = 0
    run_s = 0.0
    hist = None
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n)
        if start == 0:
            decoding.generate(target, chunk, **kw)
        st = decoding.generate(target, chunk, **kw).stats
        tokens += sum(st.tokens_per_row[:n])
        forwards += sum(st.forwards_per_row[:n])
        run_s += st.run_s
        if "accept_histogram" in st.extra and n == batch:
            h = np.asarray(st.extra["accept_histogram"], np.int64)
            hist = h if hist is None else hist + h
    return tokens, run_s, forwards, hist


def acceptance_per_position(hist) -> list:
    """P(depth d reached | depth d - 1 reached) for d = 1.. of an accept histogram (None where
    d - 1 was never reached; [] without a histogram)."""
    reach = [int(hist[d:].sum()) for d in range(len(hist))] if hist is not None else []
    return [reach[d] / reach[d - 1] if reach[d - 1] else None for d in range(1, len(reach))]


def run_specbench(args, run_dir: Path, batch: int, what: str, head: Sequence[str], tail: Sequence[str] = ()) -> dict:
    """Spec-Bench through the harness's command line (`experiments.specbench` with the flags
    `head`, then this run's batch, subset, tokens and `run_dir`, then `tail`; the harness resumes
    by itself): {"command", "methods": overall figures per method}. `what` names the run in the
    error of a failed one."""
    cmd = [sys.executable, "-m", "experiments.specbench", *head, "--batch-size", str(batch), "--subset",
           args.specbench_subset, "--max-new-tokens", str(args.specbench_tokens), "--out", str(run_dir),
           "--no-progress", *tail]
    print("$ " + " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        raise RuntimeError(f"{what} exited with {rc}; rerun to resume it.")
    summary = json.loads((run_dir / "summary.json").read_text())["summary"]["methods"]
    return {"command": " ".join(cmd), "methods": {label: d.get("overall", {}) for label, d in summary.items()}}


# --------------------------------------------------------------------------------------------
# Results and the resumable run
# --------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    from distill.trainer import read_jsonl

    return read_jsonl(path)


def append_result(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Stopped(Exception):
    """A row's training stopped before its step budget and its time budget (`main` exits 130)."""

    def __init__(self, label: str, step: int):
        super().__init__(f"{label}: stopped at step {step}; rerun to continue.")


class Results:
    """<out>/results.jsonl of a run: one record per (row, kind), each appended durably."""

    def __init__(self, out: Path):
        self.path = out / "results.jsonl"

    def read(self) -> list[dict]:
        return read_results(self.path)

    def have(self) -> set[tuple[str, str]]:
        """The (row, kind) pairs recorded."""
        return {(r["row"], r["kind"]) for r in self.read()}

    def append(self, record: dict) -> None:
        append_result(self.path, record)

    def get(self, label: str, kind: str) -> dict:
        """The record of (label, kind); StopIteration when there is none."""
        return next(r for r in self.read() if r["row"] == label and r["kind"] == kind)

    def stage(self, have: set, label: str, kind: str, compute: Callable[[], dict]) -> None:
        """Record {"row": label, "kind": kind, **compute()} unless (label, kind) is in `have`."""
        if (label, kind) not in have:
            self.append({"row": label, "kind": kind, **compute()})

    def train(self, have: set, label: str, row_dir: Path, train: Callable[[], dict]) -> None:
        """Record the training record `train()` returns unless one is in `have`; raise `Stopped`
        when <row_dir>/trained.json is still missing after it (training not done)."""
        if (label, "train") in have:
            return
        record = train()
        if trained(row_dir) is None:
            raise Stopped(label, record["steps"])
        self.append({**record, "kind": "train"})

    def each(self, rows: Iterable) -> Iterator[tuple[Any, set]]:
        """(row, the (row, kind) pairs recorded when it starts) for each row; its time is reported
        once the loop body has run for it."""
        for row in rows:
            have = self.have()
            t0 = time.perf_counter()
            yield row, have
            print(f"{row.label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main(argv: Sequence[str] | None, *, parser: Callable[[], argparse.ArgumentParser], toy: dict,
         parse_row: Callable[[str], Any], results_root: Path,
         run: Callable[[argparse.Namespace, list, list[int], Path, Results], None],
         summarize: Callable[[Path, list[dict], argparse.Namespace], Any],
         check: Callable[[argparse.Namespace], None] = lambda args: None) -> int:
    """Parse `argv` with `parser()` (with --toy, the settings `toy` where a flag was left at its
    default), then the comma lists: --rows with `parse_row`, --sources, the script's own with
    `check` (raising ValueError), --specbench-batch; then `run(args, rows, batches, out, results)`
    in <out> (--out, else <results_root>/toy or /run) and `summarize(out, records, args)` (the
    summary files). args.command records the command that ran (the parser's prog and `argv`)."""
    p = parser()
    args = p.parse_args(argv)
    args.command = f"{p.prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.toy:
        apply_toy(args, parser, toy)
    try:
        rows = [parse_row(r) for r in args.rows.split(",") if r]
        args.sources = split_list(args.sources)
        check(args)
        batches = [int(b) for b in split_list(args.specbench_batch)]
        if args.toy and batches:
            raise ValueError("Spec-Bench needs the real target: drop --specbench-batch with --toy.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else results_root / ("toy" if args.toy else "run")
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = Results(out)
        run(args, rows, batches, out, results)
        summarize(out, results.read(), args)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue.", file=sys.stderr)
        return 130
    print(out / "summary.md")
    return 0


# --------------------------------------------------------------------------------------------
# Summary files
# --------------------------------------------------------------------------------------------


def fmt(x) -> str:
    """A table cell: '-' for None, floats to 3 significant digits."""
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def by_row(results: list[dict]) -> dict[str, dict]:
    """{row: {kind: record}} in the order rows first appear."""
    grouped: dict[str, dict] = {}
    for r in results:
        grouped.setdefault(r["row"], {})[r["kind"]] = r
    return grouped


def write_summary_files(out: Path, lines: list[str], rows: dict, args) -> dict:
    """summary.md (the table `lines`) and summary.json ({"rows", "command", "toy"}); returns the latter."""
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"rows": rows, "command": args.command, "toy": args.toy}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot_summary(out: Path, rows: dict, slug: Callable[[str], str], *, loss_label: str, right_title: str,
                 draw_right: Callable[[Any, str, dict], None]) -> None:
    """summary.png: each row's training loss (from <out>/<slug>/metrics.jsonl) on the left and
    whatever `draw_right(axes, label, kinds)` draws against the draft position on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.trainer import read_jsonl

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, kinds in rows.items():
        draw_right(axes[1], label, kinds)
        train = [m for m in read_jsonl(out / slug(label) / "metrics.jsonl") if m.get("kind") == "train"]
        if train:
            axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], label=label)
    axes[0].set_xlabel("step"), axes[0].set_ylabel(loss_label), axes[0].set_title("training loss")
    axes[1].set_xlabel("draft position"), axes[1].set_ylabel("acceptance"), axes[1].set_title(right_title)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)
