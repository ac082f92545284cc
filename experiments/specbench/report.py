"""The report of a run folder: `summary.json`, `summary.md` and the plots, rebuilt from the rows,
`run.json` and the event log alone (`experiments.summary` computes and renders the figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import questions as qmod
from .events import open_errors, read_events, write_json


def device_profile(choice: str, device_kind: str):
    """auto (datasheet if the device is known, else measured), measure, none, or a name."""
    from decoding import roofline

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
    from decoding import roofline
    from ..summary import (add_held_out, add_phases, add_predictions, plot, render_markdown, summarize,
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
    write_json(out_dir / "summary.json", full)
    (out_dir / "summary.md").write_text(render_markdown(summary, report_meta), encoding="utf-8")
    full["plots"] = plot(summary, store_rows, out_dir)
    return full


def _selection_text(rows: Sequence[dict]) -> str:
    qs = {(r["category"], r["question_id"]) for r in rows}
    turns = {(r["question_id"], r["turn"]) for r in rows}
    cats: dict = {}
    for c, _ in qs:
        cats[c] = cats.get(c, 0) + 1
    per = ", ".join(f"{c} {n}" for c, n in sorted(cats.items(), key=lambda kv: qmod.CATEGORIES.index(kv[0])
                                                 if kv[0] in qmod.CATEGORIES else 99))
    return f"{len(qs)} Spec-Bench questions, {len(turns)} (question, turn) pairs ({per})"
