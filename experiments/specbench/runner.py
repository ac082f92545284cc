"""Running a benchmark: each method's pending (question, turn) items, warmed up per prompt-shape
bucket, batched within a turn (and a category), each finished row stored at once."""

from __future__ import annotations

import dataclasses
import sys
import traceback
import uuid
from pathlib import Path
from typing import Sequence

from decoding.shapes import prompt_bucket

from .. import methods as methods_mod
from .. import questions as qmod
from ..store import ResultsError, ResultsStore
from .config import BenchConfig, BenchEnv, build_prompt
from .events import append_event, now, write_json
from .identity import RUN_SCHEMA, check_identity, check_method_options, read_run_meta
from .report import device_profile, write_summary


def _seed(cfg: BenchConfig, item: qmod.WorkItem) -> int:
    return (cfg.seed * 1_000_003 + item.question_id * 10 + item.turn) % (2**31 - 1)


def _batches(items: Sequence[qmod.WorkItem], size: int, batching: str = "category") -> list[list[qmod.WorkItem]]:
    """Consecutive batches of at most `size` items of one turn; with "category" batching also of
    one category (each batch's time belongs to one category; the reference prompts, two per
    category, then make batches of two), with "mixed" batching filled to `size` in order."""
    out, cur = [], []
    for it in items:
        other = cur and (cur[0].turn != it.turn or (batching == "category" and cur[0].category != it.category))
        if cur and (len(cur) == size or other):
            out.append(cur)
            cur = []
        cur.append(it)
    if cur:
        out.append(cur)
    return out


class _Runner:
    """Runs the pending items of one method and stores each row as soon as it exists."""

    def __init__(self, cfg: BenchConfig, env: BenchEnv, store: ResultsStore, out_dir: Path, session: str,
                 on_info=None):
        self.cfg, self.env, self.store, self.out_dir, self.session = cfg, env, store, out_dir, session
        self._prompts: dict = {}
        self.infos: dict = {}  # label -> Method.info() of the methods built in this session
        self.on_info = on_info or (lambda label, info: None)  # called as soon as a method's info is known

    def prompt(self, label: str, item: qmod.WorkItem) -> list[int]:
        key = (label, item.question_id, item.turn) if item.turn > 1 else (item.question_id, 1)
        if key not in self._prompts:
            answers = []
            for t in range(1, item.turn):
                row = self.store.get((label, item.question_id, t))
                if row is None:
                    raise RuntimeError(f"turn {item.turn} of question {item.question_id} needs {label}'s turn-{t} "
                                       "answer, which is not in the results (did turn 1 fail?).")
                answers.append(row["text"])
            self._prompts[key] = build_prompt(self.env.tokenizer, item, answers, self.cfg.chat)
        return self._prompts[key]

    def _warmup(self, method, label: str, pending: Sequence[qmod.WorkItem]) -> None:
        first = [it for it in pending if it.turn == 1] or list(pending)
        shapes: dict = {}
        for batch in _batches(first, self.cfg.batch_size, self.cfg.batching):
            prompts = [self.prompt(label, it) for it in batch]
            shapes.setdefault((len(batch), prompt_bucket(max(len(p) for p in prompts))), (prompts, batch[0]))
            if not method.warmup_per_shape:
                break
        total = 0.0
        for prompts, item in shapes.values():
            total += method.warmup(prompts, _seed(self.cfg, item))
        append_event(self.out_dir, {"event": "warmup", "method": label, "session": self.session,
                                    "shapes": [list(k) for k in shapes], "warmup_s": total, "time_utc": now()})
        if self.cfg.phase_times and hasattr(method, "phase_times"):
            prompts, item = next(iter(shapes.values()))
            phases = method.phase_times(prompts)
            if phases:
                append_event(self.out_dir, {"event": "phases", "method": label, "session": self.session,
                                            **phases, "time_utc": now()})

    def _row(self, label, item, prompt, gen, i, seed) -> dict:
        b = len(gen.tokens)
        tokens = [int(t) for t in gen.tokens[i]]
        forwards = gen.row_forwards[i] if gen.row_forwards is not None else gen.target_forwards
        time_s = gen.run_s / b
        return {
            "schema": 1, "method": label, "question_id": item.question_id, "turn": item.turn,
            "category": item.category, "task": item.question.task, "prompt_tokens": len(prompt),
            "new_tokens": len(tokens), "target_forwards": int(forwards),
            "tau": len(tokens) / forwards if forwards else gen.tau,
            "time_s": time_s, "tokens_per_s": len(tokens) / time_s if time_s > 0 else None,
            "compile_s": gen.compile_s / b, "batch_size": b, "batch_run_s": gen.run_s,
            "output_tokens": tokens, "text": gen.texts[i], "extra": gen.extra,
            "seed": seed, "session": self.session, "finished_utc": now(),
        }

    def run(self, resolved: methods_mod.Resolved, items: Sequence[qmod.WorkItem]) -> None:
        label = resolved.label
        pending = [it for it in items if (label, it.question_id, it.turn) not in self.store]
        if not pending:
            return
        method = resolved.build(self.env)
        self.infos[label] = method.info()
        self.on_info(label, self.infos[label])  # persisted now: a run killed mid-method keeps the method's settings and cost
        try:
            self._warmup(method, label, pending)
            bar = _progress(len(pending), label, self.cfg.progress)
            for turn in sorted({it.turn for it in pending}):
                for batch in _batches([it for it in pending if it.turn == turn], self.cfg.batch_size,
                                      self.cfg.batching):
                    prompts = [self.prompt(label, it) for it in batch]
                    seed = _seed(self.cfg, batch[0])
                    gen = method.generate(prompts, seed)
                    if len(gen.tokens) != len(batch):
                        raise RuntimeError(f"{label} returned {len(gen.tokens)} rows for a batch of {len(batch)}.")
                    for i, (it, prompt) in enumerate(zip(batch, prompts)):
                        self.store.append(self._row(label, it, prompt, gen, i, seed))
                    bar.update(len(batch))
            bar.close()
            self.infos[label] = method.info()
            append_event(self.out_dir, {"event": "done", "method": label, "session": self.session,
                                        "time_utc": now()})
        finally:
            method.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, file=sys.stderr)


