"""What a measurement ran on: device, library versions, code revision, command line.

Versions come from package metadata (nothing heavy is imported); the device from JAX.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "numpy", "transformers", "torch", "tokenizers", "safetensors", "gguf",
            "accelerate", "matplotlib", "tqdm")
REPO_ROOT = Path(__file__).resolve().parents[1]


def versions() -> dict:
    """Installed version of each relevant package (absent ones omitted), plus Python's."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def device() -> dict:
    """JAX's first device: platform, kind (e.g. 'NVIDIA H100 80GB HBM3') and device count."""
    import jax

    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "device_count": len(devs)}


def git_revision() -> dict:
    """The repository's commit and whether the working tree has uncommitted changes.

    A copy of the tree whose git metadata is not its own (an offline GPU machine that received
    the working tree beside an older `.git`) states its commit in DECODING_SOURCE_COMMIT (and
    DECODING_SOURCE_DIRTY=1 for uncommitted changes), written where the tree was made
    (`tools/gpu_stage.sh` reads `.gpu/source_commit`); that statement wins over `git`.
    """
    stated = os.environ.get("DECODING_SOURCE_COMMIT", "").strip()
    if stated:
        return {"commit": stated, "dirty": os.environ.get("DECODING_SOURCE_DIRTY", "") == "1",
                "source": "DECODING_SOURCE_COMMIT"}

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def switches() -> dict:
    """The library's default program switches on this backend (`decoding.Options().resolved()`;
    a method's own options are recorded with its rows) and the process's XLA flags."""
    from decoding import Options

    opts = Options().resolved()
    return {"attention": opts.attention, "command_buffers": opts.command_buffers or "default",
            "unroll_layers": opts.unroll_layers, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def device_commit_line(env: dict, device_count: int = 1) -> str:
    """"Device: <kind> (<platform>) x N; commit <sha>" for a report's header, from `describe()`'s
    dict; a tree with uncommitted changes says so."""
    dev, rev = env.get("device", {}), env.get("git", {})
    dirty = " (with uncommitted changes)" if rev.get("dirty") else ""
    return (f"Device: {dev.get('device_kind')} ({dev.get('platform')}) x {device_count}; "
            f"commit {rev.get('commit', 'unknown')}{dirty}")


def describe() -> dict:
    """Everything above, with the command line and the time (UTC)."""
    return {
        "device": device(),
        "switches": switches(),
        "versions": versions(),
        "git": git_revision(),
        "command": " ".join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]]),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_platform": platform.platform(),
    }
