"""GGUF files (llama.cpp's format): metadata read into a Hugging Face style config, tensors
dequantized in numpy (`gguf.quants.dequantize`) and converted by the family's GGUF name map.

The family follows `general.architecture` (`decoding.architecture.for_gguf_arch`); the common
`{arch}.` metadata keys are read here, the family's own (`Architecture.gguf_keys`,
`gguf_fields`) by the family; any other key is refused. GGUF tensors come out of
`dequantize` in numpy order, which is ggml's `ne` reversed: a linear weight is `[out, in]`
exactly like the PyTorch weight of the HF checkpoint.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import registry
from ..architecture import config_from_hf, for_gguf_arch
from ..config import ConfigError
from ..model import Model, check_params
from .tokenizer import explicit_tokenizer, gguf_tokenizer
from .convert import LoadError, convert, to_device
from .converted import converted_path, gguf_sha256, read_converted, save_converted

# `{arch}.` metadata keys understood for every family (anything else is refused unless the
# family lists it in `Architecture.gguf_keys`).
GGUF_KNOWN_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "vocab_size", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "rope.scaling.attn_factor",
    "expert_count", "expert_used_count",
})


def field(reader, key: str, default: Any = None) -> Any:
    """The value of a GGUF metadata field, or `default` when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, where: str = "GGUF file"):
    """The config (`ModelConfig`, `Gemma3Config`, ...) from a `gguf.GGUFReader`'s metadata."""
    return config_from_hf(gguf_hf_config(reader, where))


def gguf_hf_config(reader, where: str = "GGUF file") -> dict:
    """A Hugging Face style config dict from GGUF metadata (checked by `config_from_hf`)."""
    arch = field(reader, "general.architecture")
    family = for_gguf_arch(arch, where)
    prefix = f"{arch}."
    known = GGUF_KNOWN_KEYS | family.gguf_keys
    unknown = sorted(k[len(prefix):] for k in reader.fields
                     if k.startswith(prefix) and k[len(prefix):] not in known)
    if unknown:
        raise ConfigError(f"{where}: GGUF metadata {[prefix + k for k in unknown]} is not understood "
                          "and may change the computation; refusing to guess.")

    def get(key, default=None):
        value = field(reader, prefix + key, default)
        if value is None:
            raise ConfigError(f"{where}: GGUF metadata lacks {prefix + key}.")
        if isinstance(value, list):  # per-layer values: only uniform ones are supported
            if len(set(value)) != 1:
                raise ConfigError(f"{where}: per-layer {prefix + key}={value} is not supported.")
            value = value[0]
        return value

    if get("expert_count", 0):
        raise ConfigError(f"{where}: a mixture-of-experts GGUF ({prefix}expert_count="
                          f"{get('expert_count')}) is not supported.")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"{where}: the GGUF carries per-frequency rope factors (rope_freqs.weight, "
                          "Llama 3.1 style); load the Hugging Face checkpoint instead.")
    if "token_embd.weight" not in tensors:
        raise LoadError(f"{where}: the GGUF has no token_embd.weight tensor.")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{where}: key and value head sizes differ; not supported.")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{where}: partial rotary embeddings (rope.dimension_count="
                          f"{get('rope.dimension_count')} < head_dim={head_dim}) are not supported.")
    cfg = {
        "model_type": family.gguf_arches[arch],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        # ggml ne of token_embd is [D, V]
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    cfg.update(family.gguf_fields(arch, cfg, lambda key, default=None: field(reader, prefix + key, default)))
    scaling = gguf_rope_scaling(reader, prefix, where)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def gguf_rope_scaling(reader, prefix: str, where: str) -> dict | None:
    kind = field(reader, prefix + "rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(field(reader, prefix + "rope.scaling.factor", 1.0))
    attn_factor = field(reader, prefix + "rope.scaling.attn_factor")
    if attn_factor is not None and float(attn_factor) != 1.0:
        raise ConfigError(f"{where}: {prefix}rope.scaling.attn_factor={attn_factor} is not supported.")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        original = field(reader, prefix + "rope.scaling.original_context_length")
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        for key in ("beta_fast", "beta_slow"):
            value = field(reader, prefix + f"rope.scaling.yarn_{key}")
            if value is not None:
                out[key] = float(value)
        return out
    raise ConfigError(f"{where}: GGUF rope scaling type {kind!r} is not supported (linear, yarn).")


def load_gguf_params(reader, config, dtype=jnp.bfloat16, where: str = "GGUF file") -> dict:
    """Host parameter tree (numpy, `dtype`) from a `gguf.GGUFReader`, dequantizing each tensor."""
    from gguf.quants import dequantize

    arch = field(reader, "general.architecture")
    names = for_gguf_arch(arch, where).gguf_names(arch)
    tensors = ((t.name, functools.partial(dequantize, t.data, t.tensor_type)) for t in reader.tensors)
    return convert(config, tensors, names, dtype, where)


def load_gguf(path: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True,
              source: str | None = None, cache: bool | None = None, layout=None) -> Model:
    """Load a GGUF file of a registered family (llama / mistral / qwen2 / gemma3), dequantized to `dtype`
    (with a `layout`, `decoding.sharding.Layout`, straight into its sharded layout).

    cache: keep what is slow to rebuild under `<registry cache dir>/converted/`, keyed by the
    file's sha256: the converted parameters (as safetensors, with the config in its metadata)
    and the tokenizer transformers builds from the GGUF. Default (None): parameters are cached
    for 16-bit dtypes only (a float32 copy is large and quick to redo for small models), the
    tokenizer always. False caches nothing.
    """
    import gguf

    path = Path(path)
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    cache_params = itemsize <= 2 if cache is None else cache
    cache_root = None if cache is False else registry.cache_dir() / "converted"
    sha = gguf_sha256(path) if cache_root is not None else None
    converted = None
    if cache_params:
        converted = converted_path(cache_root, sha, jnp.dtype(dtype))
    config = host = None
    if converted is not None and converted.is_file():
        try:
            config, host = read_converted(converted)
        except (OSError, ValueError, KeyError):
            config = host = None  # unreadable or stale: convert again and overwrite it
    if host is None:
        reader = gguf.GGUFReader(str(path))
        hf_config = gguf_hf_config(reader, str(path))
        config = config_from_hf(hf_config)
        host = load_gguf_params(reader, config, dtype, str(path))
        del reader
        if converted is not None:
            save_converted(host, hf_config, converted)
    params = to_device(host, config, layout)
    check_params(config, params)
    if tokenizer is True:
        tok = gguf_tokenizer(path, cache_root, sha if sha is not None else gguf_sha256(path))
    elif tokenizer is False or tokenizer is None:
        tok = None
    else:
        tok = explicit_tokenizer(tokenizer, sha if sha is not None else gguf_sha256(path))
    return Model(config=config, params=params, tokenizer=tok, source=source or str(path), layout=layout)
