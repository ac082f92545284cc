"""An EAGLE-3-style feature head (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of
Large Language Models via Training-Time Test"; EAGLE, Li et al. 2024, for the feature loop).

The head reads the target's residual stream after a low, a middle and a high layer, fuses the
three by one linear map (`fc: [3D, D]`) into a feature f_p per position p, and runs one
decoder layer of the target's family on pairs (feature of position p, token p + 1) at rope
position p, with its own final norm and the target's head; the output at p predicts token
p + 2. After the first draft step it feeds its own output state back in place of the target's
feature (the next pair is (head output at p, drafted token p + 2)). The head keeps its own KV
cache of the pairs whose target features are known, across draft steps and rounds.

Per round (the target's verify forward hands over the accepted path's features, see
`decoding.speculative`): the pending pairs (features of the last round's accepted path and
root, with the tokens that followed them) are fed in one catch-up forward, then draft steps
extend a chain, a static `TreeTopology` (level by level; siblings are the top-k, or, with
`Eagle(sampled_siblings=True)` at temperature > 0, draws without replacement verified by
recursive rejection) or an EAGLE-2 dynamic tree (`drafting.tree_search.expand_and_rerank`);
each tree node is fed with its parent's output state and sees its ancestors through a slot mask.
Entries written for draft nodes are always overwritten: the target's features of accepted
tokens replace the head's own.

Reduced draft vocabulary (EAGLE-3): `config_for(target, draft_vocab=Vd)` gives the head its own
`lm_head: [D, Vd]` over the Vd most frequent tokens of the training data (`reduced_vocab`), with
the map `d2t: int32[Vd]` (draft id -> target id) among its parameters. The drafter places the
Vd logits at their target ids (-inf elsewhere), so every proposal is a target id and the q the
verifier uses is a law over the target vocabulary, zero outside the draft vocabulary: sampled
verification stays exactly lossless. Greedy chains skip that [V] scatter: they take the argmax
of the Vd logits and map it through d2t, which is the argmax of the scattered row (d2t ascends,
so of tied logits the lowest draft id is the lowest target id, argmax's choice; the confidence
stop's top-1 probability is the same, exp(-inf) adding nothing). The scatter remains where the
[V] row is read: sampled chains (the verifier's q is a law over V) and trees (siblings are the
top-k of, or draws from, [V] log-probabilities in `choose_siblings` and `expand_and_rerank`,
greedy or sampled, and a sampled tree's q is over V).

Choices left open or simplified here: the pair (feature, next token) is fused by a second
linear map `w_in: [2D, D]` (EAGLE-1's fusion) so the decoder layer is the family's own
(`decoding.model.run_layers` on a one-layer config); default feature layers (2, L // 2, L - 3)
clamped to [1, L]; the reduced vocabulary is kept sorted by target id; trees and sampled chains
choose from draft logits scattered to the target vocabulary (one code path for them, at the
cost of a [V] scatter per draft step; the [D, Vd] head product is what shrinks).

Legend: B batch, P prompt, W catch-up width (max depth + 1), K top-k, D hidden, V vocab, S slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decoding.architecture import for_config
from decoding.cache import KVCache
from decoding.model import Model, embed, final_norm, lm_head, param_shapes, random_params, run_layers

from .medusa import HeadMismatch, read_head_file, target_identity, write_head_file
from .proposer import choose_draft_token, choose_siblings, sibling_sampler
from .shapes import DynamicTree, TreeTopology, chain_batch, place_siblings, topology_batch
from .tree_search import Frontier, expand_and_rerank


def default_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / middle / high layers (2, L // 2, L - 3), clamped to [1, L]."""
    clamp = lambda i: min(max(i, 1), num_layers)  # noqa: E731
    return clamp(2), clamp(num_layers // 2), clamp(num_layers - 3)


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """Static description of a head (the `draft` config in `decoding.Context`)."""

    layers: tuple[int, int, int]
    hidden_size: int
    vocab_size: int
    target: str = ""
    model_type: str = "eagle3"
    draft_vocab: int = 0  # Vd > 0: the head's own lm_head over Vd target tokens (params "d2t"); 0: the target's head

    def param_count(self) -> int:
        d = self.hidden_size
        return 5 * d * d + d * self.draft_vocab  # fc + w_in (+ lm_head); the decoder layer is counted by the family


def config_for(target: Model, layers: tuple[int, int, int] | None = None, draft_vocab: int = 0) -> EagleConfig:
    c = target.config
    layers = tuple(layers) if layers is not None else default_layers(c.num_layers)
    if len(layers) != 3 or not all(1 <= i <= c.num_layers for i in layers):
        raise ValueError(f"EAGLE feature layers must be three layers in [1, {c.num_layers}], got {layers}.")
    if not 0 <= draft_vocab <= c.vocab_size:
        raise ValueError(f"draft_vocab must be in [0, {c.vocab_size}] (0: the target's whole head), got {draft_vocab}.")
    return EagleConfig(layers=layers, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                       target=target_identity(c, target.params), draft_vocab=int(draft_vocab))


def reduced_vocab(counts, size: int) -> np.ndarray:
    """EAGLE-3's draft vocabulary: the `size` most frequent target tokens of `counts: int[V]`
    (token counts of the training data, `distill.data.token_counts`), ties to the lower id ->
    d2t: int32[size], ascending (draft id i is target token d2t[i])."""
    counts = np.asarray(counts)
    if not 1 <= size <= counts.shape[0]:
        raise ValueError(f"a draft vocabulary of {size} tokens cannot be cut from a vocabulary of {counts.shape[0]}.")
    order = np.lexsort((np.arange(counts.shape[0]), -counts))  # by count desc, then id asc
    return np.sort(order[:size]).astype(np.int32)


def target_head_columns(target_config, target_params: dict, d2t) -> jax.Array:
    """[D, Vd]: the target's output embedding restricted to the draft vocabulary (a head's
    `lm_head` initialisation)."""
    w = target_params["embed"].T if target_config.tie_embeddings else target_params["lm_head"]
    return jnp.take(w, jnp.asarray(d2t), axis=1)


def layer_config(target_config):
    """The one-layer config of the head's decoder layer (the target's family and sizes)."""
    return dataclasses.replace(target_config, num_layers=1)


def init_head(target_config, key: jax.Array, scale: float = 0.02, dtype=jnp.float32, d2t=None) -> dict:
    """{"fc": [3D, D], "w_in": [2D, D], "layers": one stacked layer, "final_norm": [D]}, and with
    a draft vocabulary `d2t: int[Vd]` also {"lm_head": [D, Vd] (random), "d2t": int32[Vd]}."""
    d = target_config.hidden_size
    lc = layer_config(target_config)
    shapes = {"fc": (3 * d, d), "w_in": (2 * d, d), "layers": param_shapes(lc)["layers"], "final_norm": (d,)}
    if d2t is not None:
        shapes["lm_head"] = (d, len(d2t))
    head = random_params(shapes, key, dtype, scale, norm_value=for_config(lc).norm_unit)
    if d2t is not None:
        head["d2t"] = jnp.asarray(d2t, jnp.int32)
    return head


def check_head(config: EagleConfig, head: dict, vocab_size: int):
    """Refuse a head whose draft vocabulary disagrees with its config or the target's vocabulary."""
    if config.draft_vocab:
        d2t = head.get("d2t")
        if d2t is None or "lm_head" not in head:
            raise HeadMismatch(f"the head's config names a draft vocabulary of {config.draft_vocab} tokens but its "
                               "parameters lack 'd2t' / 'lm_head': build it with init_head(..., d2t=reduced_vocab(...)).")
        if d2t.shape != (config.draft_vocab,) or head["lm_head"].shape[-1] != config.draft_vocab:
            raise HeadMismatch(f"the head's d2t {tuple(d2t.shape)} / lm_head {tuple(head['lm_head'].shape)} do not "
                               f"match its draft vocabulary of {config.draft_vocab} tokens.")
        if not jnp.issubdtype(d2t.dtype, jnp.integer):
            raise HeadMismatch(f"d2t must hold integer token ids, got {d2t.dtype}.")
        ids = np.asarray(jax.device_get(d2t))
        if ids.min() < 0 or ids.max() >= vocab_size or len(np.unique(ids)) != len(ids):
            raise HeadMismatch(f"d2t must hold {config.draft_vocab} distinct target ids in [0, {vocab_size}).")
    elif "d2t" in head or "lm_head" in head:
        raise HeadMismatch("the head has its own 'd2t' / 'lm_head' but its config has draft_vocab=0: build the "
                           "config with config_for(target, draft_vocab=len(d2t)).")


def as_draft(target: Model, config: EagleConfig, head: dict) -> Model:
    """The head as the `draft=` argument of `decoding.generate`."""
    c = target.config
    if (config.hidden_size, config.vocab_size) != (c.hidden_size, c.vocab_size):
        raise HeadMismatch(f"an EAGLE head for hidden size {config.hidden_size} / vocab {config.vocab_size} cannot "
                           f"read a target with hidden size {c.hidden_size} / vocab {c.vocab_size}.")
    want = target_identity(c, target.params)
    if config.target and config.target != want:
        raise HeadMismatch(f"this EAGLE head was trained for target {config.target!r}, not {want!r}.")
    check_head(config, head, c.vocab_size)
    return Model(config=config, params=head, tokenizer=target.tokenizer, source="eagle3")


FORMAT = "decoding-eagle3-head/1"


def save_head(path, config: EagleConfig, head: dict):
    """Write the head as one small safetensors file (bf16) with its config and target identity."""
    return write_head_file(path, FORMAT, config, head)


def load_head(path, target: Model, dtype=None) -> Model:
    """Read a file written by `save_head` for `target` -> the `draft=` Model (`as_draft`)."""
    fields, head = read_head_file(path, FORMAT, dtype or target.params["embed"].dtype)
    fields["layers"] = tuple(fields["layers"])
    return as_draft(target, EagleConfig(**fields), head)


def fuse(head: dict, hidden: dict, layers) -> jax.Array:
    """{layer: [B, T, D]} -> fused features [B, T, D]."""
    x = jnp.concatenate([hidden[i] for i in layers], axis=-1)
    return x @ head["fc"].astype(x.dtype)


def head_forward(target_config, target_params: dict, head: dict, cache: KVCache, feats: jax.Array,
                 tokens: jax.Array, positions: jax.Array, *, mask=None, slot_mask=None, options=None,
                 draft_ids: bool = False):
    """Pairs (feats[B, T, D], tokens[B, T]) at `positions` written at the head cache's cursor
    (not moved) -> (logits float32[B, T, V], output states [B, T, D], cache).

    With a draft vocabulary (`head["d2t"]`), the head's own `lm_head` scores the Vd draft tokens;
    their logits are placed at their target ids and every other token gets -inf (the draft law
    is zero outside the draft vocabulary), or, with `draft_ids`, returned as [B, T, Vd]."""
    e = embed(target_config, target_params, tokens)
    x = jnp.concatenate([e, feats.astype(e.dtype)], axis=-1) @ head["w_in"].astype(e.dtype)
    lc = layer_config(target_config)
    x, _, cache = run_layers(lc, head, x, positions, cache, mask=mask, slot_mask=slot_mask, options=options)
    normed = final_norm(lc, head, x)
    if "d2t" not in head:
        return lm_head(target_config, target_params, normed), x, cache
    own = lm_head(dataclasses.replace(lc, tie_embeddings=False), {"lm_head": head["lm_head"]}, normed)
    if draft_ids:
        return own, x, cache
    full = jnp.full((*own.shape[:-1], target_config.vocab_size), -jnp.inf, own.dtype)
    return full.at[..., head["d2t"]].set(own), x, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleState:
    """cache: the head's KVCache (lengths = pairs fed); feats: [B, C, D] the fused target feature
    of every position (those at the cursor and after it are pending: not fed yet); n_pending:
    int32[B] (cursor + n_pending = the target cache's length)."""

    cache: KVCache
    feats: jax.Array
    n_pending: jax.Array


@dataclasses.dataclass(frozen=True)
class Eagle:
    """The EAGLE-3-style proposer: pass the head as `draft=` (`as_draft`).

    sampled_siblings: in a static `TreeTopology` or a `DynamicTree` at temperature > 0, draw each
    node's children without replacement from the head's processed distribution (verified by
    recursive rejection, `decoding.tree`) instead of taking its top-k (one-hot proposals)."""

    sampled_siblings: bool = False

    name = "eagle3"

    def target_hidden_layers(self, ctx) -> tuple[int, ...]:
        return tuple(sorted(set(ctx.draft.layers)))

    def validate(self, ctx, draft, shape):
        if draft is None or not isinstance(ctx.draft, EagleConfig):
            raise ValueError("Eagle needs its head as the draft: generate(target, prompts, strategy=..., "
                             "draft=drafting.eagle.as_draft(target, config, head)).")
        if (ctx.draft.hidden_size, ctx.draft.vocab_size) != (ctx.target.hidden_size, ctx.target.vocab_size):
            raise HeadMismatch(f"an EAGLE head for hidden size {ctx.draft.hidden_size} cannot read this target "
                               f"(hidden size {ctx.target.hidden_size}).")
        if not (shape.is_chain or isinstance(shape, (TreeTopology, DynamicTree))):
            raise TypeError(f"Eagle drafts chains, drafting.TreeTopology and drafting.DynamicTree (EAGLE-2's "
                            f"search), not {shape!r}.")
        if ctx.draft.draft_vocab and not shape.is_chain and shape.max_children > ctx.draft.draft_vocab:
            raise ValueError(f"a tree with {shape.max_children} children per node needs a draft vocabulary of at least "
                             f"that many tokens, not {ctx.draft.draft_vocab}.")

    @staticmethod
    def _width(shape) -> int:
        return shape.max_depth + 1

    def slack(self, shape) -> int:
        if isinstance(shape, DynamicTree):
            return shape.depth * shape.top_k + 2
        return shape.max_depth + 2

    def init(self, ctx, params, prompt, lengths, cache, hidden=None):
        if hidden is None:
            raise ValueError("Eagle.init needs the prefill's hidden states (hidden=); run it through "
                             "decoding.Speculative / decoding.TreeDecoding, which pass them.")
        head = params["draft"]
        b, p = prompt.shape
        f = fuse(head, hidden, ctx.draft.layers)  # [B, P, D]
        hcache = KVCache.init(layer_config(ctx.target), b, ctx.capacity, params["target"]["embed"].dtype)
        nxt = jnp.concatenate([prompt[:, 1:], jnp.zeros_like(prompt[:, :1])], axis=1)  # token p + 1
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        _, _, hcache = head_forward(ctx.target, params["target"], head, hcache, f, nxt, positions,
                                    options=ctx.options)
        hcache = hcache.truncate(lengths - 1)  # pairs 0 .. P-2; the last feature waits for the root
        feats = jnp.zeros((b, ctx.capacity, f.shape[-1]), f.dtype).at[:, :p].set(f)
        return EagleState(hcache, feats, jnp.ones((b,), jnp.int32)), cache

    # -- propose -------------------------------------------------------------------------------
    def _catch_up(self, ctx, params, dstate: EagleState, view, width, draft_ids=False):
        """Feed the pending pairs; -> (root logits [B, V] ([B, Vd] with `draft_ids`), root output
        state [B, D], head cache with its cursor at the target cache's length)."""
        c, m = dstate.cache.lengths, dstate.n_pending
        j = jnp.arange(width, dtype=jnp.int32)[None, :]
        pend = jnp.take_along_axis(dstate.feats, jnp.minimum(c[:, None] + j, dstate.feats.shape[1] - 1)[:, :, None],
                                   axis=1)
        idx = jnp.minimum(c[:, None] + j + 1, view.context.shape[1] - 1)
        tokens = jnp.take_along_axis(view.context, idx, axis=1)
        logits, out, hcache = head_forward(ctx.target, params["target"], params["draft"], dstate.cache, pend, tokens,
                                           c[:, None] + j, options=ctx.options, draft_ids=draft_ids)
        last = (m - 1)[:, None, None]
        root_logits = jnp.take_along_axis(logits, last, axis=1)[:, 0]
        root_h = jnp.take_along_axis(out, last, axis=1)[:, 0]
        return root_logits, root_h, hcache.truncate(c + m)

    @staticmethod
    def _draft_ids(ctx, params, shape) -> bool:
        """Whether the head's logits stay over its Vd draft tokens (`head_forward(draft_ids=True)`):
        a greedy chain with a reduced vocabulary, whose argmax is mapped through d2t after it."""
        return shape.is_chain and ctx.sampling.is_greedy and "d2t" in params["draft"]

    def propose(self, ctx, params, dstate: EagleState, view, shape, limit, key):
        width = self._width(shape)
        draft_ids = self._draft_ids(ctx, params, shape)
        root_logits, root_h, hcache = self._catch_up(ctx, params, dstate, view, width, draft_ids)
        base = hcache.lengths  # = view.cache.lengths: the root pair sits at base - 1
        if shape.is_chain:
            tree, n_fwd = self._chain(ctx, params, hcache, base, root_logits, root_h, view.root, shape, limit, key)
        elif isinstance(shape, TreeTopology):
            tree, n_fwd = self._static_tree(ctx, params, hcache, base, root_logits, root_h, view.root, shape, key)
        elif isinstance(shape, DynamicTree):
            tree, n_fwd = self._dynamic_tree(ctx, params, hcache, base, root_logits, root_h, view.root, shape, key)
        else:
            raise TypeError(f"{self.name} cannot draft shape {shape!r}")
        return tree, EagleState(hcache, dstate.feats, dstate.n_pending), view.cache, jnp.asarray(n_fwd, jnp.int32)

    def _chain(self, ctx, params, hcache, base, root_logits, root_h, root, shape, limit, key):
        """Draft steps of a chain; the logits are over the Vd draft tokens when `_draft_ids`
        (the chosen draft id is then mapped to its target id through d2t), else over V."""
        b, vocab = root_logits.shape
        g = shape.gamma
        draft_ids = self._draft_ids(ctx, params, shape)
        sampled = not ctx.sampling.is_greedy
        drafts = jnp.zeros((b, g), jnp.int32)
        qs = jnp.zeros((b, g, vocab), jnp.float32) if sampled else None
        active = jnp.ones((b,), bool)
        n_prop = jnp.zeros((b,), jnp.int32)
        logits, h = root_logits, root_h
        for i in range(g):
            tok, lp, active = choose_draft_token(ctx, shape, key, i, logits, active, limit)
            if draft_ids:
                tok = params["draft"]["d2t"][tok]
            if sampled:
                qs = qs.at[:, i].set(lp)
            drafts = drafts.at[:, i].set(jnp.where(active, tok, 0))
            n_prop = n_prop + active
            if i + 1 < g:  # the pair (own state, drafted token) at position base + i
                hcache = hcache.truncate(base + i)
                lg, out, hcache = head_forward(ctx.target, params["target"], params["draft"], hcache, h[:, None],
                                               tok[:, None], (base + i)[:, None], options=ctx.options,
                                               draft_ids=draft_ids)
                logits, h = lg[:, 0], out[:, 0]
        return chain_batch(root, drafts, n_prop, qs), g

    def _static_tree(self, ctx, params, hcache, base, root_logits, root_h, root, topo: TreeTopology, key):
        """Level by level: the nodes of one depth are the pairs (parent's output state, token) at
        position base - 1 + depth, node i written at slot base + i - 1 and seeing the prefix and
        its ancestors (a slot mask); node of rank r is its parent's r-th sibling."""
        b = root_logits.shape[0]
        n, k = topo.num_nodes, topo.max_rank
        tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(root)
        valid = jnp.ones((b, n), bool)
        states = jnp.zeros((b, n, root_h.shape[-1]), root_h.dtype).at[:, 0].set(root_h)
        top, lp, ok = choose_siblings(ctx, key, 0, root_logits[:, None], k, self.sampled_siblings)
        tokens, valid, qs = place_siblings(topo, 0, np.array([0]), top, ok, lp, tokens, valid, None)
        s = jnp.arange(hcache.capacity, dtype=jnp.int32)[None, None, :]
        rel = s - base[:, None, None]
        in_region = (rel >= 0) & (rel < n - 1)
        for level, (first, count) in enumerate(topo.levels[:-1]):
            ids = np.arange(first, first + count)
            vis = jnp.asarray(topo.mask[ids, 1:])  # [count, N - 1]: node j at region slot j - 1
            anc = vis[:, jnp.clip(rel[:, 0], 0, n - 2)].transpose(1, 0, 2)  # [B, count, S]
            slot_mask = (s < base[:, None, None]) | (in_region & anc)
            positions = base[:, None] - 1 + jnp.asarray(topo.depth[ids])[None, :]
            hc = hcache.truncate(base + first - 1)
            logits, out, hcache = head_forward(ctx.target, params["target"], params["draft"], hc,
                                               states[:, topo.parents[ids]], tokens[:, ids], positions,
                                               slot_mask=slot_mask, options=ctx.options)
            states = states.at[:, ids].set(out)
            top, lp, ok = choose_siblings(ctx, key, level + 1, logits, k, self.sampled_siblings)
            tokens, valid, qs = place_siblings(topo, level + 1, ids, top, ok, lp, tokens, valid, qs)
        return topology_batch(topo, tokens, valid, qs), len(topo.levels)

    def _dynamic_tree(self, ctx, params, hcache, base, root_logits, root_h, root, shape: DynamicTree, key):
        k = shape.top_k
        b = root_logits.shape[0]

        def score(carry, frontier: Frontier):
            hc, prev_h = carry  # prev_h: [B, K, D] output states of the previous frontier
            if frontier.depth == 1:
                feats = jnp.broadcast_to(root_h[:, None], (b, k, root_h.shape[-1]))
            else:
                feats = jnp.take_along_axis(prev_h, frontier.parent[:, :, None], axis=1)
            region = frontier.visible.shape[-1]
            s = jnp.arange(hc.capacity, dtype=jnp.int32)[None, None, :]
            rel = s - base[:, None, None]
            in_region = (rel >= 0) & (rel < region)
            anc = jnp.take_along_axis(frontier.visible, jnp.clip(rel, 0, region - 1).repeat(k, 1), axis=2)
            slot_mask = (s < base[:, None, None]) | (in_region & anc)
            positions = jnp.broadcast_to((base - 1 + frontier.depth)[:, None], (b, k))
            hc = hc.truncate(base + frontier.slot)
            logits, out, hc = head_forward(ctx.target, params["target"], params["draft"], hc, feats, frontier.tokens,
                                           positions, slot_mask=slot_mask, options=ctx.options)
            return logits, (hc, out)

        init_h = jnp.zeros((b, k, root_h.shape[-1]), root_h.dtype)
        tree, _, n_scored = expand_and_rerank(score, (hcache, init_h), root, root_logits, shape,
                                              sibling_sampler(ctx, key, shape, self.sampled_siblings))
        return tree, 1 + n_scored

    # -- commit --------------------------------------------------------------------------------
    def commit(self, ctx, params, dstate: EagleState, view, shape, tree, acc, running, hidden=None):
        """Pending pairs: the accepted path's target features (root first), n + 1 of them, stored
        at their positions base .. base + n."""
        f = fuse(params["draft"], hidden, ctx.draft.layers).astype(dstate.feats.dtype)  # [B, D + 1, D]
        b, w = f.shape[:2]
        base = view.cache.lengths
        j = jnp.arange(w, dtype=jnp.int32)[None, :]
        slots = jnp.where((j <= acc.n[:, None]) & running[:, None], base[:, None] + j, dstate.feats.shape[1])
        feats = dstate.feats.at[jnp.arange(b)[:, None], slots].set(f, mode="drop")
        cursor = jnp.where(running, base, base - dstate.n_pending)
        return EagleState(dstate.cache.truncate(cursor), feats, jnp.where(running, acc.n + 1, dstate.n_pending))
