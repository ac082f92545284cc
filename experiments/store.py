"""An append-only JSON-lines results file that survives being killed.

Each finished result is one line, written with a single `write`, then flushed and fsync'ed,
so after a kill (even SIGKILL or a power cut) the file holds every row that was reported done,
plus at most one incomplete final line. Rows are keyed (by default on method + question id +
turn); a restarted run reads the file and skips keys it already has, so nothing is recomputed,
nothing is lost and no key is written twice.

A file that does not read back cleanly is never overwritten or appended to silently:
  * an incomplete final line (no trailing newline: a write cut short by a kill) raises
    `TruncatedResults`, which tells the user to pass `repair=True` (`--repair`);
  * any other bad line (not JSON, not a row, a duplicate key) raises `CorruptResults` with
    the line numbers; `repair=True` handles it too, since the original is kept.
`repair=True` moves the original aside to `<name>.bak` (`.bak.1`, `.bak.2`, ... if taken; an
existing backup is never overwritten), writes the good rows to a fresh file (temp file +
fsync + rename) and reports what was dropped.

`ResultsStore.open` also takes an exclusive lock (`<name>.lock`, released by the kernel even
on SIGKILL) so two runs cannot interleave writes into one file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

SCHEMA = 1
DEFAULT_KEY_FIELDS = ("method", "question_id", "turn")


class ResultsError(RuntimeError):
    """Base class of results-file problems."""


class TruncatedResults(ResultsError):
    """The last line of the results file is incomplete (a kill during a write)."""


class CorruptResults(ResultsError):
    """Lines of the results file are not valid result rows."""


class LockedResults(ResultsError):
    """Another process holds the results file's lock."""


@dataclasses.dataclass
class ReadReport:
    """What reading a results file found: good rows, bad lines (1-based number, reason)."""

    rows: list
    bad_lines: list
    truncated_tail: str | None = None


def _key(row: dict, fields: Sequence[str]) -> tuple:
    return tuple(row[f] for f in fields)


def read_rows(path: str | Path, key_fields: Sequence[str] = DEFAULT_KEY_FIELDS) -> ReadReport:
    """Parse `path` without judging it: every good row, and every bad line with its reason."""
    path = Path(path)
    if not path.exists():
        return ReadReport([], [])
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows, bad, seen = [], [], set()
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        reason = None
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = f"not JSON ({err.msg if hasattr(err, 'msg') else err})"
        else:
            if not isinstance(row, dict):
                reason = "not a JSON object"
            elif missing := [f for f in key_fields if f not in row]:
                reason = f"lacks the key field(s) {missing}"
            elif _key(row, key_fields) in seen:
                reason = f"duplicate row for {dict(zip(key_fields, _key(row, key_fields)))}"
        if reason is None:
            seen.add(_key(row, key_fields))
            rows.append(row)
        else:
            bad.append((lineno, reason, raw[:120].decode("utf-8", "replace")))
    truncated = tail.decode("utf-8", "replace") if tail.strip() else None
    return ReadReport(rows, bad, truncated)


def _backup_path(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{n}")
        n += 1
    return candidate


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_rows_atomically(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def repair(path: str | Path, key_fields: Sequence[str] = DEFAULT_KEY_FIELDS) -> tuple[Path | None, ReadReport]:
    """Keep the good rows of `path`, moving the original aside; returns (backup or None, report)."""
    path = Path(path)
    report = read_rows(path, key_fields)
    if not report.bad_lines and report.truncated_tail is None:
        return None, report
    backup = _backup_path(path)
    os.replace(path, backup)
    _fsync_dir(path.parent)
    _write_rows_atomically(path, report.rows)
    return backup, report


def _problem_message(path: Path, report: ReadReport) -> tuple[type, str]:
    n_good = len(report.rows)
    if report.bad_lines:
        shown = "; ".join(f"line {n}: {why} [{text!r}]" for n, why, text in report.bad_lines[:5])
        more = f" (and {len(report.bad_lines) - 5} more)" if len(report.bad_lines) > 5 else ""
        tail = " The final line is also incomplete." if report.truncated_tail is not None else ""
        return CorruptResults, (
            f"results file {path} has {len(report.bad_lines)} line(s) that are not valid result rows: "
            f"{shown}{more}.{tail} It was left untouched. It may have been edited by hand or belong to "
            f"another run; fix or remove it yourself, or rerun with --repair to keep its {n_good} valid "
            f"row(s) (the original is moved to {_backup_path(path).name})."
        )
    return TruncatedResults, (
        f"results file {path} ends with an incomplete line ({len(report.truncated_tail)} bytes: "
        f"{report.truncated_tail[:80]!r}...), probably cut short when a run was killed while writing it. "
        f"It was left untouched. Rerun with --repair to move it to {_backup_path(path).name} and keep its "
        f"{n_good} complete row(s); the incomplete one will be computed again."
    )


class ResultsStore:
    """The rows of one results file, with durable appends. Use `ResultsStore.open(path)`."""

    def __init__(self, path: Path, rows: list, key_fields: Sequence[str], lock_file):
        self.path = path
        self.key_fields = tuple(key_fields)
        self._rows = {_key(r, self.key_fields): r for r in rows}
        self._lock_file = lock_file
        self.repaired_from: Path | None = None
        self.repair_report: ReadReport | None = None

    @classmethod
    def open(cls, path: str | Path, *, repair_file: bool = False,
             key_fields: Sequence[str] = DEFAULT_KEY_FIELDS, log: Callable[[str], None] = print) -> "ResultsStore":
        """Lock `path`, read and check it (see the module docstring), and return the store."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path.with_name(path.name + ".lock"), "w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise LockedResults(f"another process is writing {path} (its lock file is held); "
                                "wait for it to finish or stop it first.") from None
        try:
            report = read_rows(path, key_fields)
            backup = None
            if report.bad_lines or report.truncated_tail is not None:
                if not repair_file:
                    kind, message = _problem_message(path, report)
                    raise kind(message)
                backup, report = repair(path, key_fields)
                dropped = len(report.bad_lines) + (report.truncated_tail is not None)
                log(f"repaired {path}: kept {len(report.rows)} row(s), dropped {dropped} bad line(s); "
                    f"the original is at {backup}")
        except BaseException:
            lock_file.close()
            raise
        store = cls(path, report.rows, key_fields, lock_file)
        store.repaired_from, store.repair_report = backup, (report if backup else None)
        return store

    def __contains__(self, key: tuple) -> bool:
        return tuple(key) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: tuple) -> dict | None:
        return self._rows.get(tuple(key))

    def rows(self) -> list[dict]:
        return list(self._rows.values())

    def keys(self) -> set:
        return set(self._rows)

    def append(self, row: dict) -> None:
        """Write one row durably (one write, flush, fsync); refuse a key that is already stored."""
        key = _key(row, self.key_fields)
        if key in self._rows:
            raise ResultsError(f"refusing to write a second row for {dict(zip(self.key_fields, key))} "
                               f"into {self.path}.")
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rows[key] = row

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
