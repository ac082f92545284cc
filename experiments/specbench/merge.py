"""Completing a run folder: merging the rows of a run continued on another machine, and recording
the settings of methods a cut-off session left unrecorded."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import methods as methods_mod
from ..store import ResultsStore
from .config import BenchConfig, BenchEnv
from .events import append_event, read_events, write_json
from .identity import SettingsMismatch, check_identity, method_defaults, read_run_meta, same_options


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
    write_json(out_dir / "run.json", meta)
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
                                                method_defaults(info.get("name"))):
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
    write_json(dst / "run.json", meta)
    new_ids = {s["session"] for s in new_sessions}
    for event in read_events(src):
        if event.get("session") in new_ids:
            append_event(dst, event)
    log(f"merged {src} into {dst}: {added} rows added, {skipped} already there; "
        f"{len(new_sessions)} session(s) added")
    return {"added": added, "skipped": skipped}
