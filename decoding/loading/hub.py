"""Hugging Face hub downloads: only safetensors, json and tokenizer files, and a clear error
when the hub cannot be reached."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .. import registry
from .convert import LoadError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_TIMEOUT_S = 10.0  # seconds to wait for the hub to answer a metadata request


def hub_snapshot(repo_id: str) -> Path:
    """Download (or reuse from the HF cache) the safetensors/json/tokenizer files of a hub repo."""
    from huggingface_hub import snapshot_download

    start = time.monotonic()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=_HUB_TIMEOUT_S))
    except (OSError, ValueError) as err:  # huggingface_hub's network and lookup errors are OSErrors
        raise LoadError(
            f"could not get {repo_id!r} from the Hugging Face hub after {time.monotonic() - start:.0f} s "
            f"({type(err).__name__}: {err}). The hub may be unreachable from here; pass a local "
            f"checkpoint directory or .gguf file, or a registry name ({', '.join(registry.REGISTRY)})."
        ) from err