def _resolve_methods(cfg: BenchConfig, log) -> list:
    """The methods asked for (an unavailable one is an error), or the available defaults."""
    if cfg.methods:
        return methods_mod.resolve(cfg.methods)
    out = []
    for name in methods_mod.default_methods():
        try:
            out += methods_mod.resolve([name])
        except methods_mod.MethodUnavailable as err:
            log(f"skipping default method {name}: {err}")
    if not out:
        raise methods_mod.MethodUnavailable("none of the default methods can run here.")
    return out


def run(cfg: BenchConfig, *, log=None) -> dict:
    """Run (or continue) a benchmark; returns the summary dict (also written to disk)."""
    from .. import environment

    log = log or (lambda msg: print(msg, file=sys.stderr))
    resolved = _resolve_methods(cfg, log)
    questions_path = Path(cfg.questions) if cfg.questions else qmod.DEFAULT_QUESTIONS
    items = qmod.select(qmod.load_questions(questions_path), cfg.subset, per_category=cfg.per_category,
                        categories=cfg.categories, question_ids=cfg.question_ids, first_turn_only=cfg.first_turn_only)
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1.")
    if cfg.batching not in ("category", "mixed"):
        raise ValueError(f"--batching must be 'category' or 'mixed', got {cfg.batching!r}.")
    out_dir = cfg.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    env_info = environment.describe()
    identity = cfg.identity(qmod.file_sha256(questions_path), env_info["device"]["device_kind"])
    with ResultsStore.open(out_dir / "results.jsonl", repair_file=cfg.repair, log=log) as store:
        meta = read_run_meta(out_dir)
        check_identity(meta, identity, out_dir)
        check_method_options(meta, resolved, out_dir)
        session = uuid.uuid4().hex[:12]
        meta = meta or {"schema": RUN_SCHEMA, "identity": identity, "methods": {}, "sessions": []}
        meta["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("repair", "progress")}
        meta["config"]["sampling"] = cfg.sampling_text()
        meta["sessions"].append({"session": session, "started_utc": now(), "environment": env_info})
        write_json(out_dir / "run.json", meta)
        append_event(out_dir, {"event": "session", "session": session, "time_utc": now(),
                               "selection": qmod.describe_selection(items),
                               "methods": [r.label for r in resolved]})
        log(f"{len(items)} (question, turn) items x {len(resolved)} methods -> {out_dir} "
            f"({len(store)} rows already there)")
        env = BenchEnv(cfg)

        def record(label: str, info: dict) -> None:
            """Keep a method's settings and cost, the loaded configs and the device profile in run.json."""
            r = next(x for x in resolved if x.label == label)
            meta["methods"][label] = {"name": r.spec.name, "options": r.options, "cost": info.get("cost"),
                                      "info": info}
            meta.update(env.loaded_configs())
            if meta.get("target_config") and "device_profile" not in meta:
                prof = device_profile(cfg.profile, identity["device_kind"])
                if prof is not None:
                    meta["device_profile"] = prof.as_dict()
            write_json(out_dir / "run.json", meta)

        runner = _Runner(cfg, env, store, out_dir, session, on_info=record)
        failed = []
        for r in resolved:
            try:
                runner.run(r, items)
            except (KeyboardInterrupt, ResultsError):
                raise
            except Exception as err:  # a failing method is recorded, the others still run
                if cfg.fail_fast:
                    raise
                failed.append(r.label)
                append_event(out_dir, {"event": "error", "method": r.label, "session": session, "time_utc": now(),
                                       "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc()[-4000:]})
                log(f"method {r.label} failed: {type(err).__name__}: {err}")
            if r.label in runner.infos:  # built in this session: record its final info (load / compile times)
                record(r.label, runner.infos[r.label])
        result = write_summary(out_dir, store.rows(), meta, cfg.baseline, cfg.greedy, [r.label for r in resolved])
    result["failed"] = failed
    log(f"wrote {out_dir / 'summary.md'}")
    return result
