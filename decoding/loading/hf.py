"""Hugging Face checkpoint directories: `config.json` + `model.safetensors`, or the shards listed
in `model.safetensors.index.json`. The family follows the config's `model_type`
(`decoding.architecture.config_from_hf`), and its `hf_names` map converts the tensors."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..architecture import config_from_hf, for_config
from ..model import Model, check_params
from .tokenizer import explicit_tokenizer, hf_tokenizer
from .convert import LoadError, convert, to_device


def load_config(directory: str | os.PathLike):
    """The config (`ModelConfig`, `Gemma3Config`, ...) of a Hugging Face directory's `config.json`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LoadError(f"{directory} has no config.json; a Hugging Face checkpoint directory needs one.")
    with open(path) as f:
        return config_from_hf(json.load(f))


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory: the index's shards, or the single model file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [directory / s for s in shards]
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise LoadError(f"{index} lists shard(s) that are missing: {absent}. Download them too.")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise LoadError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json (found: {others}). "
        "Only safetensors checkpoints are read; convert .bin files with transformers' save_pretrained."
    )


def load_hf_params(directory: str | os.PathLike, config, dtype=jnp.bfloat16) -> dict:
    """Host parameter tree (numpy, `dtype`) from an HF directory's safetensors files."""
    from safetensors import safe_open

    directory = Path(directory)
    names = for_config(config).hf_names
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(file), framework="numpy"))
                   for file in safetensors_files(directory)]
        tensors = ((name, functools.partial(f.get_tensor, name)) for f in handles for name in f.keys())
        return convert(config, tensors, names, dtype, str(directory))


def load_hf_dir(directory: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True,
                source: str | None = None, layout=None) -> Model:
    """Load a Hugging Face checkpoint directory (config.json + safetensors); with a `layout`
    (`decoding.sharding.Layout`) straight into its sharded layout."""
    directory = Path(directory)
    config = load_config(directory)
    params = to_device(load_hf_params(directory, config, dtype), config, layout)
    check_params(config, params)
    if tokenizer is True:
        tok = hf_tokenizer(directory)
    elif tokenizer is False or tokenizer is None:
        tok = None
    else:
        tok = explicit_tokenizer(tokenizer)
    return Model(config=config, params=params, tokenizer=tok, source=source or str(directory), layout=layout)
