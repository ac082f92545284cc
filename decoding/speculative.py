"""Speculative decoding (chains) and tree decoding over one propose/verify/accept/commit step.

Papers: Leviathan, Kalman, Matias 2023 ("Fast Inference from Transformers via Speculative
Decoding"); Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling");
SpecInfer (Miao et al. 2024) for trees; EAGLE-2 (Li et al. 2024) for dynamic trees;
DistillSpec (Zhou et al. 2024) for the lenient (lossy) acceptance rule.

One round, for every batch row at once (rows accept different numbers of tokens):
  propose  the drafter returns a `TreeBatch` rooted at the last committed token (a chain is a
           tree with one child per node);
  verify   one target forward over all N nodes with the tree's ancestor mask and positions
           `prefix + depth` (`decoding.model.forward`);
  accept   greedy: walk while the child equals the target argmax; sampled: multi-round
           rejection (`decoding.tree.accept_sampled`) — the output follows the target's
           processed distribution exactly (lenience 1);
  commit   append the accepted tokens + the bonus token (`decoding.tokens.commit`), move the
           accepted path's KV entries into place (chains: move the cursor; trees: `gather`),
           and let the drafter catch up.

A drafter that reads the target's features (Medusa, EAGLE heads) declares
`target_hidden_layers(ctx) -> tuple[int, ...]`: the prefill and every verify forward then also
return the residual stream after those layers, handed to `drafter.init(..., hidden=)` (every
prompt position) and `drafter.commit(..., hidden=)` (the accepted path's nodes: root first), so
the drafter never runs the target a second time. A drafter that must change the verify forward
itself (hidden transfer, `drafting.hidden_transfer`: pseudo positions riding along in the upper
layers) declares `verify(ctx, params, cache, tree, positions, shape)`, which the strategy then calls in
place of its own forward; it returns the nodes' logits and cache exactly as the plain forward.

Drafters (in `drafting/`) implement `drafting.Proposer`; any of them plugs into `Speculative`
(chains) or `TreeDecoding` (any draft shape of `drafting.shapes`) where it supports the shape.
The drafter reads the decoding state through the round's `State` (`root`, `cache`, `context`,
`context_len`: the attributes of `drafting.View`). The strategies read a draft shape only
through `num_nodes`, `max_depth`, `max_children` and `is_chain`; a `Speculative` strategy is
itself the chain shape it drafts (`gamma`, `confidence`, like `drafting.Chain`).

Dynamic draft length (`DynamicGamma`): each row keeps its own gamma, grown by `grow` after a
fully accepted round and shrunk by `shrink` after a rejection (the schedule of transformers'
assisted generation, made per row), and drafting of a row stops early when the drafter's
top-1 probability falls below `confidence`. Verification always runs gamma_max + 1 positions
(static shapes); unproposed positions are never accepted.

Legend: B batch, N tree nodes (root included), G gamma, D max depth, V vocab, C context slots.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tokens
from .cache import KVCache
from .model import forward
from .strategy import Context, prefill, round_keys
from .tree import Accepted, TreeBatch, accept_greedy, accept_sampled


@dataclasses.dataclass(frozen=True)
class DynamicGamma:
    """Per-row draft length schedule (see module doc)."""

    start: int = 4
    minimum: int = 1
    grow: int = 1
    shrink: int = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The decoding state of a speculative round; what a drafter reads of it (`drafting.View`):
    root: int32[B] last committed token (not yet in the target cache); cache: the target's
    KVCache (lengths = committed tokens before the root); context: int32[B, C] every committed
    token (prompt + generated, root included); context_len: int32[B] (= cache.lengths + 1)."""

    out: tokens.Tokens
    cache: KVCache
    root: jax.Array  # int32[B]
    context: jax.Array  # int32[B, C]
    context_len: jax.Array  # int32[B]
    drafter: Any
    gamma: jax.Array  # int32[B] current per-row draft limit
    key: jax.Array
    accept_hist: jax.Array  # int32[D + 1]: rounds (over rows) that accepted exactly d candidates
    rank_hist: jax.Array  # int32[D, K]: rounds (over rows) whose path took the k-th sibling at depth d+1
    draft_forwards: jax.Array  # int32[]
    rounds: jax.Array  # int32[]


