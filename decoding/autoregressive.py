"""Plain autoregressive decoding: the baseline every other strategy must reproduce.

One target forward per token. Phases: `prefill` (whole right-padded prompt batch in one call)
then `step` = forward the last token, sample from the processed distribution, `commit`.
tau is 1.00 by definition.

Legend: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import loop
from .cache import KVCache
from .model import forward
from .options import DEFAULT as DEFAULT_OPTIONS
from .options import Options


@dataclasses.dataclass(frozen=True)
class Context:
    """Static settings shared by every strategy's init/step (hashable: a jit static arg)."""

    target: object  # ModelConfig
    sampling: object  # Greedy | Sampling
    rule: loop.StopRule
    max_new_tokens: int
    capacity: int
    draft: object = None  # ModelConfig of a draft model, when the strategy has one
    # The switches that change the traced program (`decoding.Options`, resolved for the
    # backend): being part of this static argument, they key jit's caches.
    options: Options = DEFAULT_OPTIONS


def prefill(config, params, prompt: jax.Array, lengths: jax.Array, cache: KVCache, options: Options | None = None):
    """Run right-padded prompts `prompt: int32[B, P]` with true `lengths: int32[B]`.

    Returns (logits of each row's last real token: float32[B, V], cache with `lengths`).
    Padding slots are written but left stale (beyond the cursor).
    """
    b, p = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = forward(config, params, prompt, positions, cache, logit_indices=(lengths - 1)[:, None], options=options)
    return out.logits[:, 0], out.cache.truncate(lengths)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    out: loop.Tokens
    cache: KVCache
    last: jax.Array  # int32[B]: last committed token, not yet in the cache
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    """One token per target forward (the baseline)."""

    name = "autoregressive"
    cache_slack = 1

    def init(self, ctx: Context, params, prompt, lengths, key) -> State:
        cache = KVCache.init(ctx.target, prompt.shape[0], ctx.capacity, params["target"]["embed"].dtype)
        logits, cache = prefill(ctx.target, params["target"], prompt, lengths, cache, ctx.options)
        key, sub = jax.random.split(key)
        first = ctx.sampling.sample(sub, logits)
        out = loop.commit(loop.Tokens.init(prompt.shape[0], ctx.max_new_tokens), first[:, None],
                          jnp.ones_like(lengths), ctx.rule)
        return State(out=out, cache=cache, last=first, key=key)

    def step(self, ctx: Context, params, state: State) -> State:
        cache = state.cache
        res = forward(ctx.target, params["target"], state.last[:, None], cache.lengths[:, None], cache,
                      options=ctx.options)
        key, sub = jax.random.split(state.key)
        nxt = ctx.sampling.sample(sub, res.logits[:, 0])
        running = ~state.out.done
        out = loop.commit(state.out, nxt[:, None], jnp.ones_like(nxt), ctx.rule)
        cache = res.cache.truncate(jnp.where(running, cache.lengths + 1, cache.lengths))
        return State(out=out, cache=cache, last=jnp.where(running, nxt, state.last), key=key)

    def stats(self, state) -> dict:
        return {}
