"""A run's identity: `run.json` records what the stored rows mean (target, draft, dtype, sampling,
batch, question file, device kind, each method's options), and a resumed or merged run whose
settings differ is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .. import methods as methods_mod

RUN_SCHEMA = 1


class SettingsMismatch(ValueError):
    """The output directory holds results made with other settings."""


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


def method_defaults(name: str | None) -> dict:
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
