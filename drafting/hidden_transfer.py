"""Hidden transfer: the target drafts its own next tokens from pseudo hidden states (Wu et al.
2024, "Parallel Decoding via Hidden Transfer for Lossless Large Language Model Acceleration",
arXiv 2404.12022).

At an intermediate layer l, k trainable linear maps turn the residual stream h of a position
p into pseudo hidden states for the next k positions,

    pseudo_i = h W_i + b_i          W_i: [D, D], b_i: [D], i = 1..k, at position p + i,

which then run through layers [l, L) of the target in the same forward as the real tokens
(attending to the context up to p and, causally, to each other: pseudo_i sees pseudo_1..i),
and the target's own final norm and head turn their outputs into draft distributions for the
tokens at p + i + 1 (the real position p predicts p + 1). One model, no draft forward.

One round (`HiddenTransfer` is a proposer for `decoding.Speculative` / `decoding.TreeDecoding`,
so acceptance, commit and the statistics are theirs):
  propose  the pseudo outputs of the last accepted node (handed over by the previous round's
           forward) give k distributions; position i's gives the tokens of depth i: a chain
           (top-1, or a sample: stochastic nodes with q), a static `TreeTopology` (node of rank
           r at depth d: position d's r-th best token, Medusa's Cartesian candidates, one-hot
           siblings) or an EAGLE-2 `DynamicTree` over the same distributions;
  verify   ONE target forward (`verify`, `forward_with_pseudo`): layers [0, l) over the N tree
           nodes (ancestor mask, positions prefix + depth); d = min(k, depth of the shape)
           pseudo states per node from its layer-l state (deeper ones would draft nothing);
           layers [l, L) over the N nodes and the N * d pseudo positions together
           (node j's pseudo i at position p_j + i sees the prefix, j's ancestors and j itself,
           and pseudo 1..i of j; no real node sees a pseudo position). Logits are computed for
           the N nodes only;
  accept   the strategy's greedy walk or multi-round speculative sampling (`decoding.tree`);
  commit   the accepted path's keys/values move into place; the pseudo outputs of the last
           accepted node (whose own logits gave the bonus token, the next root) are kept: they
           are exactly the pseudo states a fresh forward over the committed context would give,
           since node j's pseudo positions saw exactly the prefix and j's path.
Since the last accepted node is unknown before acceptance, every node gets its d pseudo
positions. Pseudo positions write their keys/values to throwaway slots after the tree's N slots
(`slack = N * d`), past the cursor: never committed, overwritten next round. The committed
cache equals autoregressive decoding's.

Cost: N * d extra positions in layers [l, L) only (e.g. a 26-node tree of depth 4 adds 104
positions to the upper layers' attention and MLP; a chain of gamma adds (gamma + 1) * gamma),
and the vocabulary projection runs for the N nodes plus d pseudo states per row (not N * d):
the pseudo outputs stay as residual states [B, N, d, D] until the proposer reads the accepted
node's. On a memory-bound accelerator at small batch the extra positions are nearly free; at
large batch or large trees they are the price of drafting in the same forward. The cheaper
alternative `HiddenTransfer(pseudo="separate")` runs only the accepted node's d pseudo positions,
in a partial forward (layers [l, L)) at the next propose: the same drafts, d instead of N * d
extra positions, one more sequential upper-layer pass per round.

Choices the paper leaves open, made here:
- the maps read the raw residual stream after l layers (`hidden[l]`, not normalised) and their
  output enters layer l as a hidden state; W_i starts at the identity and b_i at zero, so an
  untrained map copies the last state to every pseudo position (it then guesses about what the
  target guesses next, shifted by rope);
- l in [1, L - 1] and k >= 1 are settings (`default_layer` = L // 2; the experiment
  `experiments/hidden_transfer.py` trains several (l, k));
- the prompt's pseudo states (first round) come from the prefill's layer-l state of the last
  prompt token, run through layers [l, L) in a second small forward over k positions (once per
  generation);
- trees: static Medusa-style topologies (deterministic top-k siblings, lossless at any
  temperature by the one-hot rule), chains (sampled drafts carry q) and EAGLE-2 dynamic trees;
- a map file (`save_maps` / `load_maps`) holds the maps in bf16 with the target's identity
  (`drafting.medusa.target_identity`), so maps trained for another model are refused.

Legend: B batch, N tree nodes (root included), k maps (pseudo positions per node), D hidden,
V vocab, L layers, S cache slots.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decoding.model import Model, Output, embed, run_layers, unembed

from .medusa import HeadMismatch, draft_from_position_logits, read_head_file, target_identity, write_head_file
from .shapes import DynamicTree, TreeTopology

FORMAT = "decoding-hidden-transfer/1"


class TransferMismatch(HeadMismatch):
    """Transfer maps trained for another target (sizes, layer count or weights differ)."""


def default_layer(num_layers: int) -> int:
    """The middle layer, L // 2, within [1, L - 1]."""
    return min(max(num_layers // 2, 1), max(num_layers - 1, 1))


def check_layer(layer: int, num_layers: int) -> None:
    if not 1 <= layer <= num_layers - 1:
        raise ValueError(f"hidden transfer layer must be in [1, {num_layers - 1}] for a {num_layers}-layer target "
                         f"(the maps read the stream after that many layers; the rest run on the pseudo "
                         f"positions), got layer={layer}.")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Static description of a set of transfer maps (the `draft` config in `decoding.Context`).

    layer: the maps read the residual stream after `layer` layers; num_maps: k pseudo positions;
    num_layers / hidden_size / vocab_size: the target's; target: its fingerprint
    (`drafting.medusa.target_identity`).
    """

    layer: int
    num_maps: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    target: str = ""
    model_type: str = "hidden-transfer"

    def __post_init__(self):
        if self.num_maps < 1:
            raise ValueError(f"hidden transfer needs num_maps (k) >= 1, got {self.num_maps}.")
        check_layer(self.layer, self.num_layers)

    def param_count(self) -> int:
        return self.num_maps * (self.hidden_size * self.hidden_size + self.hidden_size)


def config_for(target: Model, num_maps: int, layer: int | None = None) -> TransferConfig:
    """The `TransferConfig` of `num_maps` maps at `layer` (default: the middle) for `target`."""
    c = target.config
    layer = default_layer(c.num_layers) if layer is None else int(layer)
    return TransferConfig(layer=layer, num_maps=num_maps, num_layers=c.num_layers, hidden_size=c.hidden_size,
                          vocab_size=c.vocab_size, target=target_identity(c, target.params))


def init_maps(config: TransferConfig, key: jax.Array | None = None, scale: float = 0.0, dtype=jnp.float32) -> dict:
    """Map parameters {"w": [k, D, D], "b": [k, D]}: the identity and zero (an untrained map
    copies the state), plus, with `key`, normal noise of std `scale / sqrt(D)` on w."""
    k, d = config.num_maps, config.hidden_size
    w = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (k, d, d))
    if key is not None and scale:
        w = w + scale / np.sqrt(d) * jax.random.normal(key, (k, d, d))
    return {"w": w.astype(dtype), "b": jnp.zeros((k, d), dtype)}


def transfer(maps: dict, h: jax.Array) -> jax.Array:
    """Layer-l states `h: [..., D]` -> pseudo states [..., k, D] (h W_i + b_i, in h's dtype)."""
    w = maps["w"].astype(h.dtype)
    return jnp.einsum("...d,kde->...ke", h, w) + maps["b"].astype(h.dtype)


def pseudo_positions(positions: jax.Array, k: int) -> jax.Array:
    """int32[B, N] -> int32[B, N, k]: pseudo i (1-based) of the token at p sits at p + i."""
    return positions[..., None] + jnp.arange(1, k + 1, dtype=jnp.int32)


def pseudo_mask(node_mask: jax.Array, k: int) -> jax.Array:
    """The block mask of N nodes followed by their N * k pseudo positions (node-major: pseudo i
    of node j is entry N + j * k + i), from `node_mask: bool[B, N, N]` (ancestor-or-self):

        node  -> node      node_mask              node -> pseudo   never
        pseudo (j, i) -> node m    node_mask[j, m]     pseudo (j, i) -> (j', i')   j' = j and i' <= i

    -> bool[B, N (1 + k), N (1 + k)]."""
    b, n, _ = node_mask.shape
    m = node_mask.astype(bool)
    top = jnp.concatenate([m, jnp.zeros((b, n, n * k), bool)], axis=2)
    to_nodes = jnp.repeat(m, k, axis=1)  # [B, N k, N]
    own = np.eye(n, dtype=bool)[:, None, :, None] & np.tril(np.ones((k, k), bool))[None, :, None, :]
    to_pseudo = jnp.broadcast_to(jnp.asarray(own.reshape(n * k, n * k)), (b, n * k, n * k))
    return jnp.concatenate([top, jnp.concatenate([to_nodes, to_pseudo], axis=2)], axis=1)


def forward_with_pseudo(config, params: dict, maps: dict, layer: int, tokens: jax.Array, positions: jax.Array,
                        cache, mask: jax.Array | None = None, options=None):
    """One target forward over `tokens: int32[B, N]` at `positions` (node visibility `mask:
    bool[B, N, N]`, default causal) that also runs k pseudo positions per token in layers
    [layer, L) (see the module doc).

    Returns (logits float32[B, N, V] of the tokens, exactly those of `decoding.forward`;
    pseudo outputs [B, N, k, D]: the residual stream after the last layer at pseudo (j, i),
    before the final norm; cache with lengths + N: the tokens' keys/values at slots lengths + j,
    the pseudo positions' (layers >= l only) at slots lengths + N + j k + i, past the cursor).
    """
    b, n = tokens.shape
    k = maps["w"].shape[0]
    if mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))
    x = embed(config, params, tokens)
    x, _, cache = run_layers(config, params, x, positions, cache, mask=mask, layers=(0, layer), options=options)
    pseudo = transfer(maps, x).reshape(b, n * k, x.shape[-1])
    both = jnp.concatenate([x, pseudo], axis=1)
    pos = jnp.concatenate([positions, pseudo_positions(positions, k).reshape(b, n * k)], axis=1)
    y, _, cache = run_layers(config, params, both, pos, cache, mask=pseudo_mask(mask, k),
                             layers=(layer, config.num_layers), options=options)
    logits = unembed(config, params, y[:, :n])
    return logits, y[:, n:].reshape(b, n, k, y.shape[-1]), cache.truncate(cache.lengths + n)


def pseudo_logits(config, params: dict, pseudo: jax.Array) -> jax.Array:
    """Pseudo outputs [..., k, D] -> draft logits float32[..., k, V] (the target's norm and head)."""
    return unembed(config, params, pseudo)


# -- files and checks ------------------------------------------------------------------------


def check_maps(target: Model, config: TransferConfig, maps: dict | None = None) -> None:
    """Refuse maps whose sizes, layer range or target fingerprint do not fit `target`."""
    c = target.config
    if (config.hidden_size, config.vocab_size, config.num_layers) != (c.hidden_size, c.vocab_size, c.num_layers):
        raise TransferMismatch(
            f"transfer maps for hidden size {config.hidden_size} / vocab {config.vocab_size} / {config.num_layers} "
            f"layers cannot run on a target with hidden size {c.hidden_size} / vocab {c.vocab_size} / "
            f"{c.num_layers} layers: train maps for this target (distill.HiddenTransferRecipe).")
    want = target_identity(c, target.params)
    if config.target and config.target != want:
        raise TransferMismatch(f"these transfer maps were trained for target {config.target!r}, not {want!r}: load "
                               "the target they were trained for, or train maps for this one.")
    if maps is not None:
        shapes = {"w": (config.num_maps, c.hidden_size, c.hidden_size), "b": (config.num_maps, c.hidden_size)}
        got = {k: tuple(np.shape(v)) for k, v in maps.items()}
        if got != shapes:
            raise TransferMismatch(f"transfer map parameters have shapes {got}, expected {shapes}.")


def as_draft(target: Model, config: TransferConfig, maps: dict) -> Model:
    """The maps as the `draft=` argument of `decoding.generate` (checked against `target`)."""
    check_maps(target, config, maps)
    return Model(config=config, params=maps, tokenizer=target.tokenizer,
                 source=f"hidden-transfer[l={config.layer}, k={config.num_maps}]")


def save_maps(path: str | os.PathLike, config: TransferConfig, maps: dict) -> Path:
    """Write the maps as one small safetensors file (bf16) with the config and target identity."""
    return write_head_file(path, FORMAT, config, maps)


def load_maps(path: str | os.PathLike, target: Model, dtype=None) -> Model:
    """Read a file written by `save_maps` for `target` -> the `draft=` Model (`as_draft`)."""
    fields, maps = read_head_file(path, FORMAT, dtype or target.params["embed"].dtype)
    return as_draft(target, TransferConfig(**fields), maps)


# -- the proposer ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransferState:
    """pseudo: [B, k, D] the pseudo outputs (last layer, before the final norm) of the last
    token the target processed (the one before the root): they draft depths 1..k. In separate
    mode: [B, D], that token's layer-l state (the pseudo positions run in `propose`)."""

    pseudo: jax.Array


PSEUDO_MODES = ("verify", "separate")


@dataclasses.dataclass(frozen=True)
class HiddenTransfer:
    """The hidden-transfer proposer: pass the maps as `draft=` (`as_draft`, `load_maps`), e.g.
    `TreeDecoding(HiddenTransfer(), tree=TreeTopology.from_branching((4, 2, 2)))` or
    `Speculative(HiddenTransfer(), gamma=3)`.

    pseudo="verify" (the paper's arrangement): every tree node's pseudo positions ride along in
    the round's one target forward, N * d extra positions in the upper layers, no draft forward.
    pseudo="separate": the verify forward is the plain one (it hands over the layer-l states);
    `propose` runs layers [l, L) over the d pseudo positions of the last accepted node only, at
    the committed cursor (they see the committed context and each other, causally: the same
    pseudo states as "verify" mode), one partial forward per round. Fewer FLOPs (d instead of
    N * d pseudo positions), one more sequential upper-layer pass: for compute-bound settings
    (large batches, large trees); "verify" is the one to use while the target is memory-bound.
    Both are lossless and draft the same tokens.
    """

    pseudo: str = "verify"

    name = "hidden_transfer"

    def __post_init__(self):
        if self.pseudo not in PSEUDO_MODES:
            raise ValueError(f"HiddenTransfer pseudo={self.pseudo!r} is not one of {PSEUDO_MODES} ('verify': in the "
                             "verify forward, the paper's; 'separate': a partial forward for the accepted node).")

    def target_hidden_layers(self, ctx) -> tuple[int, ...]:
        return (ctx.draft.layer,)  # the prefill hands over the prompt's layer-l states

    def validate(self, ctx, draft, shape):
        if draft is None or not isinstance(ctx.draft, TransferConfig):
            raise ValueError("HiddenTransfer needs its transfer maps as the draft: generate(target, prompts, "
                             "strategy=..., draft=drafting.hidden_transfer.load_maps(path, target)) (or "
                             "hidden_transfer.as_draft(...)).")
        c, t = ctx.draft, ctx.target
        if (c.hidden_size, c.vocab_size, c.num_layers) != (t.hidden_size, t.vocab_size, t.num_layers):
            raise TransferMismatch(f"transfer maps for hidden size {c.hidden_size} / vocab {c.vocab_size} / "
                                   f"{c.num_layers} layers cannot run on this target (hidden size {t.hidden_size} / "
                                   f"vocab {t.vocab_size} / {t.num_layers} layers).")
        if not (shape.is_chain or isinstance(shape, (TreeTopology, DynamicTree))):
            raise TypeError(f"HiddenTransfer drafts chains, drafting.TreeTopology and drafting.DynamicTree, "
                            f"not {shape!r}.")
        if shape.max_depth > c.num_maps:
            raise ValueError(f"hidden transfer with k={c.num_maps} maps drafts at most {c.num_maps} tokens deep; the "
                             f"draft shape is {shape.max_depth} deep: lower gamma / the tree depth or train more "
                             "maps.")
        if isinstance(shape, DynamicTree) and shape.top_k > t.vocab_size:
            raise ValueError(f"DynamicTree top_k={shape.top_k} exceeds the vocabulary ({t.vocab_size}).")

    def slack(self, shape) -> int:
        """Throwaway slots of the pseudo positions: min(k, depth) per node (k >= depth, checked);
        separate: none (the d <= N - 1 pseudo slots are the next tree's, overwritten by it)."""
        return shape.num_nodes * shape.max_depth if self.pseudo == "verify" else 0

    def init(self, ctx, params, prompt, lengths, cache, hidden=None):
        """Pseudo outputs of the last prompt token: its layer-l state (from the prefill) through
        the maps and layers [l, L) at positions lengths - 1 + i (throwaway slots); separate: the
        layer-l state itself."""
        if hidden is None:
            raise ValueError("HiddenTransfer.init needs the prefill's hidden states (hidden=); run it through "
                             "decoding.Speculative / decoding.TreeDecoding, which pass them.")
        cfg = ctx.draft
        h = jnp.take_along_axis(hidden[cfg.layer], (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        if self.pseudo == "separate":
            return TransferState(h), cache
        y, cache = self._pseudo_forward(ctx, params, h, cache, cfg.num_maps)
        return TransferState(y), cache  # the cursor is unchanged (the pseudo entries are stale)

    @staticmethod
    def _pseudo_forward(ctx, params, h, cache, d):
        """Layer-l states h: [B, D] of the token before the root (at position cache.lengths - 1)
        -> (its d pseudo outputs [B, d, D], cache with their entries past the cursor)."""
        cfg, maps = ctx.draft, params["draft"]
        x = transfer({"w": maps["w"][:d], "b": maps["b"][:d]}, h)  # [B, d, D]
        pos = pseudo_positions((cache.lengths - 1)[:, None], d)[:, 0]  # [B, d]
        y, _, cache = run_layers(ctx.target, params["target"], x, pos, cache,
                                 layers=(cfg.layer, ctx.target.num_layers), options=ctx.options)
        return y, cache

    @property
    def verify(self):
        """The round's target forward (the strategy calls it in place of its own), or None in
        separate mode."""
        return self._verify_with_pseudo if self.pseudo == "verify" else None

    def _verify_with_pseudo(self, ctx, params, cache, tree, positions, shape):
        """The round's one target forward: the nodes and their pseudo positions
        (`forward_with_pseudo`). Only the first `shape.max_depth` maps run (deeper pseudo
        positions draft nothing); the state keeps k entries, the unused ones zero."""
        maps, k = params["draft"], ctx.draft.num_maps
        d = min(k, shape.max_depth)
        used = {"w": maps["w"][:d], "b": maps["b"][:d]}
        logits, pseudo, cache = forward_with_pseudo(ctx.target, params["target"], used, ctx.draft.layer,
                                                    tree.tokens, positions, cache, tree.mask, ctx.options)
        if d < k:
            pseudo = jnp.pad(pseudo, ((0, 0), (0, 0), (0, k - d), (0, 0)))
        return Output(logits=logits, hidden={"pseudo": pseudo}, cache=cache)

    def propose(self, ctx, params, dstate, view, shape, limit, key):
        if self.pseudo == "separate":  # the accepted node's pseudo positions, at the committed cursor
            d = min(ctx.draft.num_maps, shape.max_depth)
            pseudo, cache = self._pseudo_forward(ctx, params, dstate.pseudo, view.cache, d)
            n_fwd = jnp.ones((), jnp.int32)
        else:
            pseudo, cache, n_fwd = dstate.pseudo, view.cache, jnp.zeros((), jnp.int32)
        logits = pseudo_logits(ctx.target, params["target"], pseudo)  # [B, k or d, V]
        tree = draft_from_position_logits(ctx, logits, view.root, shape, limit, key, self.name)
        return tree, dstate, cache, n_fwd

    def commit(self, ctx, params, dstate, view, shape, tree, acc, running, hidden=None):
        """Keep the pseudo outputs (separate: the layer-l state) of the last accepted node (its
        logits gave the next root)."""
        on_path = hidden["pseudo"] if self.pseudo == "verify" else hidden[ctx.draft.layer]  # root first
        p = jnp.take_along_axis(on_path, acc.n.reshape((-1,) + (1,) * (on_path.ndim - 1)), axis=1)[:, 0]
        keep = running.reshape((-1,) + (1,) * (p.ndim - 1))
        return TransferState(jnp.where(keep, p.astype(dstate.pseudo.dtype), dstate.pseudo))
