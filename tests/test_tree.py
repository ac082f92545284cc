"""Tree verification (decoding.tree), and the tree commit into the KV cache.

- `accept_greedy` on hand-made trees and target logits: the right path and bonus, the second
  sibling when it is the match, invalid nodes never accepted.
- `accept_sampled`: with one-hot (greedy) target distributions it must reduce to
  `accept_greedy`; with real distributions the committed tokens must follow the target
  distribution exactly (chi-square, hand-made p and q), a bogus q must fail that same test, and
  lenience < 1 must follow its own (lossy) formula.
- Siblings drawn without replacement (`sibling_round`): the law of the emitted token, computed
  exactly by enumerating every ordered draw of 2-4 distinct siblings, equals the target's,
  while SpecInfer's fixed-q rule applied to the same draws does not; on a two-level tree of
  Gumbel-top-k siblings the first two committed tokens follow the target (chi-square).
- After `TreeDecoding`, the target cache at the committed slots equals a fresh prefill of the
  committed tokens (the accepted path was gathered into place by `KVCache.gather`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import Greedy, TreeDecoding
from decoding.tree import Accepted, TreeBatch, accept_greedy, accept_sampled, sibling_round
from drafting import DraftModel, DynamicTree, LayerSkip, TreeTopology, chain_batch, topology_batch
from spec_common import (DRAFTS, PROMPTS, chi_square, committed_kv_error, eos_id, fresh_cache, reference_with_eos,
                         run_state, target)

# Significance level of every distribution test: fail when p < ALPHA. The seeds are fixed, so
# each test is deterministic; under a correct implementation a given seed fails with probability
# 1e-4, while the negative controls below are off by chi-square statistics in the thousands.
ALPHA = 1e-4

PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0)]


# ------------------------------------------------------------------------------------------
# accept_greedy on hand-made trees
# ------------------------------------------------------------------------------------------

V = 10


def _logits_with_argmax(argmax: np.ndarray) -> jnp.ndarray:
    """float32[B, N, V] whose argmax at (b, i) is argmax[b, i] (others drawn lower at random)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*argmax.shape, V)).astype(np.float32)
    np.put_along_axis(x, argmax[..., None], 10.0, axis=-1)
    return jnp.asarray(x)


def _hand_made_greedy_case():
    """Rows over the PATHS tree (nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0))."""
    topo = TreeTopology(tuple(PATHS))
    tokens = np.array([[9, 1, 2, 3, 4, 5]] * 6)
    tokens[3] = [9, 6, 6, 3, 4, 5]  # duplicate siblings
    valid = np.ones((6, 6), bool)
    valid[2, 1] = False  # row 2: the matching child is invalid
    valid[5, 3] = False  # row 5: the matching grandchild is invalid
    # target argmax at each node (only the visited ones matter; 0 is no node's token)
    top = np.zeros((6, 6), np.int64)
    top[0, [0, 2, 5]] = [2, 5, 7]  # 2nd sibling, then its child, bonus 7
    top[1, [0, 1, 4]] = [1, 4, 8]  # 1st sibling, then its 2nd child, bonus 8
    top[2, 0] = 1  # only the invalid node 1 matches: nothing accepted, bonus 1
    top[3, [0, 1, 3]] = [6, 3, 2]  # duplicates: the first is taken, then node 3, bonus 2
    top[4, 0] = 8  # no match
    top[5, [0, 1]] = [1, 3]  # node 1, then only the invalid node 3 matches: bonus 3
    want = {  # row: (path, n, committed tokens)
        0: ([0, 2, 5], 2, [2, 5, 7]),
        1: ([0, 1, 4], 2, [1, 4, 8]),
        2: ([0, 0, 0], 0, [1]),
        3: ([0, 1, 3], 2, [6, 3, 2]),
        4: ([0, 0, 0], 0, [8]),
        5: ([0, 1, 0], 1, [1, 3]),
    }
    tree = topology_batch(topo, jnp.asarray(tokens), jnp.asarray(valid))
    return topo, tree, top, want


def _check_accepted(acc: Accepted, tree: TreeBatch, want: dict):
    path, n, toks = np.asarray(acc.path), np.asarray(acc.n), np.asarray(acc.tokens(tree))
    for row, (w_path, w_n, w_toks) in want.items():
        assert n[row] == w_n, f"row {row}: accepted {n[row]} candidates, want {w_n}"
        np.testing.assert_array_equal(path[row], w_path, err_msg=f"row {row} path")
        np.testing.assert_array_equal(toks[row, : w_n + 1], w_toks, err_msg=f"row {row} committed tokens")
        assert acc.bonus[row] == w_toks[-1]


