"""The Llama family (Touvron et al. 2023, "Llama 2"; Llama 3, Qwen2/2.5, Mistral, SmolLM2) as
one `decoding.architecture.Architecture`: pre-norm decoder layers of RMSNorm, grouped-query
attention with rotary embeddings (rope scaling variants in `decoding.rope`), and a SwiGLU MLP.
Qwen2 adds q/k/v biases and an untied head, Mistral a sliding window, SmolLM2 ties embeddings.
The config is `decoding.config.ModelConfig`.

Legend: B batch, T new tokens, S cache capacity, D hidden, F ffn, V vocab, L layers, H query
heads, K kv heads, Dh head dim.

Parameters (`param_shapes`; per-layer weights stacked on L; weights stored `[in, out]`). The
projections that read the same input are fused along their output axis, one matmul each:
`wqkv: [L, D, (H + 2K) * Dh]` (q columns, then k, then v; `bqkv` the same way, only with
`qkv_bias`), `w_gate_up: [L, D, 2F]` (gate, then up), `wo: [L, H * Dh, D]`, `w_down: [L, F, D]`,
the norms `attn_norm`, `mlp_norm: [L, D]`; top level `embed: [V, D]`, `final_norm: [D]`,
`lm_head: [D, V]` (untied only).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .architecture import Architecture, LayerParams, register
from .cache import write
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .kernels.attention import attention_pallas, attention_pallas_prefix, attention_reference
from .kernels.attention_tpu import attention_tpu, attention_tpu_prefix
from .kernels.projection import Projections
from .loading.convert import NameMap, Rule
from .numerics import attention_mask, f32_einsum, rms_norm, split_parts
from .options import Options
from .rope import apply_rope, inv_frequencies, rope_tables

# name -> shape as a function of the config (the one declaration of weights), and its logical
# axes (`decoding.sharding`; fused projections shard on their input axis, "fused_in")
PARAM_SHAPES = {
    "embed": lambda c: (c.vocab_size, c.hidden_size),
    "final_norm": lambda c: (c.hidden_size,),
    "lm_head": lambda c: (c.hidden_size, c.vocab_size),
}
PARAM_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
# Per-layer weights, stacked on a leading L axis by `param_shapes` (fused blocks: LAYER_PARAM_PARTS).
LAYER_PARAM_SHAPES = {
    "attn_norm": lambda c: (c.hidden_size,),
    "wqkv": lambda c: (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
    "bqkv": lambda c: ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim,),  # only with qkv_bias
    "wo": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "mlp_norm": lambda c: (c.hidden_size,),
    "w_gate_up": lambda c: (c.hidden_size, 2 * c.intermediate_size),
    "w_down": lambda c: (c.intermediate_size, c.hidden_size),
}
LAYER_PARAM_AXES = {  # without the leading "layers" axis
    "attn_norm": ("embed",), "wqkv": ("fused_in", None), "bqkv": (None,), "wo": ("heads", "embed"),
    "mlp_norm": ("embed",), "w_gate_up": ("fused_in", None), "w_down": ("mlp", "embed"),
}


def qkv_parts(c) -> tuple[tuple[str, int], ...]:
    """The blocks of a fused q/k/v projection: (("q", H * Dh), ("k", K * Dh), ("v", K * Dh))."""
    return (("q", c.num_heads * c.head_dim), ("k", c.num_kv_heads * c.head_dim),
            ("v", c.num_kv_heads * c.head_dim))


def gate_up_parts(c) -> tuple[tuple[str, int], ...]:
    """The blocks of a fused gated-MLP input projection: (("gate", F), ("up", F))."""
    return (("gate", c.intermediate_size), ("up", c.intermediate_size))


# fused name -> its blocks along the last axis, in order: ((part, width), ...)
LAYER_PARAM_PARTS = {"wqkv": qkv_parts, "bqkv": qkv_parts, "w_gate_up": gate_up_parts}


def param_shapes(config: ModelConfig) -> dict:
    """The expected parameter tree of `config`, as shapes (the one declaration of weights)."""
    layer = {name: (config.num_layers, *fn(config)) for name, fn in LAYER_PARAM_SHAPES.items()
             if config.qkv_bias or name != "bqkv"}
    top = {name: fn(config) for name, fn in PARAM_SHAPES.items()}
    if config.tie_embeddings:
        del top["lm_head"]
    return {**top, "layers": layer}


def param_axes(config: ModelConfig) -> dict:
    """The logical axes of `param_shapes(config)`'s tree (`decoding.sharding`)."""
    shapes = param_shapes(config)
    layer = {name: ("layers", *LAYER_PARAM_AXES[name]) for name in shapes["layers"]}
    return {**{name: PARAM_AXES[name] for name in shapes if name != "layers"}, "layers": layer}


