"""The converted-weight cache: a first GGUF load is slow (parsing the metadata, dequantizing in
numpy and building the tokenizer take about 7 + 25 + 15 s for the 1.5B Q4_K_M on two CPU
cores), so, keyed by the GGUF's sha256 under `<registry cache dir>/converted/`, the converted
parameters of 16-bit loads are kept as one safetensors file (the config in its metadata); a
second load reads that and never opens the GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import registry
from ..architecture import config_from_hf
from ..model import check_params

FORMAT = 3  # bump when the stored layout changes: older files are then converted again


def gguf_sha256(path: Path) -> str:
    """The GGUF's sha256, from the registry's `.sha256` marker when it matches the size."""
    marker = path.with_name(path.name + ".sha256")
    if marker.is_file():
        fields = marker.read_text().split()
        if len(fields) == 2 and fields[0] == str(path.stat().st_size):
            return fields[1]
    return registry.sha256_file(path)


def converted_path(cache_root: Path, sha: str, dtype) -> Path:
    """Where the converted parameters of the GGUF with hash `sha` in `dtype` are kept."""
    return cache_root / f"{sha}-{np.dtype(dtype).name}-v{FORMAT}.safetensors"


def save_converted(host: dict, hf_config: dict, target: Path) -> None:
    """Write a host parameter tree (and the config it belongs to) as one safetensors file."""
    from safetensors.numpy import save_file

    # save_file writes each array's memory as is: it must be C-ordered to read back correctly.
    flat = {k: np.ascontiguousarray(v) for k, v in host.items() if k != "layers"}
    flat.update({f"layers.{k}": np.ascontiguousarray(v) for k, v in host["layers"].items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    save_file(flat, str(tmp), metadata={"config": json.dumps(hf_config)})
    tmp.chmod(0o644)
    os.replace(tmp, target)


def read_converted(target: Path) -> tuple[object, dict]:
    """Inverse of `save_converted`: (config, host parameter tree)."""
    from safetensors import safe_open

    host: dict = {"layers": {}}
    with safe_open(str(target), framework="numpy") as f:
        config = config_from_hf(json.loads(f.metadata()["config"]))
        for name in f.keys():
            if name.startswith("layers."):
                host["layers"][name[len("layers."):]] = f.get_tensor(name)
            else:
                host[name] = f.get_tensor(name)
    check_params(config, host)
    return config, host
