"""The proposer contract: what a drafter implements to plug into speculative and tree decoding.

`decoding.Speculative` (chains) and `decoding.TreeDecoding` (any draft shape of
`drafting.shapes`) call a drafter in two places of each round: `propose` before the target
verifies, `commit` after the accepted tokens were committed. Both read the decoding state
through a `View`. Both protocols are structural: a drafter needs no base class, and
`decoding` calls them without importing this package.

A drafter dispatches on the shape's attributes: `shape.is_chain` (draft up to `shape.gamma`
tokens, stopping a row where the top-1 probability falls below `shape.confidence` when it is
set; a `decoding.Speculative` strategy is its own chain shape), a static
`drafting.TreeTopology`, or a `drafting.DynamicTree` (the EAGLE-2 search of
`drafting.tree_search`). It refuses, in `validate`, a shape it cannot draft.

Shared draft choices: `choose_draft_token` (one chain step: argmax or a sample, with its q) and
`choose_siblings` (a tree node's children: top-k, or k draws without replacement by
Gumbel-top-k, Kool et al. 2019, for the recursive rejection of `decoding.tree`).

Legend: B batch, C context slots, N tree nodes.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from decoding.cache import KVCache
from decoding.strategy import Context
from decoding.tree import Accepted, TreeBatch


class View(Protocol):
    """What a drafter may read of the decoding state (read-only).

    root: int32[B] last committed token (not yet in the target cache);
    cache: the target's KVCache (lengths = committed tokens before the root);
    context: int32[B, C] every committed token (prompt + generated, root included);
    context_len: int32[B] (= cache.lengths + 1).
    """

    root: jax.Array
    cache: KVCache
    context: jax.Array
    context_len: jax.Array


class Proposer(Protocol):
    """The drafter protocol (implementations: `DraftModel`, `LayerSkip`, `PromptLookup`).

    Optional: `validate(ctx, draft, shape)`, called on the host before compiling, refuses a
    missing draft model, an unsupported shape or bad settings with a clear error.
    `target_hidden_layers(ctx) -> tuple[int, ...]`: target layers whose residual stream the
    drafter reads (feature heads); the strategy then passes `hidden=` to `init` ({layer:
    [B, P, D]}, the prefill's) and to `commit` ({layer: [B, D + 1, D]}, the verify forward's at
    the accepted path's nodes, root first), so no second target forward is needed.
    `verify(ctx, params, cache, tree, positions, shape) -> decoding.Output`: the drafter runs the
    round's target forward itself (same node logits and cache as the plain forward; its `hidden`
    entries [B, N, ...] reach `commit` gathered along the accepted path), e.g.
    `drafting.HiddenTransfer`, whose pseudo positions ride along in that forward (an attribute
    `verify` that is None means the strategy's own forward).
    """

    name: str

    def slack(self, shape) -> int:
        """Cache slots needed past the committed prefix, beyond the tree itself."""

    def init(self, ctx: Context, params, prompt: jax.Array, lengths: jax.Array,
             cache: KVCache) -> tuple[Any, KVCache]:
        """Prefill drafter state after the target's prefill; may use/extend the target cache."""

    def propose(self, ctx: Context, params, dstate, view: View, shape, limit: jax.Array,
                key: jax.Array) -> tuple[TreeBatch, Any, KVCache, jax.Array]:
        """-> (TreeBatch rooted at `view.root`, dstate, target cache (cursor at
        `view.cache.lengths`), number of draft forwards: int32[]). `limit: int32[B]` caps each
        row's depth (dynamic gamma)."""

    def commit(self, ctx: Context, params, dstate, view: View, shape, tree: TreeBatch, acc: Accepted,
               running: jax.Array):
        """Update drafter state after `acc` was committed (`view` is the state *before*;
        `running: bool[B]` the rows that took part in the round)."""


def choose_draft_token(ctx: Context, shape, key: jax.Array, i, logits: jax.Array, active: jax.Array,
                       limit: jax.Array):
    """One chain draft step's choice from the drafter's `logits: float32[B, V]` at draft index `i`.

    Greedy: the argmax. Sampled: a draw from the processed distribution (`ctx.sampling`), whose
    log-probabilities `lp: float32[B, V]` are returned for lossless verification (None when
    greedy). A row stays `active` while `i < limit[b]` and, with `shape.confidence`, while the
    drafter's top-1 probability is at least that. Returns `(token: int32[B], lp, active: bool[B])`.
    """
    if ctx.sampling.is_greedy:
        tok, lp = jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    else:
        lp = ctx.sampling.logprobs(logits)
        tok = jax.random.categorical(jax.random.fold_in(key, i), lp, axis=-1).astype(jnp.int32)
    active = active & (i < limit)
    if shape.confidence is not None:
        top1 = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
        active = active & (top1 >= shape.confidence)
    return tok, lp, active


def choose_siblings(ctx: Context, key: jax.Array, i, logits: jax.Array, k: int, sampled_siblings: bool):
    """The `k` children of tree nodes from the drafter's `logits: float32[..., V]` at draft step `i`.

    Deterministic (greedy decoding, or `sampled_siblings` off): the k most likely tokens, best
    first, `lp` None (one-hot proposals). Sampled siblings (temperature > 0 and
    `sampled_siblings`): k distinct tokens drawn without replacement from the processed
    distribution `lp = ctx.sampling.logprobs(logits)` by Gumbel-top-k (Kool et al. 2019), in
    draw order, which is the order `decoding.tree.accept_sampled` tries them in. Returns
    `(tokens: int32[..., k], lp: float32[..., V] or None, ok: bool[..., k])`; `ok` is False for
    a draw the processed distribution forbids (fewer than k tokens left by top-k / top-p).
    """
    if ctx.sampling.is_greedy or not sampled_siblings:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        _, tok = jax.lax.top_k(logp, k)
        return tok.astype(jnp.int32), None, jnp.ones(tok.shape, bool)
    lp = ctx.sampling.logprobs(logits)
    vals, tok = jax.lax.top_k(lp + jax.random.gumbel(jax.random.fold_in(key, i), lp.shape, lp.dtype), k)
    return tok.astype(jnp.int32), lp, vals > -jnp.inf


def sibling_sampler(ctx: Context, key: jax.Array, shape, sampled_siblings: bool):
    """The `choose` of `drafting.tree_search.expand_and_rerank`: None (top-k children) unless
    siblings are sampled (`sampled_siblings` at temperature > 0); then `choose_siblings`' draws."""
    if ctx.sampling.is_greedy or not sampled_siblings:
        return None
    return lambda step, logits: choose_siblings(ctx, key, step, logits, shape.top_k, True)
