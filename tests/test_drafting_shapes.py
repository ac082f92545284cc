"""Draft shapes (drafting.shapes) and the EAGLE-2 search (drafting.tree_search).

- `TreeTopology` buffers on hand-made trees are checked against values worked out by hand;
  invalid topologies and shapes are refused with clear errors.
- Every shape states what the verifier reads (`num_nodes`, `max_depth`, `max_children`,
  `is_chain`), `decoding.Speculative` included (it is its own chain shape), and
  `TreeDecoding(tree=Chain(g))` decodes exactly as `Speculative(gamma=g)`.
- `expand_and_rerank` with a scorer whose next-token distribution depends on the whole path
  (through a feature threaded from parent to child, as a feature head's would) keeps exactly
  the nodes a brute-force EAGLE-2 search keeps, with their masks, depths and sibling order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import Speculative, TreeDecoding
from drafting import (Chain, DraftModel, DynamicTree, Frontier, PromptLookup, TreeError, TreeTopology,
                      expand_and_rerank)
from spec_common import DRAFTS, PROMPTS, eos_id, reference_with_eos, run_state, target

PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0)]


# ------------------------------------------------------------------------------------------
# TreeTopology
# ------------------------------------------------------------------------------------------


def test_topology_buffers_by_hand():
    t = TreeTopology(tuple(PATHS))
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0)
    assert t.num_nodes == 6 and t.max_depth == 2 and t.max_rank == 2
    np.testing.assert_array_equal(t.parents, [-1, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(t.rank, [0, 0, 1, 0, 1, 0])
    ancestors = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}}
    want = np.zeros((6, 6), bool)
    for i, anc in ancestors.items():
        want[i, list(anc)] = True
    np.testing.assert_array_equal(t.mask, want)
    np.testing.assert_array_equal(t.children, [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]])
    assert t.levels == ((1, 2), (3, 3))
    np.testing.assert_array_equal(t.retrieve_paths(), [[0, 1, 3], [0, 1, 4], [0, 2, 5]])


def test_topology_is_independent_of_path_order():
    a = TreeTopology(tuple(PATHS))
    b = TreeTopology(((1, 0), (0, 1), (1,), (0, 0), (0,)))
    assert a == b and hash(a) == hash(b)
    np.testing.assert_array_equal(a.parents, b.parents)
    np.testing.assert_array_equal(a.children, b.children)


def test_chain_topology():
    t = TreeTopology.chain(3)
    assert t.num_nodes == 4 and t.max_depth == 3 and t.max_rank == 1
    np.testing.assert_array_equal(t.parents, [-1, 0, 1, 2])
    np.testing.assert_array_equal(t.depth, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.mask, np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(t.children, [[1], [2], [3], [-1]])
    assert t.levels == ((1, 1), (2, 1), (3, 1))
    np.testing.assert_array_equal(t.retrieve_paths(), [[0, 1, 2, 3]])


def test_from_branching():
    t = TreeTopology.from_branching((2, 2))
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1))
    np.testing.assert_array_equal(t.parents, [-1, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(t.rank, [0, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(t.children, [[1, 2], [3, 4], [5, 6], [-1, -1], [-1, -1], [-1, -1], [-1, -1]])
    assert t.levels == ((1, 2), (3, 4))
    np.testing.assert_array_equal(t.retrieve_paths(), [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]])
    assert TreeTopology.from_branching((3, 2, 1)).num_nodes == 1 + 3 + 6 + 6


@pytest.mark.parametrize("paths, message", [
    ((), "at least one path"),
    (((0,), ()), "empty path"),
    (((0,), (1, 0)), r"needs its parent path \(1,\)"),
    (((0,), (0, 0, 0)), r"needs its parent path \(0, 0\)"),
    (((0,), (1,), (0,)), r"\(0,\) appears twice"),
    (((0,), (-1,)), "negative child rank"),
])
def test_invalid_topologies(paths, message):
    with pytest.raises(TreeError, match=message):
        TreeTopology(paths)


def test_invalid_shapes():
    assert issubclass(TreeError, ValueError)
    with pytest.raises(TreeError, match="length >= 1"):
        TreeTopology.chain(0)
    with pytest.raises(TreeError, match="branching factors must be >= 1"):
        TreeTopology.from_branching((2, 0))
    with pytest.raises(TreeError, match="branching factors must be >= 1"):
        TreeTopology.from_branching(())
    with pytest.raises(TypeError, match="TreeDecoding needs tree=: a draft shape such as drafting.DynamicTree"):
        TreeDecoding(DraftModel())
    with pytest.raises(TypeError, match="tree must be a drafting.TreeTopology"):
        TreeDecoding(DraftModel(), tree="bad")
    with pytest.raises(TypeError, match="got list"):
        TreeDecoding(DraftModel(), tree=[(0,), (1,)])
    with pytest.raises(ValueError, match="total_tokens=13 exceeds the 12 nodes"):
        DynamicTree(depth=2, top_k=3, total_tokens=13)
    assert DynamicTree(depth=2, top_k=3, total_tokens=12).num_nodes == 13  # the boundary is allowed
    with pytest.raises(ValueError, match=">= 1"):
        DynamicTree(depth=0)
    with pytest.raises(ValueError, match="Chain needs gamma >= 1, got 0"):
        Chain(0)
    with pytest.raises(ValueError, match=r"Chain confidence must be in \[0, 1\)"):
        Chain(2, confidence=1.0)


# ------------------------------------------------------------------------------------------
# What the verifier reads of a shape
# ------------------------------------------------------------------------------------------


def test_every_shape_states_what_the_verifier_reads():
    irregular = TreeTopology(tuple(PATHS) + ((0, 0, 0),))
    for shape, want in ((Chain(4), (5, 4, 1, True)),
                        (Speculative(DraftModel(), gamma=3), (4, 3, 1, True)),
                        (TreeTopology.chain(3), (4, 3, 1, False)),
                        (TreeTopology.from_branching((3, 2)), (10, 2, 3, False)),
                        (irregular, (7, 3, 2, False)),
                        (DynamicTree(depth=3, top_k=4, total_tokens=20), (21, 3, 4, False))):
        got = (shape.num_nodes, shape.max_depth, shape.max_children, shape.is_chain)
        assert got == want, (shape, got)
    spec = Speculative(PromptLookup(), gamma=5, confidence=0.5)
    assert spec.shape is spec and (spec.gamma, spec.confidence) == (5, 0.5)


def test_tree_decoding_of_a_chain_is_speculative_decoding():
    """`TreeDecoding(tree=Chain(g))` drafts and verifies the chain `Speculative(gamma=g)` does
    (causal mask, cursor commit): the same tokens, rounds and acceptance."""
    eos = eos_id()
    draft = DRAFTS["noisy"]()
    chain, chain_state = run_state(target(), PROMPTS, TreeDecoding(DraftModel(), tree=Chain(3)), draft=draft,
                                   eos=(eos,))
    spec, spec_state = run_state(target(), PROMPTS, Speculative(DraftModel(), gamma=3), draft=draft, eos=(eos,))
    assert chain.tokens == spec.tokens == reference_with_eos(eos)
    np.testing.assert_array_equal(np.asarray(chain_state.accept_hist), np.asarray(spec_state.accept_hist))
    assert int(chain_state.rounds) == int(spec_state.rounds)


# ------------------------------------------------------------------------------------------
# The EAGLE-2 search over a scorer that threads a per-node feature
# ------------------------------------------------------------------------------------------

M, V = 97, 16  # feature values, vocabulary


def _feature(parent, token):
    return (parent * 31 + token + 7) % M


def _top(logp, k):
    order = np.argsort(-logp, kind="stable")[:k]
    return [(int(t), logp[t]) for t in order]


def _brute_force(table, root_feat, root_logp, k, depth, total):
    """EAGLE-2 by enumeration: {token path: cumulative score} of the `total` best nodes."""
    pool = [((t,), lp, _feature(root_feat, t)) for t, lp in _top(root_logp, k)]
    frontier = list(pool)
    for _ in range(depth - 1):
        children = [(path + (t,), np.float32(score + lp), _feature(feat, t))
                    for path, score, feat in frontier for t, lp in _top(table[feat], k)]
        pool += children
        frontier = sorted(children, key=lambda c: -c[1])[:k]
    kept = sorted(range(len(pool)), key=lambda i: -pool[i][1])[:total]
    return {pool[i][0]: pool[i][1] for i in kept}


def test_expand_and_rerank_keeps_the_brute_force_eagle2_tree():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(M, V)).astype(np.float32) * 3
    table = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    root_feat = np.array([5, 60], np.int32)
    shape = DynamicTree(depth=3, top_k=3, total_tokens=10)
    calls = []

    def score(feats, frontier: Frontier):
        """An EAGLE-like head: each node's feature comes from its parent's and its own token."""
        assert frontier.tokens.shape == (2, 3) and frontier.visible.shape == (2, 3, 6)
        assert frontier.slot == (frontier.depth - 1) * 3
        parent = jnp.where(frontier.parent < 0, root_feat[:, None],
                           jnp.take_along_axis(feats, jnp.maximum(frontier.parent, 0), axis=1))
        feat = _feature(parent, frontier.tokens)
        calls.append(frontier.depth)
        return jnp.asarray(logits)[feat], feat

    root = jnp.array([11, 12], jnp.int32)
    tree, _, n = expand_and_rerank(score, jnp.zeros((2, 3), jnp.int32), root, jnp.asarray(logits)[root_feat], shape)
    assert n == 2 and calls == [1, 2]
    tokens, depth, mask = np.asarray(tree.tokens), np.asarray(tree.depth), np.asarray(tree.mask)
    children, valid = np.asarray(tree.children), np.asarray(tree.valid)
    assert tokens.shape == (2, shape.num_nodes) and valid.all() and children.shape[2] == shape.top_k
    for r in range(2):
        want = _brute_force(table, int(root_feat[r]), table[root_feat[r]], 3, 3, 10)
        assert tokens[r, 0] == root[r]
        paths = {}
        for i in range(1, shape.num_nodes):
            anc = [j for j in range(1, i + 1) if mask[r, i, j]]
            assert mask[r, i, 0] and len(anc) == depth[r, i]
            paths[tuple(int(tokens[r, j]) for j in anc)] = i
        assert set(paths) == set(want), r
        for path, i in paths.items():  # siblings in score order
            kids = [int(c) for c in children[r, i] if c >= 0]
            kid_scores = [want[path + (int(tokens[r, c]),)] for c in kids]
            assert kid_scores == sorted(kid_scores, reverse=True)