@dataclasses.dataclass(frozen=True)
class _SpecBase(abc.ABC):
    """Shared init/step of chain and tree speculative decoding."""

    drafter: Any
    lenience: float = 1.0

    @property
    @abc.abstractmethod
    def shape(self):
        """The draft shape (`drafting.shapes`): read through num_nodes, max_depth, max_children,
        is_chain."""

    @property
    def is_chain(self) -> bool:
        return self.shape.is_chain

    @property
    def cache_slack(self) -> int:
        return self.shape.num_nodes + 1 + int(self.drafter.slack(self.shape))

    def validate(self, ctx: Context, draft) -> None:
        if not 0.0 < self.lenience <= 1.0:
            raise ValueError(f"lenience must be in (0, 1] (1 = lossless), got {self.lenience}.")
        if hasattr(self.drafter, "validate"):
            self.drafter.validate(ctx, draft, self.shape)

    def _limit(self, state: State) -> jax.Array:
        return state.gamma

    def _hidden_layers(self, ctx: Context) -> tuple[int, ...]:
        """Target layers whose residual stream the drafter reads (none for most drafters)."""
        if not hasattr(self.drafter, "target_hidden_layers"):
            return ()
        return tuple(int(i) for i in self.drafter.target_hidden_layers(ctx))

    def init(self, ctx: Context, params, prompt, lengths, key) -> State:
        b, p = prompt.shape
        cache = KVCache.init(ctx.target, b, ctx.capacity, params["target"]["embed"].dtype)
        layers = self._hidden_layers(ctx)
        if layers:  # the prefill also returns the features of every prompt position: {layer: [B, P, D]}
            positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
            res = forward(ctx.target, params["target"], prompt, positions, cache,
                          logit_indices=(lengths - 1)[:, None], return_hidden=layers, options=ctx.options)
            logits, cache, hidden = res.logits[:, 0], res.cache.truncate(lengths), res.hidden
        else:
            logits, cache = prefill(ctx.target, params["target"], prompt, lengths, cache, ctx.options)
        key, sub = round_keys(ctx, key)
        first = ctx.sampling.sample(sub, logits)
        out = tokens.commit(tokens.Tokens.init(b, ctx.max_new_tokens), first[:, None], jnp.ones_like(lengths), ctx.rule)
        context = jnp.zeros((b, ctx.capacity), jnp.int32).at[:, :p].set(prompt)
        context = context.at[jnp.arange(b), lengths].set(first)
        if layers:
            dstate, cache = self.drafter.init(ctx, params, prompt, lengths, cache, hidden=hidden)
        else:
            dstate, cache = self.drafter.init(ctx, params, prompt, lengths, cache)
        gamma0 = self._gamma0()
        return State(out=out, cache=cache, root=first, context=context, context_len=lengths + 1,
                     drafter=dstate, gamma=jnp.full((b,), gamma0, jnp.int32), key=key,
                     accept_hist=jnp.zeros((self.shape.max_depth + 1,), jnp.int32),
                     rank_hist=jnp.zeros((self.shape.max_depth, self.shape.max_children), jnp.int32),
                     draft_forwards=jnp.zeros((), jnp.int32), rounds=jnp.zeros((), jnp.int32))

    def _gamma0(self) -> int:
        return self.shape.max_depth

    @staticmethod
    def _rank_hist(hist, tree: TreeBatch, acc: Accepted, running):
        """Add, for each depth d <= n, which sibling (0 = first tried) the accepted path took:
        one gather and one scatter-add over all depths (a chain's only sibling is rank 0, so
        its histogram is the accepted lengths' and costs one scatter-add)."""
        depth, k = hist.shape
        d = jnp.arange(1, depth + 1, dtype=jnp.int32)[None, :]  # [1, D]
        ok = running[:, None] & (acc.n[:, None] >= d)  # [B, D]
        if tree.children.shape[-1] == 1:
            r = jnp.zeros_like(ok, jnp.int32)
        else:
            rows = jnp.arange(acc.path.shape[0])[:, None]
            kids = tree.children[rows, acc.path[:, :depth]]  # [B, D, K']
            r = jnp.argmax(kids == acc.path[:, 1:depth + 1, None], axis=2).astype(jnp.int32)
            ok = ok & (r < k)
        return hist.at[jnp.broadcast_to(d - 1, ok.shape), jnp.where(ok, r, k)].add(1, mode="drop")

    def _next_gamma(self, gamma, acc: Accepted, tree: TreeBatch):
        return gamma

    # -- the four phases ----------------------------------------------------------------------

    def propose(self, ctx, params, state: State, key):
        """-> (the view the drafter read (the state itself), TreeBatch, drafter state, target
        cache, draft forwards: int32[])."""
        view = state
        tree, dstate, cache, n_fwd = self.drafter.propose(ctx, params, state.drafter, view, self.shape,
                                                           self._limit(state), key)
        return view, tree, dstate, cache, n_fwd

    def verify(self, ctx, params, cache: KVCache, tree: TreeBatch):
        """One target forward over every node: `Output` with logits float32[B, N, V] (and hidden
        {layer: [B, N, D]} at the drafter's `target_hidden_layers`). A drafter with its own
        `verify(ctx, params, cache, tree, positions, shape)` runs this forward instead (it must return
        the same logits and cache for the N nodes; its `hidden` entries, [B, N, ...], reach its
        `commit` gathered along the accepted path, like the features)."""
        positions = cache.lengths[:, None] + tree.depth
        own = getattr(self.drafter, "verify", None)  # a drafter that rides on the verify forward (hidden transfer)
        if own is not None:
            return own(ctx, params, cache, tree, positions, self.shape)
        mask = None if self.is_chain else tree.mask
        return forward(ctx.target, params["target"], tree.tokens, positions, cache, mask=mask,
                       return_hidden=self._hidden_layers(ctx), options=ctx.options)

    def accept(self, ctx, tree: TreeBatch, logits, key) -> Accepted:
        if ctx.sampling.is_greedy:
            return accept_greedy(tree, logits, self.shape.max_depth)
        return accept_sampled(tree, ctx.sampling.logprobs(logits), key, self.shape.max_depth, self.lenience)

    def commit(self, ctx, params, state: State, view: State, tree, acc: Accepted, cache, dstate, n_fwd,
               hidden=None) -> State:
        """`hidden`: the verify forward's {layer: [B, N, D]}, needed when the drafter reads features."""
        running = ~state.out.done
        new = acc.tokens(tree)  # [B, D+1]
        out = tokens.commit(state.out, new, acc.n + 1, ctx.rule)
        base = view.cache.lengths
        if self.is_chain:
            cache = cache.truncate(base + 1 + acc.n)
        else:
            cache = cache.gather(acc.path, acc.n + 1, base=base)
        cache = cache.truncate(jnp.where(running, cache.lengths, base))
        b = new.shape[0]
        j = jnp.arange(new.shape[1], dtype=jnp.int32)[None, :]
        slots = jnp.where((j <= acc.n[:, None]) & running[:, None], view.context_len[:, None] + j, ctx.capacity)
        context = state.context.at[jnp.arange(b)[:, None], slots].set(new, mode="drop")
        context_len = jnp.where(running, view.context_len + acc.n + 1, view.context_len)
        if self._hidden_layers(ctx):
            if not hidden:
                raise ValueError(f"{self.drafter.name} reads the target's features: pass the verify forward's "
                                 "hidden states to commit(..., hidden=verify(...).hidden).")
            # the accepted path's features, root first: {layer: [B, D + 1, Dm]} (entries past acc.n are padding)
            on_path = {i: jnp.take_along_axis(h, acc.path.reshape(acc.path.shape + (1,) * (h.ndim - 2)), axis=1)
                       for i, h in hidden.items()}
            dstate = self.drafter.commit(ctx, params, dstate, view, self.shape, tree, acc, running, hidden=on_path)
        else:
            dstate = self.drafter.commit(ctx, params, dstate, view, self.shape, tree, acc, running)
        depth_ix = jnp.where(running, acc.n, self.shape.max_depth + 1)
        hist = state.accept_hist.at[depth_ix].add(1, mode="drop")
        return State(out=out, cache=cache, root=jnp.where(running, acc.bonus, state.root), context=context,
                     context_len=context_len, drafter=dstate,
                     gamma=jnp.where(running, self._next_gamma(state.gamma, acc, tree), state.gamma),
                     key=state.key, accept_hist=hist,
                     rank_hist=self._rank_hist(state.rank_hist, tree, acc, running),
                     draft_forwards=state.draft_forwards + n_fwd,
                     rounds=state.rounds + 1)

    def step(self, ctx: Context, params, state: State) -> State:
        key, k_prop, k_acc = round_keys(ctx, state.key, 2)
        state = dataclasses.replace(state, key=key)
        view, tree, dstate, cache, n_fwd = self.propose(ctx, params, state, k_prop)
        res = self.verify(ctx, params, cache, tree)
        acc = self.accept(ctx, tree, res.logits, k_acc)
        return self.commit(ctx, params, state, view, tree, acc, res.cache, dstate, n_fwd, hidden=res.hidden)

    def stats(self, state: State) -> dict:
        hist = np.asarray(state.accept_hist).astype(np.int64)
        total = hist.sum()
        # acceptance rate at position d: P(n >= d | n >= d - 1), over rounds of running rows
        reach = [int(hist[d:].sum()) for d in range(len(hist))]
        rates = [reach[d] / reach[d - 1] if reach[d - 1] else float("nan") for d in range(1, len(hist))]
        return {
            "rounds": int(state.rounds),
            "draft_forwards": int(state.draft_forwards),
            "accepted_per_round": float((hist * np.arange(len(hist))).sum() / max(total, 1)),
            "acceptance_per_position": rates,
            "accept_histogram": hist.tolist(),
            "row_rounds": int(total),
            # rounds (over rows) whose accepted path went through the k-th sibling tried at depth d+1
            "acceptance_per_depth_rank": np.asarray(state.rank_hist).tolist(),
        }