def test_accept_greedy_hand_made():
    topo, tree, top, want = _hand_made_greedy_case()
    acc = jax.jit(accept_greedy, static_argnums=2)(tree, _logits_with_argmax(top), topo.max_depth)
    _check_accepted(acc, tree, want)


def test_accept_greedy_chain():
    # chain root -> 3 -> 4 -> 5 with 3 proposed; rows with 3, 2 (then a mismatch) and 1 proposed
    drafts = jnp.array([[3, 4, 5], [3, 4, 5], [3, 4, 5]])
    tree = chain_batch(jnp.array([1, 1, 1]), drafts, jnp.array([3, 3, 1]))
    top = np.array([[3, 4, 5, 6], [3, 4, 0, 9], [3, 4, 5, 6]])
    acc = accept_greedy(tree, _logits_with_argmax(top), 3)
    _check_accepted(acc, tree, {0: ([0, 1, 2, 3], 3, [3, 4, 5, 6]),
                                1: ([0, 1, 2, 0], 2, [3, 4, 0]),
                                2: ([0, 1, 0, 0], 1, [3, 4])})  # row 2: node 2 was not proposed


# ------------------------------------------------------------------------------------------
# accept_sampled
# ------------------------------------------------------------------------------------------

_accept_sampled = jax.jit(accept_sampled, static_argnums=(3, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accept_sampled_with_one_hot_target_is_greedy(seed):
    topo, tree, top, want = _hand_made_greedy_case()
    logp = Greedy().logprobs(_logits_with_argmax(top))
    _check_accepted(_accept_sampled(tree, logp, jax.random.PRNGKey(seed), topo.max_depth, 1.0), tree, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_accept_sampled_stochastic_chain_with_one_hot_target_is_greedy(seed):
    """Drafts sampled from a random q; a one-hot target makes the verdict deterministic."""
    b, g = 64, 3
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(V), size=(b, g))
    drafts = np.array([[rng.choice(V, p=q[r, i]) for i in range(g)] for r in range(b)])
    top = rng.integers(0, V, (b, g + 1))
    top[: b // 2, :g] = drafts[: b // 2]  # half the rows agree with the target all the way
    tree = chain_batch(jnp.zeros(b, jnp.int32), jnp.asarray(drafts), jnp.full((b,), g),
                       jnp.log(jnp.asarray(q, jnp.float32)))
    logits = _logits_with_argmax(top)
    greedy = accept_greedy(tree, logits, g)
    sampled = _accept_sampled(tree, Greedy().logprobs(logits), jax.random.PRNGKey(seed), g, 1.0)
    np.testing.assert_array_equal(sampled.n, greedy.n)
    np.testing.assert_array_equal(sampled.path, greedy.path)
    np.testing.assert_array_equal(sampled.bonus, greedy.bonus)
    assert np.all(np.asarray(greedy.n)[: b // 2] == g)


# Hand-made distributions over V5 = 5 tokens.
V5 = 5
P0 = np.array([0.1, 0.4, 0.2, 0.25, 0.05])
P1 = np.array([0.3, 0.1, 0.1, 0.2, 0.3])
Q = np.array([0.4, 0.1, 0.3, 0.1, 0.1])
N_UNIT = 60_000


def _stochastic_chain(key, q_true, q_told):
    """One-candidate chains whose draft is drawn from q_true while the verifier is told q_told;
    target P0 at the root and P1 after the draft."""
    drafts = jax.random.categorical(key, jnp.log(jnp.asarray(q_true, jnp.float32)), shape=(N_UNIT,))
    q_lp = jnp.broadcast_to(jnp.log(jnp.asarray(q_told, jnp.float32)), (N_UNIT, 1, V5))
    tree = chain_batch(jnp.zeros(N_UNIT, jnp.int32), drafts[:, None].astype(jnp.int32),
                       jnp.ones(N_UNIT, jnp.int32), q_lp)
    target_lp = jnp.broadcast_to(jnp.log(jnp.asarray(np.stack([P0, P1]), jnp.float32)), (N_UNIT, 2, V5))
    return tree, target_lp


def _first_tokens(acc: Accepted, tree: TreeBatch) -> tuple[np.ndarray, np.ndarray]:
    toks = np.asarray(acc.tokens(tree))
    return toks[:, 0], np.asarray(acc.n)


def test_accept_sampled_chain_follows_target():
    tree, target_lp = _stochastic_chain(jax.random.PRNGKey(1), Q, Q)
    acc = _accept_sampled(tree, target_lp, jax.random.PRNGKey(2), 1, 1.0)
    first, n = _first_tokens(acc, tree)
    res = chi_square(first, P0)
    assert res["p"] > ALPHA, f"first token does not follow the target: {res}"
    # after an accepted draft, the bonus token is drawn from the next target distribution
    # acceptance rate a = sum_x min(p(x), q(x)) (Leviathan et al. 2023), within 5 sigma
    a = np.minimum(P0, Q).sum()
    assert abs((n == 1).mean() - a) < 5 * np.sqrt(a * (1 - a) / N_UNIT)
    bonus = np.asarray(acc.bonus)[n == 1]
    res = chi_square(bonus, P1)
    assert res["p"] > ALPHA, f"bonus token after acceptance does not follow P1: {res}"


def test_accept_sampled_bogus_q_fails_the_same_test():
    """Negative control: the verifier is told the wrong q (uniform); the test must catch it."""
    tree, target_lp = _stochastic_chain(jax.random.PRNGKey(1), Q, np.full(V5, 1 / V5))
    acc = _accept_sampled(tree, target_lp, jax.random.PRNGKey(2), 1, 1.0)
    res = chi_square(_first_tokens(acc, tree)[0], P0)
    assert res["p"] < ALPHA, f"a wrong q went unnoticed: {res}"


def test_accept_sampled_lenience_follows_its_formula():
    """lenience l < 1: accept x w.p. min(1, p/(l q)), else sample norm(max(0, p - q)) — lossy by
    design; the output must follow that mixture (and not the target)."""
    lenience = 0.5
    tree, target_lp = _stochastic_chain(jax.random.PRNGKey(3), Q, Q)
    acc = _accept_sampled(tree, target_lp, jax.random.PRNGKey(4), 1, lenience)
    first = _first_tokens(acc, tree)[0]
    accept = Q * np.minimum(1.0, P0 / (lenience * Q))
    resid = np.maximum(P0 - Q, 0.0)
    want = accept + (1.0 - accept.sum()) * resid / resid.sum()
    assert chi_square(first, want)["p"] > ALPHA
    assert chi_square(first, P0)["p"] < ALPHA


def _one_hot_tree_distribution(topo: TreeTopology, tokens: np.ndarray, dists: np.ndarray) -> dict:
    """Exact law of the committed tokens of a one-hot tree with target distribution dists[i] at
    node i: the sequence x1, x2, ... is drawn from the target walk, and it continues in the tree
    exactly while x_k equals a child's token (then that child's distribution applies)."""
    out = {}

    def walk(node, prefix, prob):
        for x in range(dists.shape[1]):
            p = prob * dists[node, x]
            if p == 0:
                continue
            kids = [int(c) for c in topo.children[node] if c >= 0 and tokens[c] == x]
            if kids:
                walk(kids[0], prefix + (x,), p)
            else:
                out[prefix + (x,)] = out.get(prefix + (x,), 0.0) + p

    walk(0, (), 1.0)
    return out


@pytest.mark.parametrize("branching, tokens", [
    ((3,), [0, 1, 1, 3]),  # duplicate siblings: the second copy must never be accepted
    ((3,), [0, 4, 0, 2]),
    ((2, 2), [0, 1, 3, 0, 2, 4, 0]),  # two levels: a child's own distribution after acceptance
])
def test_accept_sampled_one_hot_siblings_follow_target(branching, tokens):
    topo = TreeTopology.from_branching(branching)
    n = topo.num_nodes
    rng = np.random.default_rng(len(tokens))
    dists = rng.dirichlet(np.ones(V5), size=n)
    dists[0, 2] = 0.0  # a zero-probability token must never be emitted
    dists[0] /= dists[0].sum()
    tree = topology_batch(topo, jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (N_UNIT, n)))
    target_lp = jnp.broadcast_to(jnp.log(jnp.asarray(dists, jnp.float32)), (N_UNIT, n, V5))
    acc = _accept_sampled(tree, target_lp, jax.random.PRNGKey(5), topo.max_depth, 1.0)
    toks, nn = np.asarray(acc.tokens(tree)), np.asarray(acc.n)
    law = _one_hot_tree_distribution(topo, np.asarray(tokens), dists)
    cells = {seq: i for i, seq in enumerate(law)}
    observed = np.array([cells.get(tuple(toks[r, : nn[r] + 1]), -1) for r in range(N_UNIT)])
    assert (observed >= 0).all(), "a committed sequence the target walk cannot produce"
    res = chi_square(observed, np.array(list(law.values())))
    assert res["p"] > ALPHA, res
    assert nn.max() == topo.max_depth  # the deepest acceptance is exercised


# ------------------------------------------------------------------------------------------
# Siblings drawn without replacement (recursive rejection sampling)
# ------------------------------------------------------------------------------------------


def _ordered_draws(q: np.ndarray, k: int):
    """Every ordered k-tuple of distinct tokens drawn without replacement from q, with its probability."""
    def rec(prefix, left, prob):
        if len(prefix) == k:
            yield tuple(prefix), prob
            return
        z = left.sum()
        for x in np.nonzero(left > 0)[0]:
            nxt = left.copy()
            nxt[x] = 0.0
            yield from rec(prefix + [int(x)], nxt, prob * left[x] / z)

    yield from rec([], q.astype(np.float64), 1.0)


def _emitted_law(p: np.ndarray, q: np.ndarray, k: int, update_q: bool) -> np.ndarray:
    """Exact law of the token emitted at a node with k siblings drawn without replacement from q:
    sum over draws of P(draw) * (accepted sibling, or the final residual)."""
    out = np.zeros_like(p, dtype=np.float64)
    for draw, w in _ordered_draws(q, k):
        probs, qq, mass = jnp.asarray(p[None], jnp.float32), jnp.asarray(q[None], jnp.float32), w
        for x in draw:
            a, resid, q_next = sibling_round(probs, qq, jnp.asarray([x], jnp.int32))
            a = float(a[0])
            out[x] += mass * a
            mass *= 1.0 - a
            probs = resid
            if update_q:
                qq = q_next
        out += mass * np.asarray(probs[0], np.float64)
    return out


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sibling_round_without_replacement_is_exact(k, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V5) * 0.7)
    q = rng.dirichlet(np.ones(V5) * 0.7)
    p[seed % V5] = 0.0  # a token the target forbids must never be emitted
    p /= p.sum()
    law = _emitted_law(p, q, k, update_q=True)
    np.testing.assert_allclose(law, p, atol=2e-6)
    # SpecInfer's rule (q kept fixed) applied to the same draws is not the target's law
    wrong = _emitted_law(p, q, k, update_q=False)
    assert np.abs(wrong - p).sum() > 1e-2, (wrong, p)


def test_sibling_round_one_hot_is_the_without_replacement_rule_with_a_point_mass():
    rng = np.random.default_rng(7)
    p = jnp.asarray(rng.dirichlet(np.ones(V5))[None], jnp.float32)
    x = jnp.asarray([3], jnp.int32)
    a1, r1, _ = sibling_round(p, None, x)
    a2, r2, _ = sibling_round(p, jax.nn.one_hot(x, V5), x)
    np.testing.assert_allclose(a1, a2, atol=1e-7)
    np.testing.assert_allclose(r1, r2, atol=1e-7)


def _gumbel_siblings(key, q_lp: jax.Array, k: int) -> jax.Array:
    """k distinct tokens per row drawn without replacement from exp(q_lp) (Gumbel-top-k)."""
    return jax.lax.top_k(q_lp + jax.random.gumbel(key, q_lp.shape), k)[1].astype(jnp.int32)


def test_accept_sampled_siblings_without_replacement_follow_target():
    """A (3, 2) tree of siblings sampled without replacement; the target's distribution at a
    node depends only on the node's token (D[t], P0 at the root), so the first committed
    token must follow P0 and, where it was an accepted node, the next one D[x1], whatever the tree."""
    topo = TreeTopology.from_branching((3, 2))
    n, b = topo.num_nodes, N_UNIT
    rng = np.random.default_rng(11)
    d = rng.dirichlet(np.ones(V5) * 0.8, size=V5)  # target after token t
    qd = 0.5 * d + 0.5 * rng.dirichlet(np.ones(V5), size=V5)  # draft after token t
    q0 = 0.5 * P0 + 0.5 * Q
    k1, k2 = jax.random.split(jax.random.PRNGKey(8))
    first, count = topo.levels[0]
    lvl1 = _gumbel_siblings(k1, jnp.broadcast_to(jnp.log(jnp.asarray(q0, jnp.float32)), (b, V5)), 3)
    tokens = jnp.zeros((b, n), jnp.int32).at[:, first : first + count].set(lvl1)
    q_nodes = jnp.zeros((b, n, V5), jnp.float32).at[:, 0].set(jnp.log(jnp.asarray(q0, jnp.float32)))
    qd_lp = jnp.log(jnp.asarray(qd, jnp.float32))
    nf, nc = topo.levels[1]
    for i in range(first, first + count):
        q_nodes = q_nodes.at[:, i].set(qd_lp[tokens[:, i]])
        kids = [c for c in range(nf, nf + nc) if topo.parents[c] == i]
        draw = _gumbel_siblings(jax.random.fold_in(k2, i), q_nodes[:, i], len(kids))
        tokens = tokens.at[:, np.array(kids)].set(draw)
    tree = topology_batch(topo, tokens, q_logprobs=q_nodes)
    target = jnp.concatenate([jnp.broadcast_to(jnp.log(jnp.asarray(P0, jnp.float32)), (b, 1, V5)),
                              jnp.log(jnp.asarray(d, jnp.float32))[tokens[:, 1:]]], axis=1)
    acc = _accept_sampled(tree, target, jax.random.PRNGKey(9), topo.max_depth, 1.0)
    toks, nn = np.asarray(acc.tokens(tree)), np.asarray(acc.n)
    assert (nn == 2).any() and (nn == 0).any() and (nn == 1).any()
    accepted_second = np.asarray(acc.path)[:, 1]
    ranks = topo.rank[accepted_second[nn >= 1]]
    assert (ranks >= 1).any(), "no second sibling was ever accepted: the multi-sibling rule was not exercised"
    res = chi_square(toks[:, 0], P0)
    assert res["impossible"] == 0 and res["p"] > ALPHA, res
    for t in range(V5):  # after an accepted first token t, the next token follows D[t]
        rows = (nn >= 1) & (toks[:, 0] == t)
        if rows.sum() >= 500:
            res = chi_square(toks[rows, 1], d[t])
            assert res["impossible"] == 0 and res["p"] > ALPHA / V5, (t, res)


# ------------------------------------------------------------------------------------------
# Tree commit: the accepted path is gathered into contiguous cache slots
# ------------------------------------------------------------------------------------------

TREE_COMMIT_CASES = {
    "static-draftmodel": (TreeDecoding(DraftModel(), tree=TreeTopology.from_branching((3, 2, 1))), "noisy"),
    "dynamic-draftmodel": (TreeDecoding(DraftModel(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)), "noisy"),
    "static-layerskip": (TreeDecoding(LayerSkip(layers=2), tree=TreeTopology(tuple(PATHS) + ((0, 0, 0),))), None),
}


@pytest.mark.parametrize("case", list(TREE_COMMIT_CASES))
def test_tree_commit_matches_fresh_prefill(case):
    strategy, draft = TREE_COMMIT_CASES[case]
    model = target()
    eos = eos_id()
    result, state = run_state(model, PROMPTS, strategy, draft=DRAFTS[draft]() if draft else None, eos=(eos,))
    assert result.tokens == reference_with_eos(eos)
    hist = np.asarray(state.accept_hist)
    assert hist[2:].sum() > 0, "no path of depth >= 2 was accepted: the gather was not exercised"
    lengths = np.asarray(state.cache.lengths)
    context = np.asarray(state.context)
    # The cache holds every committed token but the root (the last one, not yet processed);
    # the context may run past the output where a stop cut the last round short.
    np.testing.assert_array_equal(np.asarray(state.context_len), lengths + 1)
    for b, (p, t) in enumerate(zip(PROMPTS, result.tokens)):
        assert lengths[b] >= len(p) + len(t) - 1
        np.testing.assert_array_equal(context[b, : len(p) + len(t)], p + t)
    ref = fresh_cache(model, context, lengths)
    err = committed_kv_error(state.cache, ref, lengths)
    # float32 reordering gives <= 8e-6 (relative to 1 + |entry|); a misplaced slot gives O(1)
    assert err < 2e-5, f"committed KV entries differ from a fresh prefill by {err}"