def param_parts(config: ModelConfig) -> dict:
    """{fused layer parameter: ((part, width), ...)} of `config`'s tree."""
    shapes = param_shapes(config)["layers"]
    return {name: fn(config) for name, fn in LAYER_PARAM_PARTS.items() if name in shapes}


def embed(config: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens: int32[B, T] -> hidden [B, T, D] (the parameters' dtype)."""
    return params["embed"][tokens]


def final_norm(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    return rms_norm(hidden, params["final_norm"], config.rms_norm_eps)


def lm_head(config: ModelConfig, params: dict, normed: jax.Array) -> jax.Array:
    """Normalised hidden [..., D] -> float32 logits [..., V]."""
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return f32_einsum("...d,dv->...v", normed, w.astype(normed.dtype))


class Setup(NamedTuple):
    """What every layer of one call shares: rotary tables cos, sin: float32[B, T, Dh], the
    visibility visible: bool[B, T, S], and `lengths: int32[B]` when that visibility is the
    prefix rule alone (slots below the cache's lengths, then causal over the T new slots: no
    block mask, slot mask or sliding window), else None. With lengths the attention kernel takes
    its prefix form (`attention_tpu_prefix`, `attention_pallas_prefix`) and no [B, T, S] mask is
    read; the mask stays for the jnp reference (unused there, XLA drops it)."""

    cos: jax.Array
    sin: jax.Array
    visible: jax.Array
    lengths: jax.Array | None = None


def prepare(config: ModelConfig, positions, cache, mask=None, slot_mask=None, layers=None) -> Setup:
    """Rotary tables at `positions: int32[B, T]` and the visibility of the cache's slots: the
    mask always, the cache lengths too when no `mask`, `slot_mask` or sliding window applies
    (a decode step, a chain, a prefill)."""
    inv_freq, factor = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict,
                                       config.max_position_embeddings)
    cos, sin = rope_tables(positions, jnp.asarray(inv_freq, jnp.float32), factor)
    visible = attention_mask(cache.lengths, positions, cache.capacity, mask, config.sliding_window, slot_mask)
    prefix_only = mask is None and slot_mask is None and config.sliding_window is None
    return Setup(cos, sin, visible, cache.lengths if prefix_only else None)


def use_kernel(options: Options, i, head_dim: int) -> bool:
    """Whether layer i runs the Pallas attention: asked for, unrolled (a static layer index),
    and a power-of-two head dim of at least 16."""
    return options.attention == "pallas" and isinstance(i, int) and head_dim >= 16 and not head_dim & (head_dim - 1)


def layer(config, setup: Setup, lp: dict, x, kv, i, cursor, options: Options, *, activation=jax.nn.silu):
    """Decoder layer i. x: [B, T, D]; kv: this layer's cache buffer [2, B, K, S, Dh], written
    at slots `cursor[b] + t` (`cursor: int32[B]`; `decoding.cache.write`: k and v in one
    dynamic_update_slice per row block, in place). One matmul for q, k and v (`wqkv`, then one
    bias add) and one for gate and up (`w_gate_up`), split by static slices; q and k heads are
    rotated together. `activation` gates the MLP (SiLU: SwiGLU); a family differing only there
    reuses this layer. The norm + projection (+ bias, activation, residual) steps run as the
    fused kernels of `decoding.kernels.projection` when `options.projections == "pallas"` and
    B * T is small (`Projections.choose`), else as jnp.
    """
    b, t, _ = x.shape
    nh, kh, dh = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    proj = Projections.choose(options.projections, b * t, sharded=options.layout is not None)
    # Unrolled, the kernels read this layer's weights in the stacks (`li`); under scan, slices.
    w, li = (lp.stacks, lp.index) if isinstance(lp, LayerParams) else (lp, None)
    qkv = proj.norm_matmul(x, w["attn_norm"], w["wqkv"], w["bqkv"] if config.qkv_bias else None, eps=eps,
                           layer=li)  # [B, T, (H + 2K) * Dh]
    qk, v = split_parts(qkv, (("qk", (nh + kh) * dh), ("v", kh * dh)))
    qk = apply_rope(qk.reshape(b, t, nh + kh, dh), setup.cos, setup.sin)  # q heads, then k heads
    q, k = qk[:, :, :nh], qk[:, :, nh:]
    v = v.reshape(b, t, kh, dh)
    kv = write(kv, k, v, cursor)
    if use_kernel(options, i, dh):  # reads kv[0], kv[1] where they lie
        if setup.lengths is not None:  # the prefix form: no [B, T, S] mask read
            def attend(q, kv, lengths):
                if jax.default_backend() == "tpu":  # the Mosaic variant (decoding.kernels.attention_tpu)
                    return attention_tpu_prefix(q, kv, kv, lengths, layer=(0, 1))
                return attention_pallas_prefix(q, kv, kv, lengths, layer=(0, 1),
                                               interpret=jax.default_backend() != "gpu")
            seen = setup.lengths
        else:  # a block mask, a slot mask or a sliding window: the mask form
            def attend(q, kv, visible):
                if jax.default_backend() == "tpu":
                    return attention_tpu(q, kv, kv, visible, layer=(0, 1))
                return attention_pallas(q, kv, kv, visible, layer=(0, 1), interpret=jax.default_backend() != "gpu")
            seen = setup.visible

        if options.layout is None:
            attn = attend(q, kv, seen)
        else:  # on a mesh: the kernel sees each device's rows and heads (decoding.sharding)
            from .sharding import per_device_attention

            attn = per_device_attention(attend, options.layout, q, kv, seen)
    else:
        attn = attention_reference(q, kv[0], kv[1], setup.visible)
    x = proj.matmul_residual(attn.reshape(b, t, -1), w["wo"], x, layer=li)
    mlp = proj.norm_gate_up(x, w["mlp_norm"], w["w_gate_up"], eps=eps, activation=activation, layer=li)  # [B, T, F]
    x = proj.matmul_residual(mlp, w["w_down"], x, layer=li)
    return x, kv


# --------------------------------------------------------------------------------------------
# Checkpoint names
# --------------------------------------------------------------------------------------------

HF_NAMES = NameMap.hf(
    top={
        "model.embed_tokens.weight": Rule("embed"),
        "model.norm.weight": Rule("final_norm"),
        "lm_head.weight": Rule("lm_head", transpose=True),
    },
    layer={  # names under "model.layers.{i}."
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
    },
)
GGUF_NAMES = NameMap.gguf(
    top={
        "token_embd.weight": Rule("embed"),
        "output_norm.weight": Rule("final_norm"),
        "output.weight": Rule("lm_head", transpose=True),
    },
    layer={  # names under "blk.{i}."
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
    },
)
# llama.cpp permutes the rows of Q and K (weights and biases) of llama-arch files for its
# interleaved rope; Qwen2 files keep the Hugging Face order.
GGUF_NAMES_PERMUTED = dataclasses.replace(GGUF_NAMES, layer={
    **GGUF_NAMES.layer,
    **{f"attn_{w}.{s}": dataclasses.replace(GGUF_NAMES.layer[f"attn_{w}.{s}"], unpermute=w)
       for w in ("q", "k") for s in ("weight", "bias")},
})


def gguf_names(gguf_arch: str) -> NameMap:
    return GGUF_NAMES_PERMUTED if gguf_arch in ("llama", "mistral") else GGUF_NAMES


def gguf_fields(gguf_arch: str, cfg: dict, get) -> dict:
    """A GGUF sliding window becomes Mistral's `use_sliding_window` + `sliding_window`."""
    window = get("attention.sliding_window")
    return {"use_sliding_window": True, "sliding_window": int(window)} if window else {}


LLAMA = register(Architecture(
    name="llama",
    config_type=ModelConfig,
    model_types=SUPPORTED_MODEL_TYPES,
    config_from_hf=ModelConfig.from_hf,
    param_shapes=param_shapes,
    param_parts=param_parts,
    param_axes=param_axes,
    norm_unit=1.0,
    embed=embed,
    final_norm=final_norm,
    lm_head=lm_head,
    prepare=prepare,
    layer=layer,
    hf_names=HF_NAMES,
    gguf_arches={"llama": "llama", "mistral": "llama", "qwen2": "qwen2"},
    gguf_names=gguf_names,
    gguf_fields=gguf_fields,
))
