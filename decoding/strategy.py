"""What every decoding strategy shares: the `Strategy` contract, its static `Context`, and the
prompt `prefill` each strategy starts with.

A strategy is a frozen dataclass (hashable: a static argument of `jit`) with `init` (prefill
and the first token) and `step` (one round: propose, verify, accept, commit), pure functions
over its own state dataclass that carries `out: decoding.tokens.Tokens`. `decoding.driver`
runs `step` until every row is done; `decoding.generate` compiles that as one program.

Legend: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from .cache import KVCache
from .model import forward
from .options import DEFAULT as DEFAULT_OPTIONS
from .options import Options
from .tokens import StopRule


@dataclasses.dataclass(frozen=True)
class Context:
    """Static settings shared by every strategy's init/step (hashable: a jit static arg)."""

    target: object  # ModelConfig
    sampling: object  # Greedy | Sampling
    rule: StopRule
    max_new_tokens: int
    capacity: int
    draft: object = None  # ModelConfig of a draft model, when the strategy has one
    # The switches that change the traced program (`decoding.Options`, resolved for the
    # backend): being part of this static argument, they key jit's caches.
    options: Options = DEFAULT_OPTIONS


class Strategy(Protocol):
    """A decoding algorithm as `generate` and `stream` run it.

    `params` is `{"target": ..., "draft": ...}` (plus `"runtime"` for settings a strategy reads
    as traced values); every state carries `out: Tokens`. Optional: `validate(ctx, draft)`
    (refuse bad settings on the host) and `split_runtime()` (see `decoding.generation`).
    """

    name: str
    #: cache slots needed past prompt + max_new_tokens (lookahead written before a commit)
    cache_slack: int

    def init(self, ctx: Context, params, prompt: jax.Array, lengths: jax.Array, key: jax.Array) -> Any:
        """Prefill `prompt: int32[B, P]` (true `lengths: int32[B]`) and commit the first token."""

    def step(self, ctx: Context, params, state: Any) -> Any:
        """One round for every row; rows that are done are left unchanged."""

    def stats(self, state: Any) -> dict:
        """Host-side figures of a finished run (merged into `Stats.extra`)."""


def round_keys(ctx: Context, key: jax.Array, num: int = 1) -> tuple[jax.Array, ...]:
    """(the key the next round starts from, `num` keys for this round's random choices).

    Greedy sampling draws nothing, so the key passes through unsplit and the round's keys are
    that same key (never consumed): the greedy loop runs no random-number kernels per step.
    Sampling splits the key into `num + 1` fresh keys as usual."""
    if ctx.sampling.is_greedy:
        return (key,) * (num + 1)
    return tuple(jax.random.split(key, num + 1))


def prefill(config, params, prompt: jax.Array, lengths: jax.Array, cache: KVCache, options: Options | None = None):
    """Run right-padded prompts `prompt: int32[B, P]` with true `lengths: int32[B]`.

    Returns (logits of each row's last real token: float32[B, V], cache with `lengths`).
    Padding slots are written but left stale (beyond the cursor).
    """
    b, p = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = forward(config, params, prompt, positions, cache, logit_indices=(lengths - 1)[:, None], options=options)
    return out.logits[:, 0], out.cache.truncate(lengths)
