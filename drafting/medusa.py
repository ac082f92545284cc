"""Medusa heads: k residual heads on the target's last hidden state (Cai et al. 2024, "Medusa:
Simple LLM Inference Acceleration Framework with Multiple Decoding Heads").

Head i (0-based) reads the target's final-normalised hidden state h_t at the last accepted
position t and predicts token t + 2 + i (the target's own head predicts t + 1, the root):

    logits_i = lm_head(h_t + SiLU(h_t W_i + b_i))          W_i: [D, D], b_i: [D]

with the target's own `lm_head` (Medusa-1's ResBlock; W_i starts at zero, so an untrained
head repeats the target's next-token guess). The proposer needs no forward of its own: the
target's verify forward hands it h at the accepted path's last node
(`target_hidden_layers`, `decoding.speculative`), and one batched matmul gives all k heads.

Draft shapes (`drafting.Proposer`): a chain of gamma <= k tokens (head i's top-1, or a sample
from its processed distribution, the verifier's q), a static `TreeTopology` of depth <= k
(node of rank r at depth d gets head d - 1's r-th most likely token, the same for every
parent: Medusa's Cartesian candidates; with `Medusa(sampled_siblings=True)` at temperature > 0,
head d - 1's r-th draw without replacement, one draw tuple per depth shared by every parent,
which stays lossless because the path reaching a parent does not depend on the later draws),
or an EAGLE-2 `DynamicTree` of depth <= k searched by
`expand_and_rerank` with head d's distribution at every depth-d node.

Choices the paper leaves open: heads read the final-normalised state (what the target's head
reads); a head file (`save_heads` / `load_heads`) holds the heads in bf16 with the target's
identity (sizes and a fingerprint of its final norm weights), so heads trained for another
target are refused.

Legend: B batch, D hidden size, V vocab, k heads, K top-k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decoding.model import Model, final_norm, lm_head

from .proposer import choose_siblings, sibling_sampler
from .shapes import DynamicTree, TreeTopology, chain_batch, place_siblings, topology_batch
from .tree_search import Frontier, expand_and_rerank

FORMAT = "decoding-medusa-heads/1"


class HeadMismatch(ValueError):
    """Heads trained for another target (sizes or weights differ)."""


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """Static description of a set of heads (the `draft` config in `decoding.Context`).

    `target` is the fingerprint of the target the heads were trained for (`target_identity`).
    """

    num_heads: int
    hidden_size: int
    vocab_size: int
    target: str = ""
    model_type: str = "medusa"

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"Medusa needs num_heads >= 1, got {self.num_heads}.")

    def param_count(self) -> int:
        return self.num_heads * (self.hidden_size * self.hidden_size + self.hidden_size)


def target_identity(config, params: dict) -> str:
    """A short fingerprint of a target: its sizes and its final norm weights rounded to bf16
    (the same for a checkpoint loaded in bf16 or float32)."""
    import ml_dtypes

    norm = np.asarray(jax.device_get(params["final_norm"]), np.float32).astype(ml_dtypes.bfloat16)
    digest = hashlib.sha256(norm.tobytes()).hexdigest()[:16]
    return f"{config.model_type}:L{config.num_layers}:D{config.hidden_size}:V{config.vocab_size}:{digest}"


def config_for(target: Model, num_heads: int) -> MedusaConfig:
    """The `MedusaConfig` of `num_heads` heads for `target`."""
    c = target.config
    return MedusaConfig(num_heads=num_heads, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                        target=target_identity(c, target.params))


def init_heads(config: MedusaConfig, key: jax.Array | None = None, scale: float = 0.0, dtype=jnp.float32) -> dict:
    """Head parameters {"w": [k, D, D], "b": [k, D]}: zero (Medusa's init) or, with `key`,
    normal with std `scale / sqrt(D)`."""
    k, d = config.num_heads, config.hidden_size
    w = jnp.zeros((k, d, d), dtype)
    if key is not None and scale:
        w = (scale / np.sqrt(d) * jax.random.normal(key, (k, d, d))).astype(dtype)
    return {"w": w, "b": jnp.zeros((k, d), dtype)}


def head_logits(target_config, target_params: dict, heads: dict, hidden: jax.Array) -> jax.Array:
    """hidden: the target's residual stream after its last layer [..., D] -> float32[..., k, V]."""
    h = final_norm(target_config, target_params, hidden)
    w = heads["w"].astype(h.dtype)
    z = jnp.einsum("...d,kde->...ke", h, w) + heads["b"].astype(h.dtype)
    x = h[..., None, :] + jax.nn.silu(z)
    return lm_head(target_config, target_params, x)


def as_draft(target: Model, config: MedusaConfig, heads: dict) -> Model:
    """The heads as the `draft=` argument of `decoding.generate` (config + params)."""
    check_heads(target, config, heads)
    return Model(config=config, params=heads, tokenizer=target.tokenizer, source=f"medusa[{config.num_heads}]")


def check_heads(target: Model, config: MedusaConfig, heads: dict) -> None:
    """Refuse heads whose sizes or target fingerprint do not match `target`."""
    c = target.config
    if (config.hidden_size, config.vocab_size) != (c.hidden_size, c.vocab_size):
        raise HeadMismatch(
            f"Medusa heads for hidden size {config.hidden_size} / vocab {config.vocab_size} cannot read a target "
            f"with hidden size {c.hidden_size} / vocab {c.vocab_size}: train heads for this target "
            "(distill.MedusaRecipe).")
    want = target_identity(c, target.params)
    if config.target and config.target != want:
        raise HeadMismatch(f"these Medusa heads were trained for target {config.target!r}, not {want!r}: load the "
                           "target they were trained for, or train heads for this one.")
    shapes = {"w": (config.num_heads, c.hidden_size, c.hidden_size), "b": (config.num_heads, c.hidden_size)}
    got = {k: tuple(np.shape(v)) for k, v in heads.items()}
    if got != shapes:
        raise HeadMismatch(f"Medusa head parameters have shapes {got}, expected {shapes}.")


def write_head_file(path: str | os.PathLike, fmt: str, config, params: dict) -> Path:
    """One small safetensors file: every leaf of `params` (nested dicts, keys joined by "/") in
    bf16 (integer leaves, e.g. token maps, as int32), with `fmt` and the config (a dataclass) in
    the metadata."""
    import ml_dtypes
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    def stored(v):
        v = np.asarray(jax.device_get(v))
        return v.astype(np.int32) if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32).astype(ml_dtypes.bfloat16)

    tensors = {"/".join(str(getattr(k, "key", k)) for k in keys): stored(v) for keys, v in flat}
    save_file(tensors, str(path), metadata={"format": fmt, "config": json.dumps(dataclasses.asdict(config))})
    return path


