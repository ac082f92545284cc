"""The common model interface and the Llama-family transformer behind it.

One implementation covers Llama 2/3 (rope scaling), Qwen2/2.5 (qkv bias, untied head),
Mistral (sliding window) and SmolLM2 (tied embeddings): pre-norm decoder layers of RMSNorm,
grouped-query attention with rotary embeddings, and a SwiGLU MLP (Touvron et al. 2023).

Legend: B batch, T new tokens, S cache capacity, D hidden, F ffn, V vocab, L layers, H query
heads, K kv heads, G = H/K, Dh head dim.

The contract every decoding algorithm relies on
------------------------------------------------
`forward(config, params, tokens[B,T], positions[B,T], cache, mask=None, ...)` runs T >= 1 new
tokens per row. Their keys/values are written to cache slots `cache.lengths[b] + t`, and the
returned cache has `lengths + T` (callers commit fewer with `KVCache.truncate` / `gather`).
Query t of row b sees:
  * every committed slot `s < cache.lengths[b]` (the prefix), and
  * new slot `lengths[b] + j` iff `mask[b, t, j]` (default: causal, `j <= t`).
A chain of candidates uses the default mask; a token tree passes its ancestor mask and
positions `prefix_len + depth`, so one call verifies the whole tree. Mistral-style sliding
windows mask keys whose *position* is `window` or more behind the query's.

Pieces for algorithms that work inside the network: `embed`, `run_layers` over any range
`[start, end)` of layers (reading the residual stream after chosen layers, or starting from
injected hidden states), `final_norm`, `lm_head`, `unembed = lm_head(final_norm(.))`.
`hidden[i]` is the residual stream after i layers (`hidden[0]` = embeddings).

Parameters are a plain pytree (dict) with per-layer weights stacked on a leading L axis, so the
layer loop is one `lax.scan` (unrolled on accelerators). Weights are stored as `[in, out]` (x @ W).
Projections that read the same input are fused along their output axis, so each is one matmul
(decode at small batch is bound by kernel launches, not by weight traffic):
  * `wqkv: [L, D, (H + 2K) * Dh]` — q columns, then k, then v (`bqkv: [L, (H + 2K) * Dh]` the
    same way, only when `config.qkv_bias`);
  * `w_gate_up: [L, D, 2F]` — gate columns, then up;
  * `wo: [L, H * Dh, D]`, `w_down: [L, F, D]`, and the norms `attn_norm`, `mlp_norm: [L, D]`.
`param_parts(config)` lists each fused parameter's blocks (loaders fill one block per checkpoint
tensor); `split_parts` cuts an activation the same way.

Other architectures: the public functions below (`param_shapes`, `param_parts`, `init_params`,
`embed`, `final_norm`, `lm_head`, `unembed`, `run_layers`) hand a config that is not a
`ModelConfig` to the module implementing it (`architecture(config)`): a `decoding.gemma3.Gemma3Config`
to `decoding.gemma3`. `forward` is one body over those, so it serves every architecture.
Algorithms keep calling these functions and run any architecture unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .options import DEFAULT as DEFAULT_OPTIONS
from .options import Options
from .rope import apply_rope, inv_frequencies, rope_tables

# name -> shape as a function of the config (the one declaration of weights)
PARAM_SHAPES = {
    "embed": lambda c: (c.vocab_size, c.hidden_size),
    "final_norm": lambda c: (c.hidden_size,),
    "lm_head": lambda c: (c.hidden_size, c.vocab_size),
}
# Per-layer weights, stacked on a leading L axis by `param_shapes`. The projections that read
# the same input are fused along their output axis (one matmul each): see `LAYER_PARAM_PARTS`.
LAYER_PARAM_SHAPES = {
    "attn_norm": lambda c: (c.hidden_size,),
    "wqkv": lambda c: (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
    "bqkv": lambda c: ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim,),  # only with qkv_bias
    "wo": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    "mlp_norm": lambda c: (c.hidden_size,),
    "w_gate_up": lambda c: (c.hidden_size, 2 * c.intermediate_size),
    "w_down": lambda c: (c.intermediate_size, c.hidden_size),
}


def _qkv_parts(c) -> tuple[tuple[str, int], ...]:
    return (("q", c.num_heads * c.head_dim), ("k", c.num_kv_heads * c.head_dim),
            ("v", c.num_kv_heads * c.head_dim))


# fused name -> its blocks along the last axis, in order: ((part, width), ...)
LAYER_PARAM_PARTS = {
    "wqkv": _qkv_parts,  # [D, H*Dh | K*Dh | K*Dh]: q columns, then k, then v
    "bqkv": _qkv_parts,
    "w_gate_up": lambda c: (("gate", c.intermediate_size), ("up", c.intermediate_size)),  # [D, F | F]
}


def architecture(config):
    """The module implementing `config`'s architecture, or None for the Llama family here.

    Each such module provides the public functions of this one with the same signatures.
    """
    if isinstance(config, ModelConfig):
        return None
    from . import gemma3  # imported here: it builds on this module's shared pieces

    if isinstance(config, gemma3.Gemma3Config):
        return gemma3
    raise TypeError(f"no model implementation for a config of type {type(config).__name__}; expected "
                    "decoding.ModelConfig (Llama family) or decoding.gemma3.Gemma3Config.")


def param_shapes(config: ModelConfig) -> dict:
    """The expected parameter tree of `config`, as shapes (the one declaration of weights)."""
    if (arch := architecture(config)) is not None:
        return arch.param_shapes(config)
    layer = {
        name: (config.num_layers, *fn(config))
        for name, fn in LAYER_PARAM_SHAPES.items()
        if config.qkv_bias or name != "bqkv"
    }
    top = {name: fn(config) for name, fn in PARAM_SHAPES.items()}
    if config.tie_embeddings:
        del top["lm_head"]
    return {**top, "layers": layer}


def param_parts(config: ModelConfig) -> dict:
    """{fused layer parameter: ((part, width), ...)}: the blocks its last axis concatenates, in
    order (e.g. "wqkv": q, k, v). Loaders fill each block from its own checkpoint tensor."""
    if (arch := architecture(config)) is not None:
        return arch.param_parts(config)
    shapes = param_shapes(config)["layers"]
    return {name: fn(config) for name, fn in LAYER_PARAM_PARTS.items() if name in shapes}


def split_parts(x: jax.Array, parts: Sequence[tuple[str, int]]) -> tuple[jax.Array, ...]:
    """Static slices of `x: [..., sum(widths)]` along its last axis, one per `(part, width)`."""
    bounds = np.cumsum([0] + [w for _, w in parts])
    if bounds[-1] != x.shape[-1]:
        raise ValueError(f"parts {tuple(parts)} cover {bounds[-1]} columns, the array has {x.shape[-1]}.")
    return tuple(x[..., int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:]))


def check_params(config: ModelConfig, params: dict) -> None:
    """Raise a clear error if `params` does not match `config`'s parameter tree."""
    want = param_shapes(config)
    flat_want = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(v)
        for path, v in jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]
    }
    flat_have = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing = sorted(set(flat_want) - set(flat_have))
    extra = sorted(set(flat_have) - set(flat_want))
    wrong = sorted(k for k in set(flat_want) & set(flat_have) if flat_want[k] != flat_have[k])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if extra:
            details.append(f"unexpected {extra}")
        for k in wrong:
            details.append(f"{k}: expected shape {flat_want[k]}, got {flat_have[k]}")
        raise ValueError("parameters do not match the model config: " + "; ".join(details))


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters (unit tests and drafter initialisation); norms start at one."""
    if (arch := architecture(config)) is not None:
        return arch.init_params(config, key, dtype, scale)
    return random_params(param_shapes(config), key, dtype, scale, norm_value=1.0)


def random_params(shapes: dict, key: jax.Array, dtype, scale: float, *, norm_value: float) -> dict:
    """A parameter tree of `shapes` (name -> shape tuple, nested): weights ~ N(0, scale^2), the
    parameters whose names end in "norm" filled with `norm_value` (the unit scale of the
    architecture's norm: 1 for `x * w`, 0 for Gemma's `x * (1 + w)`)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("norm"):
            out.append(jnp.full(shape, norm_value, dtype))
        else:
            out.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """Result of a forward pass.

    logits: float32[B, N, V] (N = T, or the number of `logit_indices`), or None.
    hidden: {layer index: [B, T, D]} for the requested layers.
    cache: the updated cache (lengths advanced by T for `forward`).
    """

    logits: jax.Array | None
    hidden: dict
    cache: KVCache


