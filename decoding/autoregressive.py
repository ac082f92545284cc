"""Plain autoregressive decoding: the baseline every other strategy must reproduce.

One target forward per token. Phases: `prefill` (`decoding.strategy`: the whole right-padded
prompt batch in one call) then `step` = forward the last token, sample from the processed
distribution, `commit`.
tau is 1.00 by definition. Greedy decoding splits no random key per step (`round_keys`).

Legend: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import tokens
from .cache import KVCache
from .model import forward
from .strategy import Context, prefill, round_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    out: tokens.Tokens
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
        key, sub = round_keys(ctx, key)
        first = ctx.sampling.sample(sub, logits)
        out = tokens.commit(tokens.Tokens.init(prompt.shape[0], ctx.max_new_tokens), first[:, None],
                          jnp.ones_like(lengths), ctx.rule)
        return State(out=out, cache=cache, last=first, key=key)

    def step(self, ctx: Context, params, state: State) -> State:
        cache = state.cache
        res = forward(ctx.target, params["target"], state.last[:, None], cache.lengths[:, None], cache,
                      options=ctx.options)
        key, sub = round_keys(ctx, state.key)
        nxt = ctx.sampling.sample(sub, res.logits[:, 0])
        running = ~state.out.done
        out = tokens.commit(state.out, nxt[:, None], jnp.ones_like(nxt), ctx.rule)
        cache = res.cache.truncate(jnp.where(running, cache.lengths + 1, cache.lengths))
        return State(out=out, cache=cache, last=jnp.where(running, nxt, state.last), key=key)

    def stats(self, state) -> dict:
        return {}
