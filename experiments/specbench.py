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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Sequence

from . import methods as methods_mod
from . import questions as qmod
from .store import ResultsError, ResultsStore

RESULTS_DIR = qmod.REPO_ROOT / "experiments" / "results" / "specbench"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
RUN_SCHEMA = 1


class SettingsMismatch(ValueError):
    """The output directory holds results made with other settings."""


# --------------------------------------------------------------------------------------------
# Configuration and the models a run uses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchConfig:
    target: str = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT
    dtype: str = "bfloat16"
    methods: Sequence[str] = ()
    baseline: str = "ar"
    questions: str | None = None
    subset: str = "all"
    per_category: int | None = None
    categories: Sequence[str] | None = None
    question_ids: Sequence[int] | None = None
    first_turn_only: bool = False
    max_new_tokens: int = 256
    batch_size: int = 1
    batching: str = "category"
    prompt_bucket: int = 0
    phase_times: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True
    out: str | None = None
    repair: bool = False
    profile: str = "auto"
    fail_fast: bool = False
    progress: bool = True
    tuned_on: str | None = None  # subset the methods' settings were tuned on: the report adds held-out figures

    @property
    def sampling_settings(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_text(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}, seed {self.seed}"

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = Path(self.target).stem if ("/" in self.target or self.target.endswith(".gguf")) else self.target
        parts = [name, self.subset]
        if self.per_category:
            parts.append(f"pc{self.per_category}")
        parts.append("greedy" if self.greedy else f"t{self.temperature}")
        parts += [f"{self.max_new_tokens}tok", f"b{self.batch_size}"]
        return RESULTS_DIR / "_".join(parts)

    def identity(self, questions_sha: str, device_kind: str) -> dict:
        """What the stored rows depend on: a resumed run must match it."""
        return {
            "target": self.target, "draft": self.draft, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size, "sampling": self.sampling_settings, "seed": self.seed,
            "chat": self.chat, "questions_sha256": questions_sha, "device_kind": device_kind,
            # named only when not the default, so runs stored before the option still resume
            **({"batching": self.batching} if self.batching != "category" else {}),
        }


class BenchEnv:
    """The models, tokenizer and settings shared by the methods of a run (loaded on demand)."""

    def __init__(self, cfg: BenchConfig):
        from . import toy

        self.target_source, self.draft_source = cfg.target, cfg.draft
        self.dtype = cfg.dtype
        self.max_new_tokens = cfg.max_new_tokens
        self.prompt_bucket = cfg.prompt_bucket or None
        self.sampling_settings = cfg.sampling_settings
        self.is_toy = cfg.target in toy.TOY_NAMES
        self._target = self._draft = None
        self._tokenizer = toy.ByteTokenizer() if self.is_toy else None

    def _load(self, source):
        from . import toy

        if source in toy.TOY_NAMES:
            return toy.load_toy(source)
        import jax.numpy as jnp

        import decoding

        return decoding.load(source, dtype=getattr(jnp, self.dtype))

    @property
    def target(self):
        if self._target is None:
            self._target = self._load(self.target_source)
        return self._target

    @property
    def draft(self):
        if self.draft_source is None:
            raise methods_mod.MethodUnavailable("this method needs a draft model: pass --draft NAME_OR_PATH.")
        if self._draft is None:
            self._draft = self._load(self.draft_source)
        return self._draft

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.target.tokenizer
            if self._tokenizer is None:
                raise ValueError(f"the target {self.target_source!r} was loaded without a tokenizer; the benchmark "
                                 "needs one to apply the chat template.")
        return self._tokenizer

    def loaded_configs(self) -> dict:
        out = {}
        if self._target is not None:
            out["target_config"] = dataclasses.asdict(self._target.config)
        if self._draft is not None:
            out["draft_config"] = dataclasses.asdict(self._draft.config)
        return out

    def sampling(self):
        import decoding

        return decoding.make_sampling(**self.sampling_settings)

    def eos_ids(self) -> tuple:
        from decoding.generation import default_eos_ids

        return default_eos_ids(self.tokenizer)


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def build_prompt(tokenizer, item: qmod.WorkItem, previous_answers: Sequence[str], chat: bool = True) -> list[int]:
    """Token ids of `item`'s turn: earlier turns with the method's own answers, then this turn."""
    turns = item.question.turns[: item.turn]
    if len(previous_answers) != item.turn - 1:
        raise ValueError(f"turn {item.turn} needs {item.turn - 1} earlier answer(s), got {len(previous_answers)}.")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the target's tokenizer has no chat template (a base model?); pass --no-chat.")
        messages = []
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            if i < len(previous_answers):
                messages.append({"role": "assistant", "content": previous_answers[i]})
        return _chat_ids(tokenizer, messages)
    pieces = []
    for i, text in enumerate(turns):
        pieces.append(text)
        if i < len(previous_answers):
            pieces.append(previous_answers[i])
    return [int(t) for t in tokenizer.encode("\n\n".join(pieces) + "\n\n", add_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# Run bookkeeping: run.json and events.jsonl
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(value):
    """NaN and infinities -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_meta(out_dir: Path) -> dict | None:
    path = out_dir / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SettingsMismatch(f"{path} is not valid JSON ({err}); it records what the stored results mean, "
                               "so the run cannot continue safely. Restore it or use another --out.") from err


def check_identity(stored: dict | None, identity: dict, out_dir: Path) -> None:
    if stored is None:
        return
    old = stored.get("identity", {})
    diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SettingsMismatch(
            f"{out_dir} holds results made with other settings ({shown}). Mixing them would make the "
            "figures meaningless: use another --out, or rerun with the stored settings."
        )


def same_options(old: dict | None, new: dict | None, defaults: dict) -> bool:
    """Whether two records of a method's options mean the same run. An option missing from a
    record stands at its default: an option added to a method later (`graphs=`, `attention=`,
    `confidence=`) defaults to the old behaviour, so older rows keep their meaning."""
    old, new = old or {}, new or {}
    return all(old.get(k, defaults.get(k)) == new.get(k, defaults.get(k)) for k in set(old) | set(new))


def _defaults_of(name: str | None) -> dict:
    spec = methods_mod.registered().get(name or "")
    return dict(spec.defaults) if spec is not None else {}


def check_method_options(stored: dict | None, resolved: Sequence[methods_mod.Resolved], out_dir: Path) -> None:
    """A label must keep meaning the same settings (defaults may change between versions)."""
    for r in resolved:
        old = (stored or {}).get("methods", {}).get(r.label)
        if old is not None and not same_options(old.get("options"), r.options, r.spec.defaults):
            raise SettingsMismatch(
                f"{out_dir} holds rows of method {r.label!r} made with options {old.get('options')}, but "
                f"{r.label!r} now means {r.options} (its defaults changed). Mixing them would make the figures "
                "meaningless: use another --out."
            )


def append_event(out_dir: Path, event: dict) -> None:
    line = (json.dumps(event, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(out_dir / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_events(out_dir: Path) -> list[dict]:
    path = out_dir / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: events are informational
    return out


def open_errors(events: Sequence[dict]) -> list[dict]:
    """Each method's last failure not followed by a successful completion."""
    last: dict[str, dict] = {}
    for e in events:
        if e.get("event") == "error":
            last[e["method"]] = e
        elif e.get("event") == "done":
            last.pop(e["method"], None)
    return list(last.values())


# --------------------------------------------------------------------------------------------
# Running one method
# --------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """The padded prompt length `decoding.generate` compiles for (powers of two from 16, then
    multiples of 16 above 2048): prompts of one bucket share a compiled program."""
    if n > 2048:
        return (n + 15) // 16 * 16
    b = 16
    while b < n:
        b *= 2
    return b


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
            shapes.setdefault((len(batch), _bucket(max(len(p) for p in prompts))), (prompts, batch[0]))
            if not method.warmup_per_shape:
                break
        total = 0.0
        for prompts, item in shapes.values():
            total += method.warmup(prompts, _seed(self.cfg, item))
        append_event(self.out_dir, {"event": "warmup", "method": label, "session": self.session,
                                    "shapes": [list(k) for k in shapes], "warmup_s": total, "time_utc": _now()})
        if self.cfg.phase_times and hasattr(method, "phase_times"):
            prompts, item = next(iter(shapes.values()))
            phases = method.phase_times(prompts)
            if phases:
                append_event(self.out_dir, {"event": "phases", "method": label, "session": self.session,
                                            **phases, "time_utc": _now()})

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
            "seed": seed, "session": self.session, "finished_utc": _now(),
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
                                        "time_utc": _now()})
        finally:
            method.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def default_draft(target: str) -> str | None:
    """The draft paired with a target when --draft is not given: the 0.5B for the default
    1.5B target, toy-draft for the toy; none otherwise."""
    return {DEFAULT_TARGET: DEFAULT_DRAFT, "toy": "toy-draft"}.get(target)


def device_profile(choice: str, device_kind: str):
    """auto (datasheet if the device is known, else measured), measure, none, or a name."""
    from . import roofline

    if choice == "none":
        return None
    if choice == "measure":
        return roofline.measure_profile()
    if choice == "auto":
        return roofline.profile_for_device(device_kind) or roofline.measure_profile()
    return roofline.profile(choice)


def write_summary(out_dir: Path, store_rows: list, meta: dict, baseline: str, greedy: bool,
                  method_order: Sequence[str] = (), tuned_on: str | None = None) -> dict:
    """summary.json, summary.md and the plots, from the rows and run.json alone."""
    from . import roofline
    from .summary import (add_held_out, add_phases, add_predictions, plot, render_markdown, summarize,
                          tuning_question_ids)

    summary = summarize(store_rows, baseline=baseline, methods=method_order, greedy=greedy)
    tuned_on = tuned_on or meta.get("config", {}).get("tuned_on")
    if tuned_on:  # held-out figures: without every turn of the questions the settings were tuned on
        ids = tuning_question_ids(tuned_on, meta.get("config", {}).get("questions"),
                                  meta["identity"].get("questions_sha256"))
        add_held_out(summary, store_rows, tuned_on=tuned_on, question_ids=ids, baseline=baseline,
                     methods=method_order, greedy=greedy)
    prof = meta.get("device_profile")
    if prof and meta.get("target_config"):
        from decoding import ModelConfig

        def config(d):
            if d is None:
                return None
            d = dict(d)
            if d.get("rope_scaling") is not None:
                d["rope_scaling"] = tuple(tuple(x) for x in d["rope_scaling"])
            return ModelConfig(**d)

        costs = {label: info.get("cost") for label, info in meta.get("methods", {}).items()}
        add_predictions(summary, store_rows, method_costs=costs, target_config=config(meta["target_config"]),
                        draft_config=config(meta.get("draft_config")), device=roofline.DeviceProfile(**prof),
                        bytes_per_param=roofline.dtype_bytes(meta["identity"]["dtype"]),
                        batch=meta["identity"]["batch_size"])
    events = read_events(out_dir)
    add_phases(summary, events, {label: info.get("cost") for label, info in meta.get("methods", {}).items()},
               batch=meta["identity"]["batch_size"])
    for label, d in summary["methods"].items():
        d["warmup_s"] = sum(e.get("warmup_s", 0.0) for e in events if e.get("event") == "warmup"
                            and e.get("method") == label)
    errors = open_errors(events)
    sessions = meta.get("sessions", [])
    row_sessions = {r.get("session") for r in store_rows}
    report_meta = {
        "config": dict(meta.get("config", {}), selection_text=_selection_text(store_rows)),
        "sessions": len(row_sessions),
        "environment": sessions[-1]["environment"] if sessions else {},
        # the command of every session that wrote rows, in order (a resumed run may differ in --methods)
        "commands": list(dict.fromkeys(s.get("environment", {}).get("command", "") for s in sessions
                                       if s.get("session") in row_sessions)),
        "device_profile": prof,
        "row_sessions": [s for s in sessions if s.get("session") in row_sessions],
        "errors": [{"method": e["method"], "error": e["error"]} for e in errors],
    }
    full = {"summary": summary, "run": meta, "errors": errors}
    _write_json(out_dir / "summary.json", full)
    (out_dir / "summary.md").write_text(render_markdown(summary, report_meta), encoding="utf-8")
    full["plots"] = plot(summary, store_rows, out_dir)
    return full


def fill_missing_methods(out_dir: Path, meta: dict, rows: Sequence[dict], log=print) -> list[str]:
    """Record in run.json the settings and cost of methods that have rows but no record.

    Runs killed before this record was written per method (older versions wrote it only at
    the end of a session) leave methods without a roofline cost. Each such method is built
    again from its label with the run's target, draft and dtype (models loaded, nothing
    generated); the PyTorch peers have no cost and are recorded without being built."""
    missing = sorted({r["method"] for r in rows} - set(meta.get("methods", {})))
    if not missing:
        return []
    ident = meta["identity"]
    cfg = BenchConfig(target=ident["target"], draft=ident["draft"], dtype=ident["dtype"],
                      max_new_tokens=ident["max_new_tokens"], batch_size=ident["batch_size"],
                      temperature=ident["sampling"]["temperature"], top_k=ident["sampling"]["top_k"],
                      top_p=ident["sampling"]["top_p"])
    env = BenchEnv(cfg)
    for r in methods_mod.resolve(missing, check=False):
        if r.spec.uses_torch:
            info = {"name": r.spec.name, "options": r.options, "cost": None}
        else:
            info = r.build(env).info()
        meta.setdefault("methods", {})[r.label] = {"name": r.spec.name, "options": r.options, "cost": info.get("cost"),
                                                   "info": info, "recorded_by": "summarize-only"}
    for key, value in env.loaded_configs().items():
        meta.setdefault(key, value)
    _write_json(out_dir / "run.json", meta)
    log(f"recorded the settings and cost of {', '.join(missing)} in {out_dir / 'run.json'}")
    return missing


def merge_runs(dst: Path, src: Path, log=print) -> dict:
    """Add the rows of run folder `src` to run folder `dst` (a run continued on another machine).

    Both must record the same identity (target, draft, dtype, sampling, batch, question file,
    device kind, ...) and give every shared method label the same options; otherwise nothing
    is written. Rows whose key `dst` already holds are kept as they are in `dst` (counted as
    skipped); `src`'s sessions, method records and events are added, so the report still says
    which session produced each row. Returns {"added": n, "skipped": n}.
    """
    src_meta = read_run_meta(src)
    if src_meta is None:
        raise SettingsMismatch(f"{src} has no run.json: it is not a run folder of experiments.specbench.")
    dst.mkdir(parents=True, exist_ok=True)
    dst_meta = read_run_meta(dst)
    check_identity(dst_meta, src_meta["identity"], dst)
    for label, info in src_meta.get("methods", {}).items():
        old = (dst_meta or {}).get("methods", {}).get(label)
        if old is not None and not same_options(old.get("options"), info.get("options"),
                                                _defaults_of(info.get("name"))):
            raise SettingsMismatch(f"method {label!r} means {old.get('options')} in {dst} but {info.get('options')} "
                                   f"in {src}: the rows cannot be merged.")
    with ResultsStore.open(src / "results.jsonl") as src_store:
        src_rows = src_store.rows()
    added = skipped = 0
    with ResultsStore.open(dst / "results.jsonl") as store:
        for row in src_rows:
            key = tuple(row.get(f) for f in store.key_fields)
            if key in store:
                skipped += 1
            else:
                store.append(row)
                added += 1
    meta = dst_meta or {k: v for k, v in src_meta.items() if k not in ("methods", "sessions")}
    meta.setdefault("methods", {})
    meta.setdefault("sessions", [])
    for label, info in src_meta.get("methods", {}).items():
        meta["methods"].setdefault(label, info)
    known = {s["session"] for s in meta["sessions"]}
    new_sessions = [s for s in src_meta.get("sessions", []) if s["session"] not in known]
    meta["sessions"].extend(new_sessions)
    for key in ("target_config", "draft_config", "device_profile"):
        if key in src_meta:
            meta.setdefault(key, src_meta[key])
    _write_json(dst / "run.json", meta)
    new_ids = {s["session"] for s in new_sessions}
    for event in read_events(src):
        if event.get("session") in new_ids:
            append_event(dst, event)
    log(f"merged {src} into {dst}: {added} rows added, {skipped} already there; "
        f"{len(new_sessions)} session(s) added")
    return {"added": added, "skipped": skipped}


def _selection_text(rows: Sequence[dict]) -> str:
    qs = {(r["category"], r["question_id"]) for r in rows}
    turns = {(r["question_id"], r["turn"]) for r in rows}
    cats: dict = {}
    for c, _ in qs:
        cats[c] = cats.get(c, 0) + 1
    per = ", ".join(f"{c} {n}" for c, n in sorted(cats.items(), key=lambda kv: qmod.CATEGORIES.index(kv[0])
                                                 if kv[0] in qmod.CATEGORIES else 99))
    return f"{len(qs)} Spec-Bench questions, {len(turns)} (question, turn) pairs ({per})"


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
    from . import environment

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
        meta["sessions"].append({"session": session, "started_utc": _now(), "environment": env_info})
        _write_json(out_dir / "run.json", meta)
        append_event(out_dir, {"event": "session", "session": session, "time_utc": _now(),
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
            _write_json(out_dir / "run.json", meta)

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
                append_event(out_dir, {"event": "error", "method": r.label, "session": session, "time_utc": _now(),
                                       "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc()[-4000:]})
                log(f"method {r.label} failed: {type(err).__name__}: {err}")
            if r.label in runner.infos:  # built in this session: record its final info (load / compile times)
                record(r.label, runner.infos[r.label])
        result = write_summary(out_dir, store.rows(), meta, cfg.baseline, cfg.greedy, [r.label for r in resolved])
    result["failed"] = failed
    log(f"wrote {out_dir / 'summary.md'}")
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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


def draft_from_arg(target: str, draft: str | None) -> str | None:
    if draft is None:
        return default_draft(target)
    return None if draft in ("none", "") else draft


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


if __name__ == "__main__":
    sys.exit(main())
