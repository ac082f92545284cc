"""Spec-Bench runner: any strategy x drafter x sampling setting, resumable, with a leaderboard.

    python -m experiments.specbench --subset reference16 --methods ar,spec,tree,pld,layerskip,hf_ar,hf_assisted
    python -m experiments.specbench --target toy --draft toy-draft --methods ar --max-new-tokens 16  # no weights

What it does, per method (in the order given; the baseline, `ar` by default, should be in
the run: speedups are only taken against a baseline measured in the same run):
  1. builds the method (see `experiments.methods`), failing early with a clear message if a
     strategy or library is missing;
  2. warms up: runs untimed on one batch of each prompt-length bucket that its pending turn-1
     questions need, so compilation happens before timing; the compile time is recorded
     separately (`events.jsonl`, and per row when a later prompt still compiled something);
  3. runs every pending (question, turn): turn 1 of all questions, then turn 2 of MT-bench
     questions, asked after the method's own turn-1 answer in the chat history. Batches are
     formed within one category and turn. Each finished row is appended to `results.jsonl`
     at once (flush + fsync).
Then it writes `summary.json`, `summary.md`, `speedup.png` and `tau.png` (`experiments.summary`
defines every figure) in the output directory.

Resuming: rerun the same command. Rows are keyed by method label + question id + turn; keys
already in `results.jsonl` are skipped, so nothing is recomputed and nothing is written twice.
`run.json` records what the rows mean (target, draft, dtype, sampling, max new tokens, batch
size, seed, chat template, question file hash, device): a rerun whose settings differ is
refused — use another --out. A damaged results file is never overwritten silently: see
`experiments.store` and --repair.

Exit codes: 0 done, 1 a method failed (others still ran), 2 bad arguments or settings,
3 the results file needs attention (--repair), 130 interrupted (rerun to continue).

Modules, by job: `config` (settings, models, prompts), `identity` (run.json and what a resumed
run must match), `runner` (running methods, storing rows), `events` (the event log), `merge`
(merging run folders), `report` (summary and plots), `cli` (the command line).
"""

from .cli import config_from_args, main
from .config import (DEFAULT_DRAFT, DEFAULT_TARGET, RESULTS_DIR, BenchConfig, BenchEnv, build_prompt, default_draft,
                     draft_from_arg)
from .events import append_event, open_errors, read_events
from .identity import (RUN_SCHEMA, SettingsMismatch, check_identity, check_method_options, method_defaults,
                       read_run_meta, same_options)
from .merge import fill_missing_methods, merge_runs
from .report import device_profile, write_summary
from .runner import run

__all__ = [
    "DEFAULT_DRAFT", "DEFAULT_TARGET", "RESULTS_DIR", "RUN_SCHEMA", "BenchConfig", "BenchEnv", "SettingsMismatch",
    "append_event", "build_prompt", "check_identity", "check_method_options", "config_from_args", "default_draft",
    "device_profile", "draft_from_arg", "fill_missing_methods", "main", "merge_runs", "method_defaults",
    "open_errors", "read_events", "read_run_meta", "run", "same_options", "write_summary",
]