def read_head_file(path: str | os.PathLike, fmt: str, dtype) -> tuple[dict, dict]:
    """(config fields, nested params in `dtype`, integer leaves as stored) of a file written by
    `write_head_file` as `fmt`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no head file at {path} (write one with the head's save function).")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise HeadMismatch(f"{path} is not a {fmt} file (its format is {meta.get('format')!r}).")
        params: dict = {}
        for name in f.keys():
            *outer, leaf = name.split("/")
            node = params
            for k in outer:
                node = node.setdefault(k, {})
            t = f.get_tensor(name)
            node[leaf] = jnp.asarray(t) if np.issubdtype(t.dtype, np.integer) else jnp.asarray(np.asarray(t, np.float32), dtype)
    return json.loads(meta["config"]), params


def save_heads(path: str | os.PathLike, config: MedusaConfig, heads: dict) -> Path:
    """Write the heads as one small safetensors file (bf16) with the config and target identity."""
    return write_head_file(path, FORMAT, config, heads)


def load_heads(path: str | os.PathLike, target: Model, dtype=None) -> Model:
    """Read a head file written by `save_heads` for `target` -> the `draft=` Model (`as_draft`).
    dtype: the parameters' dtype (default: the target's)."""
    fields, heads = read_head_file(path, FORMAT, dtype or target.params["embed"].dtype)
    return as_draft(target, MedusaConfig(**fields), heads)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MedusaState:
    """hidden: [B, D] the target's residual stream after its last layer at the last position
    it processed (the token before the root)."""

    hidden: jax.Array


@dataclasses.dataclass(frozen=True)
class Medusa:
    """The Medusa proposer: pass the heads as `draft=` (`as_draft`, `load_heads`).

    sampled_siblings: at temperature > 0, the children of every depth-d node are draws without
    replacement from head d's processed distribution, verified by recursive rejection
    (`decoding.tree`), instead of head d's top-k: in a static `TreeTopology` one draw tuple per
    depth, shared by every parent (as Medusa shares its top-k); in a `DynamicTree` one per
    frontier node (`expand_and_rerank`'s sampler)."""

    sampled_siblings: bool = False

    name = "medusa"

    def target_hidden_layers(self, ctx) -> tuple[int, ...]:
        return (ctx.target.num_layers,)

    def validate(self, ctx, draft, shape):
        if draft is None or not isinstance(ctx.draft, MedusaConfig):
            raise ValueError("Medusa needs its heads as the draft: generate(target, prompts, strategy=..., "
                             "draft=drafting.medusa.load_heads(path, target)) (or medusa.as_draft(...)).")
        if (ctx.draft.hidden_size, ctx.draft.vocab_size) != (ctx.target.hidden_size, ctx.target.vocab_size):
            raise HeadMismatch(f"Medusa heads for hidden size {ctx.draft.hidden_size} / vocab {ctx.draft.vocab_size} "
                               f"cannot read this target (hidden size {ctx.target.hidden_size} / vocab "
                               f"{ctx.target.vocab_size}).")
        if not (shape.is_chain or isinstance(shape, (TreeTopology, DynamicTree))):
            raise TypeError(f"Medusa drafts chains, drafting.TreeTopology and drafting.DynamicTree, not {shape!r}.")
        if shape.max_depth > ctx.draft.num_heads:
            raise ValueError(f"Medusa with {ctx.draft.num_heads} heads drafts at most {ctx.draft.num_heads} tokens "
                             f"deep; the draft shape is {shape.max_depth} deep: lower gamma / the tree depth or "
                             "train more heads.")
        if isinstance(shape, DynamicTree) and shape.top_k > ctx.target.vocab_size:
            raise ValueError(f"DynamicTree top_k={shape.top_k} exceeds the vocabulary ({ctx.target.vocab_size}).")

    def slack(self, shape) -> int:
        return 0  # the heads write nothing into the target cache

    def init(self, ctx, params, prompt, lengths, cache, hidden=None):
        if hidden is None:
            raise ValueError("Medusa.init needs the prefill's hidden states (hidden=); run it through "
                             "decoding.Speculative / decoding.TreeDecoding, which pass them.")
        last = hidden[ctx.target.num_layers]  # [B, P, D]
        h = jnp.take_along_axis(last, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return MedusaState(h), cache

    # -- propose -------------------------------------------------------------------------------
    def propose(self, ctx, params, dstate, view, shape, limit, key):
        logits = head_logits(ctx.target, params["target"], params["draft"], dstate.hidden)  # [B, k, V]
        tree = draft_from_position_logits(ctx, logits, view.root, shape, limit, key, self.name,
                                          sampled_siblings=self.sampled_siblings)
        return tree, dstate, view.cache, jnp.ones((), jnp.int32)

    # -- commit --------------------------------------------------------------------------------
    def commit(self, ctx, params, dstate, view, shape, tree, acc, running, hidden=None):
        """Keep the target's state at the last accepted node (it predicted the next root)."""
        on_path = hidden[ctx.target.num_layers]  # [B, D + 1, D], root first
        h = jnp.take_along_axis(on_path, acc.n[:, None, None], axis=1)[:, 0]
        return MedusaState(jnp.where(running[:, None], h.astype(dstate.hidden.dtype), dstate.hidden))


# -- drafting from one distribution per future position (Medusa heads, hidden-transfer maps) ----


def draft_from_position_logits(ctx, logits, root, shape, limit, key, name: str = "drafter", *,
                               sampled_siblings: bool = False):
    """A `TreeBatch` from `logits: float32[B, k, V]`, one draft distribution per future position
    (position i predicts the token at depth i + 1, whatever its parent): a chain, a static
    `TreeTopology` or a `DynamicTree` (see the module doc). `sampled_siblings`: at temperature
    > 0, tree siblings are draws without replacement instead of the top-k (`Medusa`'s doc)."""
    if shape.is_chain:
        return draft_chain(ctx, logits, root, shape, limit, key)
    if isinstance(shape, TreeTopology):
        return draft_static_tree(ctx, logits, root, shape, key, sampled_siblings)
    if isinstance(shape, DynamicTree):
        return draft_dynamic_tree(logits, root, shape, sibling_sampler(ctx, key, shape, sampled_siblings))
    raise TypeError(f"{name} cannot draft shape {shape!r}")


def draft_chain(ctx, logits, root, shape, limit, key):
    """Position i's top-1 (greedy) or a sample from its processed distribution (the verifier's
    q, exact for lossless sampled acceptance), for i < gamma."""
    g = shape.gamma
    heads = logits[:, :g]  # [B, G, V]
    if ctx.sampling.is_greedy:
        drafts, qs = jnp.argmax(heads, axis=-1).astype(jnp.int32), None
    else:
        qs = ctx.sampling.logprobs(heads)
        drafts = jax.random.categorical(key, qs, axis=-1).astype(jnp.int32)
    keep = jnp.arange(g)[None, :] < limit[:, None]
    if shape.confidence is not None:
        top1 = jnp.max(jax.nn.softmax(heads.astype(jnp.float32), axis=-1), axis=-1)
        keep = keep & (top1 >= shape.confidence)
    n_prop = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    drafts = jnp.where(jnp.arange(g)[None, :] < n_prop[:, None], drafts, 0)
    return chain_batch(root, drafts, n_prop, qs)


def draft_static_tree(ctx, logits, root, topo: TreeTopology, key, sampled_siblings: bool = False):
    """Node of rank r at depth d: position d - 1's r-th most likely token (deterministic
    siblings: the verifier's one-hot rule), or with `sampled_siblings` its r-th draw without
    replacement (`drafting.shapes.place_siblings`; one draw tuple per depth, shared by every
    parent)."""
    b = root.shape[0]
    top, lp, ok = choose_siblings(ctx, key, 0, logits[:, : topo.max_depth], topo.max_rank,
                                  sampled_siblings)  # [B, depth, K], [B, depth, V]
    tokens = jnp.zeros((b, topo.num_nodes), jnp.int32).at[:, 0].set(root)
    valid, qs = jnp.ones((b, topo.num_nodes), bool), None
    parents = np.array([0])
    for level, (first, count) in enumerate(topo.levels):
        p = len(parents)
        sib = jnp.broadcast_to(top[:, level, None], (b, p, top.shape[-1]))
        sib_ok = jnp.broadcast_to(ok[:, level, None], (b, p, ok.shape[-1]))
        law = None if lp is None else jnp.broadcast_to(lp[:, level, None], (b, p, lp.shape[-1]))
        tokens, valid, qs = place_siblings(topo, level, parents, sib, sib_ok, law, tokens, valid, qs)
        parents = np.arange(first, first + count)
    return topology_batch(topo, tokens, valid, qs)


def draft_dynamic_tree(logits, root, shape: DynamicTree, choose=None):
    """EAGLE-2's search with position d's distribution at every depth-d node (`choose`: the
    sibling sampler of `drafting.proposer.sibling_sampler`, None for the top-k)."""
    def score(carry, frontier: Frontier):
        head = logits[:, frontier.depth]  # children of depth-d nodes are at depth d + 1
        return jnp.broadcast_to(head[:, None], (head.shape[0], shape.top_k, head.shape[-1])), carry

    tree, _, _ = expand_and_rerank(score, None, root, logits[:, 0], shape, choose)
    return tree
