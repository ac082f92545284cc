"""Drafters that are language models: a small draft LM, or the target's own first layers.

`LayerSkip` is self-speculative decoding without a second model: the target's first layers and
its own head draft, the whole target verifies (LayerSkip, Elhoushi et al. 2024; Draft & Verify,
Zhang et al. 2024, which skips chosen intermediate layers instead). Here the draft is always a
prefix of the layers, used as trained (no early-exit training), and it shares the target's KV
cache for those layers.

Both implement `drafting.Proposer` through one generic engine that only needs a forward
function (`_forward`) and a notion of how far the drafter's cache has caught up
(`_drafted_len`). The engine drafts any shape:

- a chain (`shape.is_chain`: `Chain(gamma)` or a `decoding.Speculative`): one catch-up
  forward over the tokens committed since the drafter last ran (the root, plus the last draft
  token when a whole chain was accepted), then gamma - 1 single-token forwards. Greedy
  decoding drafts argmaxes (deterministic proposals); sampled decoding samples from the
  drafter's *processed* distribution, which the verifier uses as q.
- `TreeTopology` (static, Medusa-style): level by level; the nodes of one depth are forwarded
  together, each seeing the prefix and its ancestors (a slot mask over the drafter's cache);
  node of rank r gets its parent's r-th most likely token (deterministic siblings), or, with
  `sampled_siblings=True` at temperature > 0, its parent's r-th draw without replacement from
  the drafter's processed distribution (Gumbel-top-k; SpecInfer / Sequoia style), verified by
  the recursive rejection rule of `decoding.tree`. Choice: sampled siblings are opt-in (top-k
  stays the default) so existing settings keep their measured behaviour; under greedy decoding
  the option changes nothing.
- `DynamicTree` (EAGLE-2): `drafting.tree_search.expand_and_rerank`, each frontier scored by
  one forward of its K nodes, written at their tree-region slots right after the root and
  seeing the prefix and their ancestors (a slot mask). Siblings are the top-k, or with
  `sampled_siblings` at temperature > 0 draws without replacement (each node keeps a prefix
  of its draws).

Legend: B batch, N nodes, W catch-up width, K top-k, V vocab, S cache slots.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decoding.cache import KVCache
from decoding.model import forward
from decoding.strategy import prefill

from .proposer import View, choose_draft_token, choose_siblings, sibling_sampler
from .shapes import DynamicTree, TreeTopology, chain_batch, place_siblings, topology_batch
from .tree_search import Frontier, expand_and_rerank


@dataclasses.dataclass(frozen=True)
class ModelDrafter(abc.ABC):
    """Generic LM drafter (see module doc). Subclasses define the forward and the cache."""

    name = "model"
    sampled_siblings: bool = dataclasses.field(default=False, kw_only=True)

    # -- provided by subclasses ----------------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, ctx, params, dstate, cache, tokens, positions, *, logit_indices=None, slot_mask=None):
        """Run the drafter on tokens written at its cache cursor -> (logits, dstate, target cache)."""

    @abc.abstractmethod
    def _drafted_len(self, dstate, view: View):
        """int32[B]: tokens of the context the drafter's cache holds (its cursor)."""

    @abc.abstractmethod
    def _set_cursor(self, dstate, cache, lengths):
        """Move the drafter's cache cursor -> (dstate, target cache)."""

    @abc.abstractmethod
    def _cursor(self, dstate, cache):
        """int32[B]: the drafter's cache cursor."""

    @abc.abstractmethod
    def _capacity(self, dstate, cache) -> int:
        """Slots of the cache the drafter writes to."""

    @abc.abstractmethod
    def _catchup_width(self, shape) -> int:
        """Static width of the catch-up forward for a draft shape."""

    # -- shared engine ----------------------------------------------------------------------------
    def slack(self, shape) -> int:
        if isinstance(shape, DynamicTree):
            return shape.depth * shape.top_k + 2
        return self._catchup_width(shape) + 1

    def _catch_up(self, ctx, params, dstate, cache, view: View, shape):
        """Feed the committed tokens the drafter has not seen; return logits at the root."""
        width = self._catchup_width(shape)
        start = self._drafted_len(dstate, view)
        dstate, cache = self._set_cursor(dstate, cache, start)
        j = jnp.arange(width, dtype=jnp.int32)[None, :]
        idx = jnp.minimum(start[:, None] + j, view.context.shape[1] - 1)
        tokens = jnp.take_along_axis(view.context, idx, axis=1)
        positions = start[:, None] + j
        n_pending = view.context_len - start  # >= 1 (the root)
        logits, dstate, cache = self._forward(ctx, params, dstate, cache, tokens, positions,
                                              logit_indices=(n_pending - 1)[:, None])
        dstate, cache = self._set_cursor(dstate, cache, view.context_len)
        return logits[:, 0], dstate, cache

    def propose(self, ctx, params, dstate, view: View, shape, limit, key):
        cache = view.cache
        root_logits, dstate, cache = self._catch_up(ctx, params, dstate, cache, view, shape)
        if shape.is_chain:
            out = self._chain(ctx, params, dstate, cache, view, shape, limit, key, root_logits)
        elif isinstance(shape, TreeTopology):
            out = self._static_tree(ctx, params, dstate, cache, view, shape, root_logits, key)
        elif isinstance(shape, DynamicTree):
            out = self._dynamic_tree(ctx, params, dstate, cache, view, shape, root_logits, key)
        else:
            raise TypeError(f"{self.name} cannot draft shape {shape!r}")
        tree, dstate, cache, n_fwd = out
        # The verifier writes the tree right after the committed prefix: restore that cursor.
        return tree, dstate, cache.truncate(view.cache.lengths), n_fwd

    def _chain(self, ctx, params, dstate, cache, view, shape, limit, key, root_logits):
        """Draft up to `gamma` tokens per row (fewer where `limit` or `confidence` stops it)."""
        b, vocab = root_logits.shape
        g = shape.gamma
        sampled = not ctx.sampling.is_greedy
        base = view.context_len  # position of the first draft token

        def choose(i, logits, active, drafts, qs):
            tok, lp, active = choose_draft_token(ctx, shape, key, i, logits, active, limit)
            if sampled:
                qs = jax.lax.dynamic_update_slice_in_dim(qs, lp[:, None], i, axis=1)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, jnp.where(active, tok, 0)[:, None], i, axis=1)
            return active, drafts, qs

        drafts = jnp.zeros((b, g), jnp.int32)
        qs = jnp.zeros((b, g, vocab), jnp.float32) if sampled else None
        active, drafts, qs = choose(0, root_logits, jnp.ones((b,), bool), drafts, qs)

        def cond(carry):
            return (carry[0] < g) & jnp.any(carry[1])

        def body(carry):
            i, active, n_prop, drafts, qs, dstate, cache, n_fwd = carry
            tok = jax.lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1)
            logits, dstate, cache = self._forward(ctx, params, dstate, cache, tok, (base + i - 1)[:, None])
            cur = self._cursor(dstate, cache)
            dstate, cache = self._set_cursor(dstate, cache, jnp.where(active, cur + 1, cur))
            active, drafts, qs = choose(i, logits[:, 0], active, drafts, qs)
            return i + 1, active, n_prop + active, drafts, qs, dstate, cache, n_fwd + 1

        carry = (jnp.ones((), jnp.int32), active, active.astype(jnp.int32), drafts, qs, dstate, cache,
                 jnp.ones((), jnp.int32))
        if shape.confidence is None:
            # Fixed trip count: unrolled, so no loop predicate returns to the host per draft token.
            for _ in range(g - 1):
                carry = body(carry)
            _, _, n_prop, drafts, qs, dstate, cache, n_fwd = carry
        else:  # rows may stop early: a loop that exits once every row has stopped
            _, _, n_prop, drafts, qs, dstate, cache, n_fwd = jax.lax.while_loop(cond, body, carry)
        return chain_batch(view.root, drafts, n_prop, qs), dstate, cache, n_fwd

    def _level_forward(self, ctx, params, dstate, cache, view, tokens, depth, slot_of, anc_slots):
        """Forward `tokens: [B, T]` at positions prefix + depth, written at slots `slot_of` (a
        static offset past the root), each seeing the prefix (root included) and the slots
        `anc_slots: bool[B, T, R]` of the tree region starting right after the root."""
        b, t = tokens.shape
        root_slot = view.context_len - 1
        dstate, cache = self._set_cursor(dstate, cache, root_slot + 1 + slot_of)
        cap = self._capacity(dstate, cache)
        s = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
        rel = s - (root_slot[:, None, None] + 1)
        region = anc_slots.shape[-1]
        in_region = (rel >= 0) & (rel < region)
        anc = jnp.take_along_axis(anc_slots, jnp.clip(rel, 0, region - 1).astype(jnp.int32).repeat(t, 1), axis=2)
        slot_mask = (s <= root_slot[:, None, None]) | (in_region & anc)
        positions = root_slot[:, None] + depth
        logits, dstate, cache = self._forward(ctx, params, dstate, cache, tokens, positions, slot_mask=slot_mask)
        return logits, dstate, cache

    def _static_tree(self, ctx, params, dstate, cache, view, topo: TreeTopology, root_logits, key):
        """Level by level; node of rank r gets its parent's r-th sibling (`choose_siblings`:
        top-k, or draws without replacement with `sampled_siblings` at temperature > 0)."""
        b = root_logits.shape[0]
        n = topo.num_nodes
        k = topo.max_rank
        tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(view.root)
        valid = jnp.ones((b, n), bool)
        qs = None

        def fill(level, par_ids, logits, tokens, valid, qs):
            """Children of the nodes `par_ids` (logits [B, len(par_ids), V]) at depth level + 1."""
            top, lp, ok = choose_siblings(ctx, key, level, logits, k, self.sampled_siblings)
            return place_siblings(topo, level, par_ids, top, ok, lp, tokens, valid, qs)

        tokens, valid, qs = fill(0, np.array([0]), root_logits[:, None], tokens, valid, qs)
        anc = np.zeros((n, n - 1), bool)  # node -> visible tree-region slots (node i at slot i-1)
        anc[:, :] = topo.mask[:, 1:]
        n_fwd = 1
        for level, (first, count) in enumerate(topo.levels[:-1]):
            ids = np.arange(first, first + count)
            vis = jnp.broadcast_to(jnp.asarray(anc[ids]), (b, count, n - 1))
            logits, dstate, cache = self._level_forward(
                ctx, params, dstate, cache, view, tokens[:, ids], jnp.asarray(topo.depth[ids])[None, :],
                first - 1, vis)
            tokens, valid, qs = fill(level + 1, ids, logits, tokens, valid, qs)
            n_fwd += 1
        return topology_batch(topo, tokens, valid, qs), dstate, cache, jnp.asarray(n_fwd, jnp.int32)

    def _dynamic_tree(self, ctx, params, dstate, cache, view, shape: DynamicTree, root_logits, key):
        def score(carry, frontier: Frontier):
            dstate, cache = carry
            depth = jnp.full((1, shape.top_k), frontier.depth, jnp.int32)
            logits, dstate, cache = self._level_forward(ctx, params, dstate, cache, view, frontier.tokens, depth,
                                                        frontier.slot, frontier.visible)
            return logits, (dstate, cache)

        tree, (dstate, cache), n_scored = expand_and_rerank(score, (dstate, cache), view.root, root_logits, shape,
                                                            sibling_sampler(ctx, key, shape, self.sampled_siblings))
        return tree, dstate, cache, jnp.asarray(1 + n_scored, jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftState:
    cache: object  # the draft model's KVCache; lengths = its cursor


@dataclasses.dataclass(frozen=True)
class DraftModel(ModelDrafter):
    """A separate small LM sharing the target's tokenizer (pass it as `generate(..., draft=...)`)."""

    name = "draft_model"

    def validate(self, ctx, draft, shape):
        if draft is None or ctx.draft is None:
            raise ValueError("DraftModel needs the draft model: generate(target, prompts, strategy=..., draft=small_model).")

    def _catchup_width(self, shape) -> int:
        # chains: the root, plus the last draft token when the whole chain was accepted;
        # trees: the root and every accepted token (tree slots are not contiguous).
        return 2 if shape.is_chain else shape.max_depth + 2

    def _capacity(self, dstate, cache):
        return dstate.cache.capacity

    def _forward(self, ctx, params, dstate, cache, tokens, positions, *, logit_indices=None, slot_mask=None):
        out = forward(ctx.draft, params["draft"], tokens, positions, dstate.cache,
                      logit_indices=logit_indices, slot_mask=slot_mask, options=ctx.options)
        # forward advanced the cursor by T; callers place it explicitly with _set_cursor
        return out.logits, DraftState(out.cache.truncate(dstate.cache.lengths)), cache

    def _drafted_len(self, dstate, view):
        return dstate.cache.lengths

    def _cursor(self, dstate, cache):
        return dstate.cache.lengths

    def _set_cursor(self, dstate, cache, lengths):
        return DraftState(dstate.cache.truncate(lengths)), cache

    def init(self, ctx, params, prompt, lengths, cache):
        dcache = KVCache.init(ctx.draft, prompt.shape[0], ctx.capacity, params["draft"]["embed"].dtype)
        _, dcache = prefill(ctx.draft, params["draft"], prompt, lengths, dcache, ctx.options)
        return DraftState(dcache), cache

    def commit(self, ctx, params, dstate, view, shape, tree, acc, running):
        # Valid drafter entries after a chain: the root and d_1..d_{m-1} (d_m was never fed);
        # after a tree: only the root (the accepted path is re-fed by the next catch-up).
        base = view.cache.lengths
        if shape.is_chain:
            m = jnp.sum(tree.valid, axis=1) - 1  # tokens proposed
            new_len = jnp.minimum(base + jnp.maximum(m, 1), base + 1 + acc.n)
        else:
            new_len = base + 1
        return DraftState(dstate.cache.truncate(jnp.where(running, new_len, view.context_len)))


@dataclasses.dataclass(frozen=True)
class LayerSkip(ModelDrafter):
    """Self-speculative drafting with the target's first `layers` layers and its own head
    (final norm + LM head), in the spirit of LayerSkip (Elhoushi et al. 2024) and
    Draft & Verify (Zhang et al. 2024), without any training. It shares the target's KV cache:
    the shallow layers' entries it writes for draft tokens are overwritten by verification."""

    layers: int = 8

    name = "layer_skip"

    def validate(self, ctx, draft, shape):
        if not 1 <= self.layers < ctx.target.num_layers:
            raise ValueError(f"LayerSkip(layers={self.layers}) needs 1 <= layers < {ctx.target.num_layers} "
                             "(the target's depth).")

    def _catchup_width(self, shape) -> int:
        return 1  # the target cache holds every committed token; only the root is new

    def _capacity(self, dstate, cache):
        return cache.capacity

    def _forward(self, ctx, params, dstate, cache, tokens, positions, *, logit_indices=None, slot_mask=None):
        out = forward(ctx.target, params["target"], tokens, positions, cache, layers=(0, self.layers),
                      logit_indices=logit_indices, slot_mask=slot_mask, options=ctx.options)
        return out.logits, dstate, out.cache.truncate(cache.lengths)

    def _drafted_len(self, dstate, view):
        return view.cache.lengths

    def _cursor(self, dstate, cache):
        return cache.lengths

    def _set_cursor(self, dstate, cache, lengths):
        return dstate, cache.truncate(lengths)

    def init(self, ctx, params, prompt, lengths, cache):
        return jnp.zeros((), jnp.int32), cache

    def commit(self, ctx, params, dstate, view, shape, tree, acc, running):
        return dstate
