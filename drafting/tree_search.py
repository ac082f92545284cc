"""EAGLE-2's expand-and-rerank tree search (Li et al. 2024), for any scorer of frontier nodes.

The search grows a `DynamicTree` per row from the root's next-token logits: the root's top_k
children form the first frontier; for `depth - 1` steps, every frontier node is scored (its
next-token distribution), expanded by its top_k children with score = cumulative draft
log-probability, and the global top_k of those children become the next frontier. Finally the
`total_tokens` best nodes of everything created are kept (ancestor-closed, because scores only
decrease along a path; ties are broken by creation order, parents first) and returned as a
`decoding.TreeBatch` whose siblings are in score order (deterministic proposals). With a
sampler of siblings (`choose`), children are draws without replacement scored so that keeping a
draw never depends on its own value (`_children`), which keeps recursive rejection exact.

What scores a frontier is a callable, so any drafter plugs in: a small draft LM or the
target's first layers (`drafting.model_drafter`), a feature head that predicts the next hidden
state from its parent's (EAGLE), one head per depth (Medusa). It receives the `Frontier` (the
nodes' tokens, which previous-frontier node each came from, which tree slots each may attend
to) and a state it threads (caches, features), and returns next-token logits per node.

Legend: B batch, K top_k (frontier width), V vocab, R = (depth - 1) * K tree-region slots,
M = K + (depth - 1) * K^2 created nodes, N = total_tokens + 1 nodes (root included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from decoding.tree import TreeBatch

from .shapes import DynamicTree


@dataclasses.dataclass(frozen=True)
class Frontier:
    """The nodes scored at one expansion step, all of depth `depth`.

    tokens: int32[B, K]; parent: int32[B, K] the index of each node's parent in the previous
    frontier (-1 at depth 1: the parent is the root); visible: bool[B, K, R] the tree-region
    slots each node sees (its ancestors and itself), where frontier node i of depth d has slot
    (d - 1) * K + i (a drafter that caches frontier nodes writes them there); depth: static
    int >= 1; slot: static int, (depth - 1) * K, the slot of the frontier's first node.
    """

    tokens: jax.Array
    parent: jax.Array
    visible: jax.Array
    depth: int
    slot: int


#: score(carry, frontier) -> (next-token logits float32[B, K, V] of every frontier node, carry)
Scorer = Callable[[Any, Frontier], tuple[jax.Array, Any]]


def region_slots(shape: DynamicTree) -> int:
    """R: tree-region slots the frontier nodes of a search occupy (`Frontier.visible`)."""
    return (shape.depth - 1) * shape.top_k


def top_k_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(log-probs, tokens) of the k most likely tokens: float32[..., k], int32[..., k]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vals, idx = jax.lax.top_k(logp, k)
    return vals, idx.astype(jnp.int32)


#: choose(step, logits float32[..., V]) -> (children int32[..., K] in draw order, the law they were
#: drawn from float32[..., V], ok bool[..., K]): sampled siblings (`drafting.proposer.choose_siblings`)
Chooser = Callable[[int, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _children(logits: jax.Array, k: int, choose: Chooser | None, step: int):
    """(scores float32[..., K], tokens int32[..., K], law float32[..., V] or None) of a node's children.

    Top-k: their draft log-probabilities. Sampled: draws without replacement. For the recursive
    rejection rule to stay exact, whether a draw is kept in the tree must not depend on the draw
    itself, only on the node's law q and the earlier draws; so draw i scores
    log max q + sum_{i' < i} log(1 - q(x_i')) (the chance the top token is accepted, discounted
    by the mass the earlier draws used), never its own q(x_i). Scores do not increase from one
    draw to the next (the tree keeps a prefix of each node's draws, which the rule tries in
    order) nor from a node to its children (ancestor-closed); draws past q's support score -inf.
    """
    if choose is None:
        vals, toks = top_k_logprobs(logits, k)
        return vals, toks, None
    toks, lp, ok = choose(step, logits)
    q = jnp.exp(lp)
    used = jnp.log1p(-jnp.minimum(jnp.take_along_axis(q, toks, axis=-1), 1.0))  # log(1 - q(x_i))
    before = jnp.concatenate([jnp.zeros_like(used[..., :1]), jnp.cumsum(used[..., :-1], axis=-1)], axis=-1)
    vals = jnp.log(jnp.max(q, axis=-1, keepdims=True)) + before
    return jnp.where(ok, vals, -jnp.inf), toks, lp


def _kept(score: jax.Array, total: int) -> jax.Array:
    """int[B, total]: pool indices of the `total` best scores, in creation order (ties: earlier first)."""
    return jnp.sort(jnp.argsort(-score, axis=1, stable=True)[:, :total], axis=1)


def expand_and_rerank(score: Scorer, carry, root: jax.Array, root_logits: jax.Array,
                      shape: DynamicTree, choose: Chooser | None = None) -> tuple[TreeBatch, Any, int]:
    """Grow one EAGLE-2 tree per row (see the module doc).

    root: int32[B] the last committed token; root_logits: float32[B, V] the drafter's
    next-token logits after it. `choose`: None for top-k children (one-hot proposals), or a
    sampler of distinct children (`Chooser`); the tree then carries the law each expanded
    node's children were drawn from (`TreeBatch.q_logprobs`). Returns (TreeBatch with N
    nodes, carry, number of `score` calls: depth - 1).
    """
    b = root_logits.shape[0]
    k, depth_max, total = shape.top_k, shape.depth, shape.total_tokens
    region = max(region_slots(shape), 1)
    vals, toks, root_lp = _children(root_logits, k, choose, 0)
    laws, expanded = [], []  # per expansion step: the frontier's laws [B, K, V] and pool indices [B, K]
    # candidate pool (creation order): token, score, parent pool index (-1 = root), depth
    pool_tok, pool_score = [toks], [vals]
    pool_par = [jnp.full((b, k), -1, jnp.int32)]
    pool_depth = [jnp.ones((b, k), jnp.int32)]
    frontier = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))  # pool indices
    front_tok, front_score = toks, vals
    front_parent = jnp.full((b, k), -1, jnp.int32)
    front_vis = jnp.zeros((b, k, region), bool)  # visible region slots of each frontier node's ancestors
    offset = k
    for d in range(1, depth_max):
        slot0 = (d - 1) * k
        own = jax.nn.one_hot(slot0 + jnp.arange(k), region, dtype=bool)[None]
        vis = front_vis | own
        logits, carry = score(carry, Frontier(tokens=front_tok, parent=front_parent, visible=vis, depth=d,
                                              slot=slot0))
        cvals, ctoks, lp = _children(logits, k, choose, d)  # [B, K(frontier), K(children)]
        if lp is not None:
            laws.append(lp)
            expanded.append(frontier)
        scores = front_score[:, :, None] + cvals
        pool_tok.append(ctoks.reshape(b, k * k))
        pool_score.append(scores.reshape(b, k * k))
        pool_par.append(jnp.repeat(frontier, k, axis=1))
        pool_depth.append(jnp.full((b, k * k), d + 1, jnp.int32))
        best_vals, best = jax.lax.top_k(scores.reshape(b, k * k), k)
        front_parent = (best // k).astype(jnp.int32)
        frontier = offset + best
        front_tok = jnp.take_along_axis(ctoks.reshape(b, k * k), best, axis=1)
        front_score = best_vals
        front_vis = jnp.take_along_axis(vis, front_parent[:, :, None], axis=1)
        offset += k * k
    pool_score = jnp.concatenate(pool_score, axis=1)
    tree = rerank(root, jnp.concatenate(pool_tok, axis=1), pool_score,
                  jnp.concatenate(pool_par, axis=1), jnp.concatenate(pool_depth, axis=1), total, k, depth_max)
    if root_lp is None:
        return tree, carry, depth_max - 1
    # the law of each kept node's children: the root's, an expanded frontier node's, or none (a leaf)
    kept = _kept(pool_score, total)  # [B, total]
    q = jnp.zeros((b, total + 1, root_lp.shape[-1]), jnp.float32).at[:, 0].set(root_lp)
    if laws:
        law = jnp.concatenate(laws, axis=1)  # [B, F, V]
        idx = jnp.concatenate(expanded, axis=1)  # [B, F]
        hit = kept[:, :, None] == idx[:, None, :]  # [B, total, F]
        node_law = law[jnp.arange(b)[:, None], jnp.argmax(hit, axis=2)]  # [B, total, V]
        q = q.at[:, 1:].set(jnp.where(jnp.any(hit, axis=2)[:, :, None], node_law, 0.0))
    valid = jnp.concatenate([jnp.ones((b, 1), bool), jnp.take_along_axis(pool_score, kept, axis=1) > -jnp.inf], axis=1)
    return dataclasses.replace(tree, valid=valid, q_logprobs=q), carry, depth_max - 1


def rerank(root: jax.Array, tok: jax.Array, score: jax.Array, parent: jax.Array, depth: jax.Array, total: int,
           max_children: int, max_depth: int) -> TreeBatch:
    """The `total` best nodes of a candidate pool as a TreeBatch (N = total + 1 nodes).

    tok, score, parent (pool index, -1 = root), depth: [B, M] in creation order (a parent
    before its children). Ties in score keep creation order, so the kept set is
    ancestor-closed whenever scores do not increase along a path; siblings are ordered by
    creation (= score, for top-k expansions), at most `max_children` per node.
    """
    b, m = tok.shape
    rows = jnp.arange(b)
    chosen = _kept(score, total)  # creation order: parents before children
    node_of_pool = jnp.full((b, m), -1, jnp.int32).at[rows[:, None], chosen].set(
        jnp.arange(1, total + 1, dtype=jnp.int32)[None, :])
    c_par_pool = jnp.take_along_axis(parent, chosen, axis=1)
    c_par = jnp.where(c_par_pool < 0, 0, jnp.take_along_axis(node_of_pool, jnp.maximum(c_par_pool, 0), axis=1))
    parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), c_par], axis=1)  # [B, N]
    tokens = jnp.concatenate([root[:, None], jnp.take_along_axis(tok, chosen, axis=1)], axis=1)
    node_depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(depth, chosen, axis=1)], axis=1)
    n = total + 1
    # ancestor-or-self mask by following parents max_depth times
    mask = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
    cur = parents
    for _ in range(max_depth):
        hit = jax.nn.one_hot(jnp.maximum(cur, 0), n, dtype=bool) & (cur >= 0)[..., None]
        mask = mask | hit
        cur = jnp.where(cur >= 0, jnp.take_along_axis(parents, jnp.maximum(cur, 0), axis=1), -1)
    # children of each node in creation order
    is_child = parents[:, None, :] == jnp.arange(n)[None, :, None]  # [B, N(parent), N(child)]
    rank = jnp.cumsum(is_child, axis=2) * is_child  # 1-based among siblings
    children = []
    for r in range(1, max_children + 1):
        hit = rank == r
        children.append(jnp.where(jnp.any(hit, axis=2), jnp.argmax(hit, axis=2), -1))
    children = jnp.stack(children, axis=2).astype(jnp.int32)
    return TreeBatch(tokens=tokens.astype(jnp.int32), depth=node_depth, mask=mask, children=children,
                     valid=jnp.ones((b, n), bool))
