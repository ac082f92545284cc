"""A run folder's event log (`events.jsonl`: sessions, warm-ups, phases, errors, completions)
and its crash-safe JSON writes."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Sequence


def now() -> str:
    """The UTC time now, ISO 8601 to the second."""
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


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a temporary file, fsync, rename); NaN becomes null."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_event(out_dir: Path, event: dict) -> None:
    """Append one event line to `out_dir/events.jsonl` (fsync: it survives a kill)."""
    line = (json.dumps(event, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(out_dir / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_events(out_dir: Path) -> list[dict]:
    """The events of a run folder (a line cut by a kill is skipped)."""
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