def _f32_einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in float32. XLA:CPU has no bf16 x bf16 -> f32 dot, so
    there the operands are upcast (same result, slower); accelerators keep 16-bit operands."""
    if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def embed(config: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens: int32[B, T] -> hidden [B, T, D] (the parameters' dtype)."""
    if (arch := architecture(config)) is not None:
        return arch.embed(config, params, tokens)
    return params["embed"][tokens]


def final_norm(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    if (arch := architecture(config)) is not None:
        return arch.final_norm(config, params, hidden)
    return _rms_norm(hidden, params["final_norm"], config.rms_norm_eps)


def lm_head(config: ModelConfig, params: dict, normed: jax.Array) -> jax.Array:
    """Normalised hidden [..., D] -> float32 logits [..., V]."""
    if (arch := architecture(config)) is not None:
        return arch.lm_head(config, params, normed)
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return _f32_einsum("...d,dv->...v", normed, w.astype(normed.dtype))


def unembed(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """Residual stream [..., D] -> float32 logits [..., V] (final norm, then the head)."""
    if (arch := architecture(config)) is not None:
        return arch.unembed(config, params, hidden)
    return lm_head(config, params, final_norm(config, params, hidden))


def attention_mask(cache_lengths, positions, capacity, mask=None, window=None, slot_mask=None):
    """visible: bool[B, T, S] — which cache slots each new query may attend to.

    With `slot_mask: bool[B, T, S]` the caller states visibility over all slots directly (the
    new tokens occupy slots `lengths + t`); the prefix rule and `mask` are then not applied.
    Sliding windows apply in both cases (slot positions are then taken as slot indices).
    """
    b, t = positions.shape
    if slot_mask is not None:
        visible = slot_mask.astype(bool)
        if window is not None:
            slots = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
            visible &= (positions[:, :, None] - slots) < window
        return visible
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    start = cache_lengths[:, None, None]  # [B, 1, 1]
    prefix = slots < start
    j = slots - start  # index of the slot within the new block
    in_block = (j >= 0) & (j < t)
    if mask is None:
        block_ok = j <= jnp.arange(t, dtype=jnp.int32)[None, :, None]
    else:
        jc = jnp.clip(j, 0, t - 1)
        block_ok = jnp.take_along_axis(mask.astype(bool), jnp.broadcast_to(jc, (b, t, capacity)), axis=2)
    visible = prefix | (in_block & block_ok)
    if window is not None:
        key_pos = jnp.where(
            prefix,
            slots,
            jnp.take_along_axis(positions[:, None, :], jnp.clip(j, 0, t - 1), axis=2),
        )
        visible &= (positions[:, :, None] - key_pos) < window
    return visible


def _attention(q, k, v, visible):
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], visible: bool[B, T, S] -> [B, T, H, Dh]."""
    b, t, h, dh = q.shape
    kh = k.shape[1]
    q = q.reshape(b, t, kh, h // kh, dh)
    scores = _f32_einsum("btkgd,bksd->bkgts", q, k)
    scores = scores * (dh**-0.5)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = _f32_einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, dh).astype(q.dtype)


def _layer(config, lp, x, cos, sin, k_all, v_all, i, slots, visible, options: Options = DEFAULT_OPTIONS):
    """Decoder layer i. x: [B, T, D]; k_all/v_all: [L, B, K, S, Dh] (written at layer i).

    One matmul for q, k and v (`wqkv`, then one bias add) and one for gate and up (`w_gate_up`);
    their outputs are split by static slices. q and k heads are rotated together.
    """
    b, t, _ = x.shape
    nh, kh, dh = config.num_heads, config.num_kv_heads, config.head_dim
    h = _rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    qkv = jnp.dot(h, lp["wqkv"])  # [B, T, (H + 2K) * Dh]
    if config.qkv_bias:
        qkv = qkv + lp["bqkv"]
    qk, v = split_parts(qkv, (("qk", (nh + kh) * dh), ("v", kh * dh)))
    qk = apply_rope(qk.reshape(b, t, nh + kh, dh), cos, sin)  # q heads, then k heads
    q, k = qk[:, :, :nh], qk[:, :, nh:]
    v = v.reshape(b, t, kh, dh)
    # The cache keeps k and v as two arrays (`KVCache`): one scatter each.
    rows = jnp.arange(b)[:, None]
    k_all = k_all.at[i, rows, :, slots].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[i, rows, :, slots].set(v.astype(v_all.dtype), mode="drop")
    if _use_kernel(options, i, dh):
        from .kernels.attention import attention_pallas

        attn = attention_pallas(q, k_all, v_all, visible, layer=i, interpret=jax.default_backend() != "gpu")
    else:
        attn = _attention(q, k_all[i], v_all[i], visible)
    x = x + jnp.dot(attn.reshape(b, t, -1), lp["wo"])
    h = _rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    gate, up = split_parts(jnp.dot(h, lp["w_gate_up"]), LAYER_PARAM_PARTS["w_gate_up"](config))
    x = x + jnp.dot(jax.nn.silu(gate) * up, lp["w_down"])
    return x, k_all, v_all


def _use_kernel(options: Options, i, head_dim: int) -> bool:
    return options.attention == "pallas" and isinstance(i, int) and head_dim >= 16 and not head_dim & (head_dim - 1)


def _rope_consts(config: ModelConfig):
    inv_freq, factor = inv_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling_dict, config.max_position_embeddings
    )
    return jnp.asarray(inv_freq, jnp.float32), factor


def run_layers(
    config: ModelConfig,
    params: dict,
    x: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    mask: jax.Array | None = None,
    slot_mask: jax.Array | None = None,
    layers: tuple[int, int] | None = None,
    return_hidden: Sequence[int] = (),
    options: Options | None = None,
):
    """Run decoder layers `[start, end)` on hidden states `x: [B, T, D]`.

    Writes the T new keys/values of those layers at `cache.lengths[b] + t` (the cursor is not
    moved: `forward` does that once all layers ran). Returns `(x, hidden, cache)` where
    `hidden[i]` (for i in `return_hidden`, start < i <= end) is the stream after layer i.
    Injecting hidden states at layer `start` is calling this with them as `x`.
    `slot_mask: bool[B, T, S]` replaces the prefix + block-mask rule (see `attention_mask`):
    drafters that grow a tree over several calls use it to show each node only its ancestors.
    """
    if (arch := architecture(config)) is not None:
        return arch.run_layers(config, params, x, positions, cache, mask=mask, slot_mask=slot_mask,
                               layers=layers, return_hidden=return_hidden, options=options)
    options = (options or DEFAULT_OPTIONS).resolved()
    inv_freq, factor = _rope_consts(config)
    cos, sin = rope_tables(positions, inv_freq, factor)
    t = x.shape[1]
    slots = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    visible = attention_mask(cache.lengths, positions, cache.capacity, mask, config.sliding_window, slot_mask)

    def layer(lp, x, k_all, v_all, i):
        return _layer(config, lp, x, cos, sin, k_all, v_all, i, slots, visible, options)

    return layer_range(config, params, x, cache, layer, layers=layers, return_hidden=return_hidden,
                       options=options)


def layer_range(config, params: dict, x: jax.Array, cache: KVCache, layer, *,
                layers: tuple[int, int] | None = None, return_hidden: Sequence[int] = (),
                options: Options | None = None):
    """Drive decoder layers `[start, end)` of any architecture: check the range, run
    `layer(lp, x, k_all, v_all, i) -> (x, k_all, v_all)` on each layer's parameters `lp`, and
    collect the hidden states asked for. Returns `(x, hidden, cache)` (cursor not moved).

    Unrolled (`options.unroll_layers`, resolved by backend when None), `i` is a Python int, so a layer may branch on it statically;
    under `lax.scan` it is a traced int32.
    """
    start, end = (0, config.num_layers) if layers is None else layers
    if not 0 <= start <= end <= config.num_layers:
        raise ValueError(f"layers={layers} is not a range within [0, {config.num_layers}].")
    bad = [i for i in return_hidden if not start < i <= end and i != start]
    if bad:
        raise ValueError(f"return_hidden={tuple(return_hidden)} asks for layers outside ({start}, {end}].")
    hidden = {}
    if start in return_hidden:
        hidden[start] = x
    k_all, v_all = cache.k, cache.v
    if (options or DEFAULT_OPTIONS).resolved().unroll_layers:
        # Straight-line layers: no per-layer loop predicate round trip on GPUs, static slices.
        for i in range(start, end):
            lp = jax.tree.map(lambda w: w[i], params["layers"])
            x, k_all, v_all = layer(lp, x, k_all, v_all, i)
            if i + 1 in return_hidden:
                hidden[i + 1] = x
        return x, hidden, KVCache(k_all, v_all, cache.lengths)
    stacked = jax.tree.map(lambda w: w[start:end], params["layers"])
    want_hidden = bool([i for i in return_hidden if i != start])

    def body(carry, inputs):
        x, k_all, v_all = carry
        lp, i = inputs
        x, k_all, v_all = layer(lp, x, k_all, v_all, i)
        return (x, k_all, v_all), (x if want_hidden else None)

    idx = jnp.arange(start, end, dtype=jnp.int32)
    (x, k_all, v_all), trace = jax.lax.scan(body, (x, k_all, v_all), (stacked, idx))
    for i in return_hidden:
        if i != start:
            hidden[i] = trace[i - start - 1]
    return x, hidden, KVCache(k_all, v_all, cache.lengths)


def forward(
    config: ModelConfig,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    mask: jax.Array | None = None,
    slot_mask: jax.Array | None = None,
    layers: tuple[int, int] | None = None,
    return_hidden: Sequence[int] = (),
    logit_indices: jax.Array | None = None,
    compute_logits: bool = True,
    options: Options | None = None,
) -> Output:
    """Full forward over `tokens: int32[B, T]` at `positions: int32[B, T]` (see module doc).

    `logit_indices: int32[B, N]` restricts the (expensive, [.., V]) logits to chosen new-token
    indices, e.g. the last real token of each right-padded prompt. `layers=(0, k)` runs only
    the first k layers and applies the final norm and head to their output (layer-skip
    self-drafting); only those layers' cache entries are written. `options` (`decoding.Options`)
    picks the attention implementation and whether the layer loop is unrolled.
    """
    # One body for every architecture: embed, run_layers and unembed hand a config of another
    # architecture to the module implementing it.
    x = embed(config, params, tokens)
    x, hidden, cache = run_layers(config, params, x, positions, cache, mask=mask, slot_mask=slot_mask,
                                  layers=layers, return_hidden=return_hidden, options=options)
    logits = None
    if compute_logits:
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[..., None].astype(jnp.int32), axis=1)
        logits = unembed(config, params, x)
    return Output(logits=logits, hidden=hidden, cache=cache.truncate(cache.lengths + tokens.shape[1]))


@dataclasses.dataclass
class Model:
    """A loaded model: static config + parameter pytree (+ tokenizer and provenance).

    Not a pytree itself: algorithms take `model.config` (static) and `model.params` (traced)
    separately. `source` records where the weights came from (path, registry name, hub id).
    """

    config: ModelConfig
    params: dict
    tokenizer: object = None
    source: str = ""

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def forward(self, tokens, positions, cache, **kwargs) -> Output:
        return forward(self.config, self.params, tokens, positions, cache, **kwargs)

    def init_cache(self, batch_size: int, capacity: int, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch_size, capacity, dtype or self.dtype)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_layers}, d={c.hidden_size}, "
                f"params={c.param_count() / 1e6:.1f}M, dtype={self.dtype}, source={self.source!r})")