@dataclasses.dataclass(frozen=True)
class Speculative(_SpecBase):
    """Speculative decoding with a chain of `gamma` draft tokens.

    `Speculative(DraftModel(), gamma=4)` with `generate(..., draft=small_model)`;
    `lenience < 1` gives DistillSpec's lossy acceptance; `dynamic=DynamicGamma()` adapts gamma
    per row (gamma is then the maximum); `confidence` stops drafting below that top-1 prob.
    The strategy is its own draft shape: a chain of `gamma` tokens (the attributes of
    `drafting.Chain`), so `TreeDecoding(drafter, tree=drafting.Chain(4))` drafts the same.
    """

    gamma: int = 4
    dynamic: DynamicGamma | None = None
    confidence: float | None = None

    name = "speculative"

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}.")
        if self.confidence is not None and not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}.")
        if self.dynamic is not None and not 1 <= self.dynamic.minimum <= self.dynamic.start <= self.gamma:
            raise ValueError(f"DynamicGamma needs 1 <= minimum <= start <= gamma={self.gamma}, got {self.dynamic}.")

    is_chain = True
    max_children = 1

    @property
    def num_nodes(self) -> int:
        return self.gamma + 1

    @property
    def max_depth(self) -> int:
        return self.gamma

    @property
    def shape(self) -> Speculative:
        return self

    def _gamma0(self) -> int:
        return self.dynamic.start if self.dynamic else self.gamma

    def _next_gamma(self, gamma, acc, tree):
        if self.dynamic is None:
            return gamma
        proposed = jnp.sum(tree.valid, axis=1) - 1
        full = (acc.n >= proposed) & (proposed > 0)
        rejected = acc.n < proposed
        g = jnp.where(full, gamma + self.dynamic.grow, jnp.where(rejected, gamma - self.dynamic.shrink, gamma))
        return jnp.clip(g, self.dynamic.minimum, self.gamma).astype(jnp.int32)


SHAPE_ATTRIBUTES = ("num_nodes", "max_depth", "max_children", "is_chain")


@dataclasses.dataclass(frozen=True)
class TreeDecoding(_SpecBase):
    """Tree speculative decoding over any draft shape: `tree=` a static `drafting.TreeTopology`,
    an EAGLE-2 `drafting.DynamicTree` (or a `drafting.Chain`)."""

    tree: Any = None

    name = "tree"

    def __post_init__(self):
        if self.tree is None:
            raise TypeError(
                "TreeDecoding needs tree=: a draft shape such as drafting.DynamicTree(depth=6, top_k=10, "
                "total_tokens=60) (EAGLE-2) or drafting.TreeTopology.from_branching((4, 2, 2)) (static)."
            )
        missing = [a for a in SHAPE_ATTRIBUTES if not hasattr(self.tree, a)]
        if missing:
            raise TypeError(
                f"tree must be a drafting.TreeTopology (static, e.g. TreeTopology.from_branching((4, 2, 2))), "
                f"a drafting.DynamicTree(...) or another draft shape with {SHAPE_ATTRIBUTES}; "
                f"got {type(self.tree).__name__}, which has no {missing}."
            )

    @property
    def shape(self):
        return self.tree
