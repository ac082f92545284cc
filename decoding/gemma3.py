"""Gemma 3 text decoder (Gemma Team 2025, "Gemma 3 Technical Report") behind the common interface.

The family is one `decoding.architecture.Architecture` (`GEMMA3`), registered for
`Gemma3Config`: `decoding.model`'s functions reach its pieces, so every decoding algorithm runs
Gemma 3 unchanged. The forward contract (cache slots, masks, tree verification, layer ranges,
hidden states) is the one documented in `decoding.model`.

Legend: B batch, T new tokens, S cache capacity, D hidden, F ffn, V vocab, L layers, H query
heads, K kv heads, G = H/K, Dh head dim.

What differs from the Llama family (as transformers' `modeling_gemma3.py` computes it):
  * local and global layers: `layer_types[i]` is "sliding_attention" (keys whose position is
    `sliding_window` or more behind the query's are masked) or "full_attention"; the released
    models interleave 5 local layers with 1 global one. Each kind has its own rotary base
    (`rope_local_theta` = 10k for local layers; `rope_theta` = 1M plus any `rope_scaling`, e.g.
    linear x8 on the 4B+ models, for global ones);
  * RMSNorm multiplies by `1 + w` and is computed in float32 (weights are stored as in the
    Hugging Face checkpoint, so a zero weight is the identity scale);
  * four norms per layer: before and after attention, before and after the MLP (the "post"
    norms are applied to the branch output before it joins the residual stream);
  * RMSNorm of each query and key head before the rotary embedding (qk-norm);
  * embeddings scaled by sqrt(D), the scale first cast to the parameters' dtype (as transformers
    does, so bf16 models use bf16(sqrt(D)));
  * GeGLU MLP with the tanh approximation of GELU;
  * attention scale `query_pre_attn_scalar ** -0.5` instead of `Dh ** -0.5`;
  * optional tanh soft-capping of the final logits (`cap * tanh(x / cap)`; unset in Gemma 3).
    Gemma 3 replaced Gemma 2's attention soft-capping with qk-norm, and transformers' Gemma 3
    never applies `attn_logit_softcapping` although the config has the field; a checkpoint that
    sets it is refused rather than guessed about;
  * tied embeddings (an untied head is supported too).

Choices:
  * The KV cache keeps the common layout (one `[2, B, K, S, Dh]` buffer of k and v per layer)
    with full capacity for every layer; local layers mask by position rather than keeping a
    ring buffer, so rollback, tree gathers and forks work exactly as for any other model.
  * The window compares *positions* (`query position - key position < sliding_window`). A key
    in the block being written takes its position from `positions`; a key already in the cache
    takes its slot index, which is its position for every committed token (the cache holds a
    contiguous sequence). With a `slot_mask`, tree nodes written by earlier calls have slot
    index >= position, which can only keep an ancestor visible; ancestors are always inside the
    window when the tree is shallower than it, so the result is exact in that case.
  * The parameter layout fuses projections as `decoding.llama`'s does: `wqkv: [L, D, (H + 2K) * Dh]`
    (q columns, then k, then v) and `w_gate_up: [L, D, 2F]` (gate columns, then up), one
    matmul each.
  * Attention and logits accumulate in float32; rotary embeddings are applied in float32 and
    rounded once (transformers rounds after each product in 16-bit dtypes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .architecture import Architecture, register
from .cache import write
from .config import IGNORED_KEYS, SUPPORTED_ROPE_TYPES, ConfigError, decoder_param_count, freeze, thaw
from .kernels.attention import attention_reference
from .llama import gate_up_parts, qkv_parts
from .loading.convert import NameMap, Rule
from .numerics import attention_mask, f32_einsum, rms_norm, split_parts
from .rope import apply_rope, inv_frequencies, rope_tables

SLIDING = "sliding_attention"
FULL = "full_attention"
MODEL_TYPES = ("gemma3_text", "gemma3")

# GELU variants of transformers' ACT2FN that are the tanh approximation.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh")
# Keys of a multimodal "gemma3" config that do not matter once only its text_config is used.
_MULTIMODAL_TOP_KEYS = frozenset({"text_config", "vision_config", "mm_tokens_per_image", "boi_token_index",
                                  "eoi_token_index", "image_token_index", "boi_token_id", "eoi_token_id",
                                  "image_token_id", "tie_word_embeddings"})
# Gemma 3 checkpoints carry these; they do not change the forward computation.
GEMMA_IGNORED_KEYS = frozenset({"cache_implementation"})


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3 text-decoder hyper-parameters (static, hashable); see the module doc.

    `layer_types[i]` is "sliding_attention" or "full_attention". Rope scalings are sorted
    tuples of (key, value) pairs, as in `ModelConfig`, so the config stays hashable.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int = 4096
    rope_theta: float = 1_000_000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rope_local_theta: float = 10_000.0
    rope_local_scaling: tuple[tuple[str, Any], ...] | None = None
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_position_embeddings: int = 131_072
    model_type: str = "gemma3_text"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs each kv head to serve a whole group of query heads."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim",
                     "sliding_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}; give "
                "one attention kind per layer (a truncated model needs its layer_types truncated too)."
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"layer_types {bad} are not supported; each layer is {SLIDING!r} or {FULL!r}.")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(kind == SLIDING for kind in self.layer_types)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return thaw(self.rope_scaling)

    @property
    def rope_local_scaling_dict(self) -> dict[str, Any] | None:
        return thaw(self.rope_local_scaling)

    def param_count(self) -> int:
        """Number of parameters (embedding and head counted once each; once if tied): q and k
        norms of [Dh] and four [D] norms per layer."""
        return decoder_param_count(self, per_layer_extra=2 * self.head_dim, norms_per_layer=4)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "Gemma3Config":
        """Build from a Hugging Face `config.json` dict ("gemma3_text", or a "gemma3" config that
        holds only a `text_config`), refusing fields that would change the math unmodelled."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type == "gemma3":
            cfg = _text_config_of_multimodal(cfg)
            model_type = cfg.get("model_type")
        if model_type != "gemma3_text":
            raise ConfigError(f"Gemma3Config.from_hf needs model_type 'gemma3_text' (or 'gemma3' with a "
                              f"text_config), got {model_type!r}.")
        consumed = {"model_type"}

        def take(key, default=dataclasses.MISSING):
            consumed.add(key)
            if key in cfg and cfg[key] is not None:
                return cfg[key]
            if default is dataclasses.MISSING:
                raise ConfigError(f"config.json lacks the required field {key!r} for {model_type}.")
            return default

        hidden = int(take("hidden_size"))
        heads = int(take("num_attention_heads"))
        layers = int(take("num_hidden_layers"))
        act = take("hidden_activation", "gelu_pytorch_tanh")
        if act not in _TANH_GELU:
            raise ConfigError(f"hidden_activation={act!r} is not supported; Gemma 3 uses the tanh "
                              f"approximation of GELU ({', '.join(_TANH_GELU)}).")
        if take("attention_bias", False):
            raise ConfigError("attention_bias=True is not supported: Gemma 3 projections have no bias.")
        if take("attn_logit_softcapping", None) is not None:
            raise ConfigError(
                f"attn_logit_softcapping={cfg['attn_logit_softcapping']} is set, but Gemma 3 has no attention "
                "soft-capping (qk-norm replaced it; transformers' Gemma 3 ignores the field), so it is unclear "
                "what this checkpoint expects. Set it to null to run the model as transformers does."
            )
        if take("use_bidirectional_attention", False):
            raise ConfigError("use_bidirectional_attention=True (an encoder such as EmbeddingGemma) is not "
                              "supported: decoding needs causal attention.")
        window = take("sliding_window", None)
        layer_types = take("layer_types", None)
        pattern = take("sliding_window_pattern", None)
        legacy_pattern = take("_sliding_window_pattern", None)
        pattern = pattern if pattern is not None else legacy_pattern
        if layer_types is None:  # transformers' rule: every pattern-th layer is global
            pattern = 6 if pattern is None else int(pattern)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        layer_types = tuple(layer_types)
        if window is None:
            if SLIDING in layer_types:
                raise ConfigError("sliding_window is unset, but layer_types has sliding-window layers.")
            window = take("max_position_embeddings", 131_072)
        full, local = _rope_parameters(cfg, take)
        for key in ("num_key_value_heads", "intermediate_size", "vocab_size", "rms_norm_eps",
                    "tie_word_embeddings", "max_position_embeddings", "head_dim", "query_pre_attn_scalar",
                    "final_logit_softcapping"):
            consumed.add(key)
        unknown = sorted(k for k in cfg if k not in consumed and k not in IGNORED_KEYS
                         and k not in GEMMA_IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"config field(s) {unknown} of {model_type} are not understood by the Gemma 3 implementation "
                "and may change the model's computation; refusing to guess. If a field is known to be "
                "harmless, add it to decoding.gemma3.GEMMA_IGNORED_KEYS."
            )

        return cls(
            vocab_size=int(take("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(take("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(take("num_key_value_heads", heads)),
            head_dim=int(take("head_dim", 256)),
            layer_types=layer_types,
            sliding_window=int(window),
            rope_theta=full[0],
            rope_scaling=full[1],
            rope_local_theta=local[0],
            rope_local_scaling=local[1],
            query_pre_attn_scalar=float(take("query_pre_attn_scalar", 256)),
            final_logit_softcapping=None if cfg.get("final_logit_softcapping") is None
            else float(cfg["final_logit_softcapping"]),
            rms_norm_eps=float(take("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(take("tie_word_embeddings", True)),
            max_position_embeddings=int(take("max_position_embeddings", 131_072)),
            model_type="gemma3_text",
        )


def _text_config_of_multimodal(cfg: dict) -> dict:
    """The text_config of a "gemma3" config, refusing configs that carry a vision tower."""
    if cfg.get("vision_config") is not None:
        raise ConfigError(
            "this is a multimodal Gemma 3 checkpoint (model_type 'gemma3', Gemma3ForConditionalGeneration, "
            "with a vision tower); only the text decoder is implemented. Use a text-only checkpoint "
            "(Gemma3ForCausalLM, model_type 'gemma3_text', e.g. gemma-3-270m or gemma-3-1b), or save the "
            "language model of this one as a Gemma3ForCausalLM with transformers first."
        )
    text = cfg.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError("a 'gemma3' config needs a text_config (the decoder's settings); none was found.")
    unknown = sorted(k for k in cfg if k not in _MULTIMODAL_TOP_KEYS and k not in IGNORED_KEYS)
    if unknown:
        raise ConfigError(f"top-level field(s) {unknown} of the 'gemma3' config are not understood; "
                          "refusing to guess.")
    text = dict(text)
    text.setdefault("model_type", "gemma3_text")
    if "tie_word_embeddings" in cfg:
        if "tie_word_embeddings" in text and bool(text["tie_word_embeddings"]) != bool(cfg["tie_word_embeddings"]):
            raise ConfigError("tie_word_embeddings differs between the 'gemma3' config and its text_config.")
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return text


def _rope_parameters(cfg: dict, take):
    """((theta, scaling) of global layers, (theta, scaling) of local layers).

    Accepts transformers >= 5's `rope_parameters` keyed by layer type, and the older flat
    `rope_theta` / `rope_scaling` (global layers) + `rope_local_base_freq` (local layers).
    """
    params = take("rope_parameters", None)
    scaling = take("rope_scaling", None)
    theta = take("rope_theta", 1_000_000.0)
    local_theta = take("rope_local_base_freq", 10_000.0)
    if params is not None and not set(params) <= {SLIDING, FULL}:
        raise ConfigError(f"rope_parameters={params} is not keyed by layer type ({SLIDING!r}, {FULL!r}) as "
                          "Gemma 3 configs are; refusing to guess which layers it applies to.")
    params = {k: dict(v) for k, v in (params or {}).items() if v is not None}
    full = params.setdefault(FULL, {"rope_type": "default"})
    if scaling:
        full.update(scaling)
    full.setdefault("rope_theta", theta)
    params.setdefault(SLIDING, {"rope_type": "default"}).setdefault("rope_theta", local_theta)
    return _rope_of(params[FULL], FULL), _rope_of(params[SLIDING], SLIDING)


def _rope_of(rp: dict, kind: str):
    rp = dict(rp)
    theta = float(rp.pop("rope_theta"))
    rtype = rp.pop("rope_type", rp.pop("type", "default"))
    rp.pop("type", None)
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rtype!r} of the {kind} layers is not supported; supported: "
                          f"{SUPPORTED_ROPE_TYPES}.")
    if rtype == "default":
        if rp:
            raise ConfigError(f"rope parameters {sorted(rp)} of the {kind} layers mean nothing for default rope.")
        return theta, None
    rp["rope_type"] = rtype
    return theta, tuple(sorted((k, freeze(v)) for k, v in rp.items()))


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

# name -> shape as a function of the config (the one declaration of weights)
PARAM_SHAPES = {
    "embed": lambda c: (c.vocab_size, c.hidden_size),
    "final_norm": lambda c: (c.hidden_size,),
    "lm_head": lambda c: (c.hidden_size, c.vocab_size),
}
LAYER_PARAM_SHAPES = {  # projections fused as in `decoding.llama` (see `LAYER_PARAM_PARTS`)
    "attn_norm": lambda c: (c.hidden_size,),
    "wqkv": lambda c: (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
    "q_norm": lambda c: (c.head_dim,),
    "k_norm": lambda c: (c.head_dim,),
    "wo": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "post_attn_norm": lambda c: (c.hidden_size,),
    "mlp_norm": lambda c: (c.hidden_size,),
    "w_gate_up": lambda c: (c.hidden_size, 2 * c.intermediate_size),
    "w_down": lambda c: (c.intermediate_size, c.hidden_size),
    "post_mlp_norm": lambda c: (c.hidden_size,),
}
# fused name -> its blocks along the last axis, in order: ((part, width), ...); no biases
LAYER_PARAM_PARTS = {"wqkv": qkv_parts, "w_gate_up": gate_up_parts}
# logical axes (`decoding.sharding`), per-layer ones without the leading "layers" axis
PARAM_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
LAYER_PARAM_AXES = {
    "attn_norm": ("embed",), "wqkv": ("fused_in", None), "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "wo": ("heads", "embed"), "post_attn_norm": ("embed",), "mlp_norm": ("embed",),
    "w_gate_up": ("fused_in", None), "w_down": ("mlp", "embed"), "post_mlp_norm": ("embed",),
}


def param_shapes(config: Gemma3Config) -> dict:
    """The expected parameter tree of `config`, as shapes (per-layer weights stacked on L)."""
    layer = {name: (config.num_layers, *fn(config)) for name, fn in LAYER_PARAM_SHAPES.items()}
    top = {name: fn(config) for name, fn in PARAM_SHAPES.items()}
    if config.tie_embeddings:
        del top["lm_head"]
    return {**top, "layers": layer}


def param_axes(config: Gemma3Config) -> dict:
    """The logical axes of `param_shapes(config)`'s tree (`decoding.sharding`)."""
    shapes = param_shapes(config)
    layer = {name: ("layers", *LAYER_PARAM_AXES[name]) for name in shapes["layers"]}
    return {**{name: PARAM_AXES[name] for name in shapes if name != "layers"}, "layers": layer}


def param_parts(config: Gemma3Config) -> dict:
    """{fused layer parameter: ((part, width), ...)} (see `decoding.model.param_parts`)."""
    return {name: fn(config) for name, fn in LAYER_PARAM_PARTS.items()}


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _norm(x, weight, eps):
    """Gemma RMSNorm: float32 `x / rms(x) * (1 + w)`, cast back to x's dtype."""
    return rms_norm(x, weight, eps, weight_offset=1.0)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed(config: Gemma3Config, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens: int32[B, T] -> hidden [B, T, D] = embedding * sqrt(D) (the parameters' dtype)."""
    table = params["embed"]
    scale = jnp.asarray(np.float32(math.sqrt(config.hidden_size))).astype(table.dtype)
    return table[tokens] * scale


def final_norm(config: Gemma3Config, params: dict, hidden: jax.Array) -> jax.Array:
    return _norm(hidden, params["final_norm"], config.rms_norm_eps)


def lm_head(config: Gemma3Config, params: dict, normed: jax.Array) -> jax.Array:
    """Normalised hidden [..., D] -> float32 logits [..., V] (soft-capped if configured)."""
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = f32_einsum("...d,dv->...v", normed, w.astype(normed.dtype))
    return _softcap(logits, config.final_logit_softcapping)


def key_positions(cache_lengths: jax.Array, positions: jax.Array, capacity: int) -> jax.Array:
    """int32[B, S]: the position of the key in each slot (see the module doc).

    Slots of the block being written (`lengths[b] + t`) hold `positions[b, t]`; every other
    slot holds its own index.
    """
    t = positions.shape[1]
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    j = slots - cache_lengths[:, None]
    in_block = (j >= 0) & (j < t)
    block = jnp.take_along_axis(positions.astype(jnp.int32), jnp.clip(j, 0, t - 1), axis=1)
    return jnp.where(in_block, block, slots)


def layer_masks(config: Gemma3Config, cache_lengths, positions, capacity, mask=None, slot_mask=None):
    """(visible for global layers, visible for local layers): bool[B, T, S] each.

    The visibility rule (prefix + block mask, or `slot_mask`) is `decoding.numerics.attention_mask`;
    local layers additionally mask keys whose position is `sliding_window` or more behind the query.
    """
    visible = attention_mask(cache_lengths, positions, capacity, mask, None, slot_mask)
    near = (positions[:, :, None] - key_positions(cache_lengths, positions, capacity)[:, None, :]
            ) < config.sliding_window
    return visible, visible & near


def _rope(config: Gemma3Config, positions, local: bool):
    """cos, sin: float32[B, T, Dh] of the local or the global layers."""
    if local:
        theta, scaling = config.rope_local_theta, config.rope_local_scaling_dict
    else:
        theta, scaling = config.rope_theta, config.rope_scaling_dict
    inv_freq, factor = inv_frequencies(config.head_dim, theta, scaling, config.max_position_embeddings)
    return rope_tables(positions, jnp.asarray(inv_freq, jnp.float32), factor)


class Setup(NamedTuple):
    """What every layer of one call shares: {local?: (cos, sin): float32[B, T, Dh]} for the
    layer kinds in the range, and {local?: visible: bool[B, T, S]}."""

    rope: dict
    visible: dict


def prepare(config: Gemma3Config, positions, cache, mask=None, slot_mask=None, layers=None) -> Setup:
    """Rotary tables of the layer kinds in `layers` (all when None) and both visibilities."""
    start, end = (0, config.num_layers) if layers is None else layers
    kinds = set(config.sliding_layers[start:end])
    full, local = layer_masks(config, cache.lengths, positions, cache.capacity, mask, slot_mask)
    return Setup({kind: _rope(config, positions, kind) for kind in kinds}, {False: full, True: local})


def layer(config: Gemma3Config, setup: Setup, lp: dict, x, kv, i, cursor, options=None):
    """Decoder layer i. x: [B, T, D]; kv: this layer's cache buffer [2, B, K, S, Dh], written
    at slots `cursor[b] + t` (`cursor: int32[B]`, `decoding.cache.write`). Unrolled
    (`i` an int), the layer's rope and mask are chosen
    statically; under scan both kinds were computed once and are selected per layer."""
    if isinstance(i, int):
        local = config.sliding_layers[i]
        (cos, sin), visible = setup.rope[local], setup.visible[local]
    else:
        local = jnp.asarray(config.sliding_layers, bool)[i]
        some = next(iter(setup.rope.values()))
        (cos_l, sin_l), (cos_g, sin_g) = setup.rope.get(True, some), setup.rope.get(False, some)
        cos, sin = jnp.where(local, cos_l, cos_g), jnp.where(local, sin_l, sin_g)
        visible = jnp.where(local, setup.visible[True], setup.visible[False])
    b, t, _ = x.shape
    eps = config.rms_norm_eps
    h = _norm(x, lp["attn_norm"], eps)
    q, k, v = split_parts(jnp.dot(h, lp["wqkv"]), qkv_parts(config))
    q = q.reshape(b, t, config.num_heads, config.head_dim)
    k = k.reshape(b, t, config.num_kv_heads, config.head_dim)
    v = v.reshape(b, t, config.num_kv_heads, config.head_dim)
    q = apply_rope(_norm(q, lp["q_norm"], eps), cos, sin)
    k = apply_rope(_norm(k, lp["k_norm"], eps), cos, sin)
    kv = write(kv, k, v, cursor)
    attn = attention_reference(q, kv[0], kv[1], visible, scale=config.query_pre_attn_scalar ** -0.5)
    x = x + _norm(jnp.dot(attn.reshape(b, t, -1), lp["wo"]), lp["post_attn_norm"], eps)
    h = _norm(x, lp["mlp_norm"], eps)
    gate, up = split_parts(jnp.dot(h, lp["w_gate_up"]), gate_up_parts(config))
    mlp = jax.nn.gelu(gate, approximate=True) * up
    return x + _norm(jnp.dot(mlp, lp["w_down"]), lp["post_mlp_norm"], eps), kv


# --------------------------------------------------------------------------------------------
# Checkpoint names: qk-norm and four norms per layer, no biases
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
        "self_attn.q_norm.weight": Rule("q_norm"),
        "self_attn.k_norm.weight": Rule("k_norm"),
        "self_attn.o_proj.weight": Rule("wo", transpose=True),
        "post_attention_layernorm.weight": Rule("post_attn_norm"),
        "pre_feedforward_layernorm.weight": Rule("mlp_norm"),
        "mlp.gate_proj.weight": Rule("w_gate_up", "gate", transpose=True),
        "mlp.up_proj.weight": Rule("w_gate_up", "up", transpose=True),
        "mlp.down_proj.weight": Rule("w_down", transpose=True),
        "post_feedforward_layernorm.weight": Rule("post_mlp_norm"),
    },
    # The text decoder inside a multimodal checkpoint's names (transformers >= 4.52, and older).
    renames=((re.compile(r"model\.language_model\.|language_model\.model\."), "model."),
             (re.compile(r"language_model\.lm_head\."), "lm_head.")),
)
GGUF_NAMES = NameMap.gguf(
    top={
        "token_embd.weight": Rule("embed"),
        "output_norm.weight": Rule("final_norm", offset=-1.0),
        "output.weight": Rule("lm_head", transpose=True),
    },
    layer={  # names under "blk.{i}."; llama.cpp does not permute Gemma's Q and K
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
    },
)
# llama.cpp's Gemma 3 rules for what the GGUF does not record (`llama_model::load_hparams`).
GGUF_SLIDING_PATTERN = 6  # every 6th layer is global
GGUF_27B_LAYERS = 62  # the 27B scales attention by (D / H)^-0.5, every other size by Dh^-0.5


def gguf_fields(gguf_arch: str, cfg: dict, get) -> dict:
    """Gemma 3 settings that GGUF files leave to llama.cpp's hard-coded rules: the 5 local : 1
    global layer pattern (no window at all: every layer global), rotary base 10k for local
    layers unless `rope.freq_base_swa` says otherwise, and the attention scale. transformers'
    GGUF loader uses a fixed `query_pre_attn_scalar` of 256 instead, which agrees with these
    rules for every released size except the 27B (62 layers, scalar D / H = 168)."""
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    scalar = hidden // heads if layers == GGUF_27B_LAYERS else cfg["head_dim"]
    out = {"query_pre_attn_scalar": scalar, "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0))}
    window = get("attention.sliding_window")
    if window:
        out.update(sliding_window=int(window), sliding_window_pattern=GGUF_SLIDING_PATTERN)
    else:
        out.update(layer_types=[FULL] * layers)
    return out


GEMMA3 = register(Architecture(
    name="gemma3",
    config_type=Gemma3Config,
    model_types=MODEL_TYPES,
    config_from_hf=Gemma3Config.from_hf,
    param_shapes=param_shapes,
    param_parts=param_parts,
    param_axes=param_axes,
    norm_unit=0.0,
    embed=embed,
    final_norm=final_norm,
    lm_head=lm_head,
    prepare=prepare,
    layer=layer,
    hf_names=HF_NAMES,
    gguf_arches={"gemma3": "gemma3_text"},
    gguf_names=lambda gguf_arch: GGUF_NAMES,
    gguf_keys=frozenset({"rope.freq_base_swa"}),
    gguf_fields=gguf_fields,
))
