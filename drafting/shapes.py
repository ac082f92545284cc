"""Draft shapes, and the `TreeBatch` a drafter builds from its tokens for each shape.

A draft shape says what a drafter proposes each round; the verifier (`decoding.speculative`)
reads it only through `num_nodes` (root included), `max_depth`, `max_children` and `is_chain`:
- `Chain(gamma)`: up to gamma tokens in a line (Leviathan et al. 2023; Chen et al. 2023);
  verified with the causal mask, committed by moving the cache cursor.
- `TreeTopology`: a static tree given Medusa-style as index paths (Cai et al. 2024), turned
  once, on the host, into numpy buffers (parents, depth, ancestor mask, children, levels,
  root-to-leaf retrieve paths).
- `DynamicTree`: an EAGLE-2 tree (Li et al. 2024), grown per row by `drafting.tree_search`.
`chain_batch` and `topology_batch` fill a `decoding.TreeBatch` (node 0 = the root, the last
committed token) from a drafter's tokens.

Legend: B batch, N nodes (root included), K max children per node, G gamma, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoding.tree import TreeBatch


@dataclasses.dataclass(frozen=True)
class Chain:
    """Draft shape: a chain of up to `gamma` tokens (per-row `limit` may be smaller)."""

    gamma: int
    confidence: float | None = None  # stop drafting a row when top-1 draft prob < this

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"Chain needs gamma >= 1, got {self.gamma}.")
        if self.confidence is not None and not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"Chain confidence must be in [0, 1), got {self.confidence}.")

    is_chain = True
    max_children = 1

    @property
    def num_nodes(self) -> int:
        return self.gamma + 1

    @property
    def max_depth(self) -> int:
        return self.gamma


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """Draft shape: an EAGLE-2 dynamic tree.

    From the root, for `depth` steps, expand each of the `top_k` frontier nodes by its `top_k`
    best children, scored by cumulative draft log-probability; keep the global `top_k` as the
    next frontier; finally keep the `total_tokens` best nodes of everything expanded
    (`drafting.tree_search.expand_and_rerank`).
    """

    depth: int = 6
    top_k: int = 10
    total_tokens: int = 60

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 1:
            raise ValueError(f"DynamicTree needs depth, top_k, total_tokens >= 1, got {self}.")
        pool = self.top_k + (self.depth - 1) * self.top_k**2
        if self.total_tokens > pool:
            raise ValueError(
                f"total_tokens={self.total_tokens} exceeds the {pool} nodes that depth={self.depth}, "
                f"top_k={self.top_k} can expand; lower total_tokens or raise depth/top_k."
            )

    is_chain = False

    @property
    def num_nodes(self) -> int:
        return self.total_tokens + 1

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def max_children(self) -> int:
        return self.top_k


class TreeError(ValueError):
    """An invalid tree specification."""


@dataclasses.dataclass(frozen=True)
class TreeTopology:
    """A static tree, given Medusa-style as index paths (host side, hashable).

    Each path is a tuple of child ranks from the root: `(0,)` is the root's best child,
    `(0, 1)` that child's second-best child. The set must be prefix-closed (every path's parent
    path is present). All buffers are numpy arrays computed once.
    """

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(tuple(int(i) for i in p) for p in self.paths)
        if not paths:
            raise TreeError("a tree needs at least one path, e.g. TreeTopology(((0,),)).")
        seen = set()
        for p in paths:
            if not p:
                raise TreeError("empty path in the tree: the root is implicit; list only candidate paths.")
            if any(i < 0 for i in p):
                raise TreeError(f"path {p} has a negative child rank; ranks count from 0 (the best child).")
            if p in seen:
                raise TreeError(f"path {p} appears twice in the tree.")
            seen.add(p)
        for p in paths:
            if len(p) > 1 and p[:-1] not in seen:
                raise TreeError(f"path {p} needs its parent path {p[:-1]} in the tree (paths must be prefix-closed).")
        object.__setattr__(self, "paths", tuple(sorted(paths, key=lambda p: (len(p), p))))

    @classmethod
    def chain(cls, length: int) -> "TreeTopology":
        """A single path of `length` candidates (plain speculative decoding)."""
        if length < 1:
            raise TreeError(f"a chain needs length >= 1, got {length}.")
        return cls(tuple((0,) * d for d in range(1, length + 1)))

    @classmethod
    def from_branching(cls, branching) -> "TreeTopology":
        """Full tree with `branching[d]` children per node at depth d, e.g. (4, 2, 2, 1)."""
        if not branching or any(int(b) < 1 for b in branching):
            raise TreeError(f"branching factors must be >= 1, got {tuple(branching)}.")
        level, paths = [()], []
        for b in branching:
            level = [p + (r,) for p in level for r in range(int(b))]
            paths.extend(level)
        return cls(tuple(paths))

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    is_chain = False  # even TreeTopology.chain(n): verified with its tree mask, committed by gather

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def max_children(self) -> int:
        return int(self.children.shape[1])

    @functools.cached_property
    def _index(self) -> dict:
        return {p: i + 1 for i, p in enumerate(self.paths)}

    @functools.cached_property
    def parents(self) -> np.ndarray:
        """int32[N]; -1 for the root."""
        idx = self._index
        return np.array([-1] + [idx[p[:-1]] if len(p) > 1 else 0 for p in self.paths], np.int32)

    @functools.cached_property
    def depth(self) -> np.ndarray:
        return np.array([0] + [len(p) for p in self.paths], np.int32)

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """Child rank of each node at its parent (root: 0)."""
        return np.array([0] + [p[-1] for p in self.paths], np.int32)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """bool[N, N]: mask[i, j] iff j is i or an ancestor of i."""
        return ancestor_mask(self.parents[None])[0]

    @functools.cached_property
    def children(self) -> np.ndarray:
        """int32[N, K] children of each node in rank order, -1 padded (K >= 1)."""
        return children_table(self.parents[None], self.rank[None])[0]

    @functools.cached_property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """(first node, count) of each depth >= 1; nodes of one depth are contiguous."""
        out = []
        for d in range(1, self.max_depth + 1):
            ids = np.nonzero(self.depth == d)[0]
            out.append((int(ids[0]), int(len(ids))))
        return tuple(out)

    @functools.cached_property
    def max_rank(self) -> int:
        return int(self.rank.max()) + 1

    def retrieve_paths(self) -> np.ndarray:
        """int32[leaves, D+1]: node ids from the root to each leaf, -1 padded."""
        leaves = [i for i in range(self.num_nodes) if i not in set(self.parents.tolist())]
        out = np.full((len(leaves), self.max_depth + 1), -1, np.int32)
        for r, leaf in enumerate(leaves):
            path, node = [], leaf
            while node >= 0:
                path.append(node)
                node = self.parents[node]
            out[r, : len(path)] = path[::-1]
        return out


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """bool[B, N, N] from `parents: int[B, N]` (-1 root, parents before children)."""
    b, n = parents.shape
    m = np.zeros((b, n, n), bool)
    for i in range(n):
        m[:, i, i] = True
        p = parents[:, i]
        for r in range(b):
            if p[r] >= 0:
                m[r, i] |= m[r, p[r]]
    return m


def children_table(parents: np.ndarray, order: np.ndarray) -> np.ndarray:
    """int32[B, N, K] children of each node sorted by `order` (lower first), -1 padded."""
    b, n = parents.shape
    k = 1
    for r in range(b):
        counts = np.bincount(parents[r][parents[r] >= 0], minlength=n)
        k = max(k, int(counts.max()) if counts.size else 1)
    out = np.full((b, n, k), -1, np.int32)
    for r in range(b):
        for i in range(n):
            kids = [j for j in range(n) if parents[r, j] == i]
            kids.sort(key=lambda j: order[r, j])
            out[r, i, : len(kids)] = kids
    return out


def chain_batch(root: jax.Array, drafts: jax.Array, n_proposed: jax.Array, q_logprobs=None) -> TreeBatch:
    """The chain root -> drafts[:, 0] -> ... as a TreeBatch. drafts: int32[B, G]; n_proposed: int32[B]."""
    b, g = drafts.shape
    n = g + 1
    idx = jnp.arange(n, dtype=jnp.int32)
    tokens = jnp.concatenate([root[:, None], drafts], axis=1).astype(jnp.int32)
    valid = idx[None, :] <= n_proposed[:, None]
    nxt = idx + 1
    children = jnp.where((nxt[None, :] <= n_proposed[:, None]), nxt[None, :], -1)[..., None]
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (b, n, n))
    if q_logprobs is not None:  # q at node i is the distribution node i+1 was drawn from
        pad = jnp.zeros_like(q_logprobs[:, :1])
        q_logprobs = jnp.concatenate([q_logprobs, pad], axis=1)
    return TreeBatch(tokens=tokens, depth=jnp.broadcast_to(idx, (b, n)), mask=mask,
                     children=children.astype(jnp.int32), valid=valid, q_logprobs=q_logprobs)


def topology_batch(topology: TreeTopology, tokens: jax.Array, valid: jax.Array | None = None,
                   q_logprobs: jax.Array | None = None) -> TreeBatch:
    """A TreeBatch for a static topology filled with `tokens: int32[B, N]`: deterministic
    siblings, or, with `q_logprobs: float32[B, N, V]` (the draft law at each node), siblings
    drawn from it without replacement in rank order."""
    b = tokens.shape[0]
    bc = lambda a: jnp.broadcast_to(jnp.asarray(a), (b, *np.shape(a)))  # noqa: E731
    return TreeBatch(tokens=tokens.astype(jnp.int32), depth=bc(topology.depth), mask=bc(topology.mask),
                     children=bc(topology.children), valid=bc(np.ones(topology.num_nodes, bool)) if valid is None else valid,
                     q_logprobs=q_logprobs)


def place_siblings(topology: TreeTopology, level: int, parent_ids: np.ndarray, siblings: jax.Array, ok: jax.Array,
                   lp: jax.Array | None, tokens: jax.Array, valid: jax.Array, q_logprobs: jax.Array | None):
    """Fill the nodes of depth `level + 1` of a static tree from their parents' siblings.

    parent_ids: the node ids of depth `level` (contiguous, sorted); siblings: int32[B, P, K]
    and ok: bool[B, P, K] each parent's ranked children (`drafting.proposer.choose_siblings`);
    lp: float32[B, P, V] the law they were drawn from, or None (one-hot siblings). One-hot: the
    node of rank r gets its parent's r-th sibling (Medusa's ranks). Sampled: the j-th present
    child gets the j-th draw, so the tried siblings are exactly the first draws even where the
    topology skips a rank (the verifier's q removes every earlier draw). A node is valid where
    its draw and its parent are.
    Returns (tokens int32[B, N], valid bool[B, N], q_logprobs float32[B, N, V] or None).
    """
    first, count = topology.levels[level]
    child = np.arange(first, first + count)
    par = topology.parents[child]
    local = np.searchsorted(parent_ids, par)
    if lp is None:
        rank = topology.rank[child]
    else:
        rank = np.array([list(topology.children[p]).index(c) for p, c in zip(par, child)], np.int32)
    tokens = tokens.at[:, child].set(siblings[:, local, rank])
    valid = valid.at[:, child].set(ok[:, local, rank] & valid[:, par])
    if lp is not None:
        if q_logprobs is None:
            q_logprobs = jnp.zeros((*tokens.shape, lp.shape[-1]), jnp.float32)
        q_logprobs = q_logprobs.at[:, parent_ids].set(lp)
    return tokens, valid, q_logprobs
