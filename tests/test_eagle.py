"""The EAGLE-3-style head (drafting/eagle.py) in chains, static trees and the dynamic tree.

The test head is built to agree with the target part of the time: it fuses the target's last
layer only (`fc` selects it), passes it through the pair map (`w_in`), a decoder layer whose
output projections are small and the target's final norm, plus noise on every weight; so it
repeats the target's next-token guess (accepted on the repetitive row, rejected elsewhere).

- Greedy chain and dynamic-tree outputs equal greedy autoregressive outputs token for token on
  the ragged batch, with rounds that accept and rounds that reject.
- The head's KV cache after every round equals the head run from scratch over the committed
  context (target features recomputed by one full forward), for every slot below its cursor,
  and the cursor plus the pending pairs is the target cache's length (accepted and rejected
  branches alike).
- Sampled chains (q = the head's processed distribution), static trees (top-k siblings, or
  siblings sampled without replacement, where later siblings are accepted too) and dynamic
  trees (one-hot top-k siblings) follow the target's law (chi-square); refusals are clear errors.
- Tree nodes are among the top-k of their path recomputed sequentially (static: exactly their
  rank); head files round-trip in bf16.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from decoding import Model, Sampling, Speculative, TreeDecoding, generate, generation
from decoding.model import forward
from drafting import DynamicTree, TreeTopology, eagle
from spec_common import (MAX_NEW, PROMPTS, SAMPLE_K, SAMPLE_N, SAMPLE_SEED, SMALL_V_PROMPT, chi_square,
                         continuation_index, exact_continuations, greedy_reference, run_state, small_v_target, target)


def agreeing_head(model: Model, seed: int = 0, noise: float = 0.05) -> Model:
    c = model.config
    d, nl = c.hidden_size, c.num_layers
    cfg = eagle.config_for(model, (1, max(nl // 2, 1), nl))
    head = eagle.init_head(c, jax.random.PRNGKey(seed), scale=noise)
    eye = jnp.eye(d)
    head["fc"] = head["fc"].at[2 * d:].add(eye)
    head["w_in"] = head["w_in"].at[d:].add(eye)
    head["final_norm"] = model.params["final_norm"]
    return eagle.as_draft(model, cfg, head)


@functools.cache
def greedy_head() -> Model:
    return agreeing_head(target())


IRREGULAR_TREE = TreeTopology(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))

CASES = {
    "chain": Speculative(eagle.Eagle(), gamma=3),
    "tree-static": TreeDecoding(eagle.Eagle(), tree=IRREGULAR_TREE),
    "tree-dynamic": TreeDecoding(eagle.Eagle(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_autoregressive(case):
    result, state = run_state(target(), PROMPTS, CASES[case], draft=greedy_head())
    assert [tuple(r) for r in result.tokens] == list(greedy_reference())
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[2:].sum() > 0, f"{case}: {hist}"


@functools.partial(jax.jit, static_argnums=(0, 3))
def _scratch_cache(config, params, context, layers):
    """The head's cache over every pair (feature p, token p + 1) of `context`, from scratch."""
    b, width = context.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    tcache = decoding.KVCache.init(config, b, width, jnp.float32)
    hidden = forward(config, params["target"], context, positions, tcache, return_hidden=tuple(sorted(set(layers)))).hidden
    f = eagle.fuse(params["draft"], hidden, layers)
    nxt = jnp.concatenate([context[:, 1:], jnp.zeros_like(context[:, :1])], axis=1)
    hcache = decoding.KVCache.init(eagle.layer_config(config), b, width, jnp.float32)
    _, _, hcache = eagle.head_forward(config, params["target"], params["draft"], hcache, f, nxt, positions)
    return hcache


@pytest.mark.parametrize("case", list(CASES))
def test_head_cache_matches_a_recomputation_after_every_round(case):
    m, head = target(), greedy_head()
    prep = generation.prepare(m, PROMPTS, strategy=CASES[case], max_new_tokens=MAX_NEW, eos_token_id=(),
                              draft=head, chat=False)
    s, ctx = prep.strategy, prep.ctx
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(prep.params, prep.prompt, prep.lengths, prep.key)
    step = jax.jit(lambda p, st: s.step(ctx, p, st))
    for _ in range(MAX_NEW):
        d = state.drafter
        cursor = np.asarray(d.cache.lengths)
        np.testing.assert_array_equal(cursor + np.asarray(d.n_pending), np.asarray(state.cache.lengths))
        ref = _scratch_cache(m.config, prep.params, state.context[:, :64], head.config.layers)
        for got, want in ((d.cache.k, ref.k), (d.cache.v, ref.v)):
            got, want = np.asarray(got), np.asarray(want)
            for b, n in enumerate(cursor):
                np.testing.assert_allclose(got[:, b, :, :n], want[:, b, :, :n], atol=2e-4, rtol=2e-4)
        if bool(np.all(np.asarray(state.out.done))):
            break
        state = step(prep.params, state)
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[2:].sum() > 0, hist


SAMPLED = {
    "chain": Speculative(eagle.Eagle(), gamma=2),
    "tree-static": TreeDecoding(eagle.Eagle(), tree=TreeTopology.from_branching((2, 2))),
    "tree-static-sampled-siblings": TreeDecoding(eagle.Eagle(sampled_siblings=True),
                                                 tree=TreeTopology.from_branching((3, 2))),
    "tree-dynamic": TreeDecoding(eagle.Eagle(), tree=DynamicTree(depth=2, top_k=2, total_tokens=4)),
    "tree-dynamic-sampled-siblings": TreeDecoding(eagle.Eagle(sampled_siblings=True),
                                                  tree=DynamicTree(depth=3, top_k=3, total_tokens=7)),
}


@pytest.mark.parametrize("case", list(SAMPLED))
def test_sampled_follows_the_target(case):
    model = small_v_target()
    sampling = Sampling(temperature=0.8, top_k=4)
    strategy = SAMPLED[case]
    result, state = run_state(model, [SMALL_V_PROMPT] * SAMPLE_N, strategy,
                              draft=agreeing_head(model, 3, noise=0.1), sampling=sampling, max_new_tokens=SAMPLE_K,
                              eos=(), seed=SAMPLE_SEED)
    law = exact_continuations(model, SMALL_V_PROMPT, SAMPLE_K, sampling)
    res = chi_square(continuation_index(result.tokens, model.config.vocab_size, SAMPLE_K), law)
    assert res["impossible"] == 0, res
    assert res["p"] > 1e-3, res
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[1:].sum() > 0, hist
    if "sampled-siblings" in case:  # later siblings were accepted at both depths
        ranks = np.asarray(state.rank_hist)
        assert ranks[0, 1:].sum() > 0 and ranks[1, 1:].sum() > 0, ranks


def test_refusals():
    with pytest.raises(ValueError, match="Eagle needs its head as the draft"):
        generate(target(), PROMPTS, strategy=Speculative(eagle.Eagle(), gamma=2), max_new_tokens=4)
    with pytest.raises(TypeError, match="Eagle drafts chains, drafting.TreeTopology and drafting.DynamicTree"):
        ctx = types.SimpleNamespace(target=target().config, draft=greedy_head().config)
        eagle.Eagle().validate(ctx, greedy_head(), types.SimpleNamespace(is_chain=False))
    with pytest.raises(ValueError, match="three layers in"):
        eagle.config_for(target(), (1, 2, 9))
    other = Model(target().config, jax.tree.map(lambda w: w * 1.01, target().params), source="other")
    with pytest.raises(eagle.HeadMismatch, match="trained for target"):
        eagle.as_draft(other, greedy_head().config, greedy_head().params)


@pytest.mark.parametrize("shape", [DynamicTree(depth=3, top_k=3, total_tokens=9), IRREGULAR_TREE],
                         ids=["dynamic", "static"])
def test_tree_nodes_are_top_k_of_their_parents_path(shape):
    """Each proposed node is among the top_k tokens the head gives after its parent's path
    (static trees: exactly the token of its rank), recomputed sequentially (no slot masks): the
    tree drafting shows every node its ancestors only, wherever they sit in the head cache."""
    m = target()
    # a random head whose input map is small, so attention dominates: a wrong mask changes the top-k
    hp = eagle.init_head(m.config, jax.random.PRNGKey(4), scale=0.7)
    hp["w_in"] = hp["w_in"] * 0.01
    head = eagle.as_draft(m, eagle.config_for(m, (1, 2, 3)), hp)
    strategy = TreeDecoding(eagle.Eagle(), tree=shape)
    prep = generation.prepare(m, PROMPTS, strategy=strategy, max_new_tokens=MAX_NEW, eos_token_id=(), draft=head,
                              chat=False)
    s, ctx, params = prep.strategy, prep.ctx, prep.params
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(params, prep.prompt, prep.lengths, prep.key)
    state = jax.jit(lambda p, st: s.step(ctx, p, st))(params, state)  # one round: pending pairs from a verify
    _, tree, _, _, _ = jax.jit(lambda p, st: s.propose(ctx, p, st, jax.random.PRNGKey(0)))(params, state)
    context, base = np.asarray(state.context), np.asarray(state.cache.lengths)
    tokens, mask = np.asarray(tree.tokens), np.asarray(tree.mask)
    c = m.config
    hcfg = eagle.layer_config(c)
    head_forward = jax.jit(eagle.head_forward, static_argnums=0)
    checked = 0
    for b in range(len(PROMPTS)):
        n0 = int(base[b])  # the root pair sits at n0 - 1
        row = jnp.asarray(context[b : b + 1, : n0 + 1])
        pos = jnp.arange(n0, dtype=jnp.int32)[None]
        hidden = forward(c, params["target"], row[:, :n0], pos, decoding.KVCache.init(c, 1, n0, jnp.float32),
                         return_hidden=tuple(sorted(set(head.config.layers)))).hidden
        f = eagle.fuse(params["draft"], hidden, head.config.layers)
        prefix = decoding.KVCache.init(hcfg, 1, n0 + 4, jnp.float32)
        lg0, out0, prefix = head_forward(c, params["target"], params["draft"], prefix, f, row[:, 1:], pos)
        for node in range(1, tokens.shape[1]):
            path = [i for i in range(tokens.shape[1]) if mask[b, node, i]]  # ancestors-or-self, root first
            cache = prefix.truncate(jnp.array([n0]))
            logits, h = lg0[:, -1], out0[:, -1:]
            for d, anc in enumerate(path[1:-1], start=1):
                tok = jnp.asarray([[tokens[b, anc]]], jnp.int32)
                lg, h, cache = head_forward(c, params["target"], params["draft"], cache, h, tok,
                                            jnp.array([[n0 - 1 + d]]))
                cache = cache.truncate(cache.lengths + 1)
                logits = lg[:, 0]
            order = np.argsort(-np.asarray(logits[0]), kind="stable")
            if isinstance(shape, DynamicTree):
                assert tokens[b, node] in order[: shape.top_k], (b, node, path, order)
            else:
                assert tokens[b, node] == order[shape.rank[node]], (b, node, path, order)
            checked += 1
    assert checked == len(PROMPTS) * (shape.num_nodes - 1)


def test_save_load_round_trip(tmp_path):
    head = greedy_head()
    path = eagle.save_head(tmp_path / "head.safetensors", head.config, head.params)
    loaded = eagle.load_head(path, target())
    assert loaded.config == head.config
    want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), head.params)
    got = jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.params)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    out = generate(target(), PROMPTS, strategy=CASES["chain"], draft=loaded, max_new_tokens=MAX_NEW, eos_token_id=())
    assert [tuple(r) for r in out.tokens] == list(greedy_reference())
    with pytest.raises(eagle.HeadMismatch, match="is not a decoding-eagle3-head/1 file"):
        from drafting import medusa

        eagle.load_head(medusa.save_heads(tmp_path / "m.safetensors", medusa.config_for(target(), 2),
                                          medusa.init_heads(medusa.config_for(target(), 2))), target())


# ------------------------------------------------------------------------------------------
# Reduced draft vocabulary (EAGLE-3's d2t map)
# ------------------------------------------------------------------------------------------


def reduced_head(model: Model, d2t, seed: int = 0, noise: float = 0.05) -> Model:
    """`agreeing_head` with its own lm_head over the draft vocabulary `d2t` (the target's columns)."""
    base = agreeing_head(model, seed, noise)
    cfg = eagle.config_for(model, base.config.layers, draft_vocab=len(d2t))
    params = dict(base.params, lm_head=eagle.target_head_columns(model.config, model.params, d2t),
                  d2t=jnp.asarray(d2t, jnp.int32))
    return eagle.as_draft(model, cfg, params)


@functools.cache
def greedy_d2t() -> np.ndarray:
    """The 24 tokens the greedy reference emits most: some tokens it emits fall outside, so the
    head cannot propose them and those rounds must reject."""
    counts = np.bincount(np.concatenate([np.asarray(r) for r in greedy_reference()]), minlength=64)
    d2t = eagle.reduced_vocab(counts, 24)
    assert counts[np.setdiff1d(np.arange(64), d2t)].sum() > 0
    return d2t


@pytest.mark.parametrize("case", ["tree-static", "tree-dynamic"])  # the chain: the round trip below
def test_reduced_vocabulary_greedy_equals_autoregressive(case):
    head = reduced_head(target(), greedy_d2t())
    result, state = run_state(target(), PROMPTS, CASES[case], draft=head)
    assert [tuple(r) for r in result.tokens] == list(greedy_reference())
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[2:].sum() > 0, f"{case}: {hist}"


SMALL_V_D2T = np.array([0, 2, 3, 5], np.int32)


@pytest.mark.parametrize("case", ["chain", "tree-static-sampled-siblings"])
def test_reduced_vocabulary_sampled_follows_the_target(case):
    model = small_v_target()
    sampling = Sampling(temperature=0.8, top_k=4)
    strategy = {"chain": Speculative(eagle.Eagle(), gamma=2),
                "tree-static-sampled-siblings": TreeDecoding(eagle.Eagle(sampled_siblings=True),
                                                             tree=TreeTopology.from_branching((3, 2)))}[case]
    head = reduced_head(model, SMALL_V_D2T, 3, noise=0.1)
    result, state = run_state(model, [SMALL_V_PROMPT] * SAMPLE_N, strategy, draft=head, sampling=sampling,
                              max_new_tokens=SAMPLE_K, eos=(), seed=SAMPLE_SEED)
    law = exact_continuations(model, SMALL_V_PROMPT, SAMPLE_K, sampling)
    res = chi_square(continuation_index(result.tokens, model.config.vocab_size, SAMPLE_K), law)
    assert res["impossible"] == 0, res
    assert res["p"] > 1e-3, res
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[1:].sum() > 0, hist


def test_reduced_vocabulary_proposes_draft_tokens_with_q_zero_outside():
    model = small_v_target()
    head = reduced_head(model, SMALL_V_D2T, 3, noise=0.1)
    strategy = TreeDecoding(eagle.Eagle(sampled_siblings=True), tree=TreeTopology.from_branching((3, 2)))
    prep = generation.prepare(model, [SMALL_V_PROMPT] * 64, strategy=strategy, sampling=Sampling(temperature=1.0),
                              max_new_tokens=8, eos_token_id=(), draft=head, chat=False)
    s, ctx, params = prep.strategy, prep.ctx, prep.params
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(params, prep.prompt, prep.lengths, prep.key)
    _, tree, _, _, _ = jax.jit(lambda p, st: s.propose(ctx, p, st, jax.random.PRNGKey(0)))(params, state)
    tokens, valid = np.asarray(tree.tokens)[:, 1:], np.asarray(tree.valid)[:, 1:]
    assert np.isin(tokens[valid], SMALL_V_D2T).all()
    assert valid[:, :3].all()  # three distinct draws among four draft tokens
    assert len(np.unique(tokens[:, :3], axis=0)) > 1
    outside = np.setdiff1d(np.arange(6), SMALL_V_D2T)
    q = np.exp(np.asarray(tree.q_logprobs))
    assert np.all(q[:, :4][..., outside] == 0.0)  # the root and the depth-1 nodes drew children
    np.testing.assert_allclose(q[:, :4].sum(-1), 1.0, atol=1e-5)


def test_reduced_vocabulary_save_load_round_trip(tmp_path):
    head = reduced_head(target(), greedy_d2t())
    path = eagle.save_head(tmp_path / "head.safetensors", head.config, head.params)
    loaded = eagle.load_head(path, target())
    assert loaded.config == head.config and loaded.config.draft_vocab == 24
    np.testing.assert_array_equal(np.asarray(loaded.params["d2t"]), greedy_d2t())
    assert np.asarray(loaded.params["d2t"]).dtype == np.int32
    np.testing.assert_array_equal(np.asarray(loaded.params["lm_head"], np.float32),
                                  np.asarray(jnp.asarray(head.params["lm_head"], jnp.bfloat16), np.float32))
    result, state = run_state(target(), PROMPTS, CASES["chain"], draft=loaded)
    assert [tuple(r) for r in result.tokens] == list(greedy_reference())
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[2:].sum() > 0, hist


def test_reduced_vocabulary_refusals():
    m = target()
    d2t = greedy_d2t()
    head = reduced_head(m, d2t)
    with pytest.raises(eagle.HeadMismatch, match="lack 'd2t'"):
        eagle.as_draft(m, head.config, {k: v for k, v in head.params.items() if k != "d2t"})
    with pytest.raises(eagle.HeadMismatch, match="distinct target ids"):
        eagle.as_draft(m, head.config, dict(head.params, d2t=jnp.asarray(d2t).at[0].set(99)))
    with pytest.raises(eagle.HeadMismatch, match="config has draft_vocab=0"):
        eagle.as_draft(m, greedy_head().config, head.params)
    with pytest.raises(ValueError, match="draft_vocab must be in"):
        eagle.config_for(m, draft_vocab=65)
    small = reduced_head(m, d2t[:2])
    with pytest.raises(ValueError, match="needs a draft vocabulary of at least"):
        generate(m, PROMPTS, strategy=CASES["tree-static"], draft=small, max_new_tokens=4)
    counts = np.array([5, 1, 5, 0, 9])
    np.testing.assert_array_equal(eagle.reduced_vocab(counts, 3), [0, 2, 4])  # ties to the lower id


TIED_D2T = np.arange(0, 64, 3, dtype=np.int32)  # 22 draft tokens, ascending


@functools.cache
def tied_reduced_head() -> Model:
    """`reduced_head` of the target over `TIED_D2T` whose lm_head columns come in equal pairs
    (draft ids 2i and 2i + 1 score the same), so every greedy choice is a tie of two target ids."""
    model = target()
    head = reduced_head(model, TIED_D2T)
    w = head.params["lm_head"]
    return eagle.as_draft(model, head.config, dict(head.params, lm_head=w.at[:, 1::2].set(w[:, 0::2])))


def _first_proposal(model, strategy, head):
    """The TreeBatch of `strategy`'s first greedy propose on PROMPTS (compiled unoptimised)."""
    prep = generation.prepare(model, PROMPTS, strategy=strategy, max_new_tokens=MAX_NEW,
                              eos_token_id=(), draft=head, chat=False)
    s, ctx, params = prep.strategy, prep.ctx, prep.params
    fast = {"xla_backend_optimization_level": 0}
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k), compiler_options=fast)(
        params, prep.prompt, prep.lengths, prep.key)
    _, tree, _, _, _ = jax.jit(lambda p, st: s.propose(ctx, p, st, jax.random.PRNGKey(0)), compiler_options=fast)(
        params, state)
    return tree


def test_reduced_vocabulary_argmax_over_draft_ids_is_the_scattered_argmax():
    """Ties included: the argmax over the Vd draft logits mapped through d2t (ascending) is the
    argmax over the [V] row the scatter builds (-inf outside d2t), the lowest tied target id."""
    m = target()
    head = tied_reduced_head()
    d2t = np.asarray(head.params["d2t"])
    rng = np.random.default_rng(0)
    b, t = 3, 5
    feats = jnp.asarray(rng.standard_normal((b, t, m.config.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, m.config.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hcache = decoding.KVCache.init(eagle.layer_config(m.config), b, 8, jnp.float32)
    run = jax.jit(eagle.head_forward, static_argnums=0, static_argnames="draft_ids")
    own, full = (np.asarray(run(m.config, m.params, head.params, hcache, feats, tokens, positions, draft_ids=ids)[0])
                 for ids in (True, False))
    assert own.shape == (b, t, len(d2t)) and full.shape == (b, t, m.config.vocab_size)
    pick = d2t[own.argmax(-1)]
    np.testing.assert_array_equal(pick, full.argmax(-1))
    tied = own.max(-1, keepdims=True) == own
    assert np.all(tied.sum(-1) == 2), "every row must tie two draft ids"
    assert np.all(pick == np.where(tied, d2t, np.iinfo(np.int32).max).min(-1))  # the lowest tied target id


def test_reduced_vocabulary_greedy_chain_drafts_equal_the_scatter_path():
    """The greedy chain's drafts (argmax over the Vd logits, no scatter) equal those of a
    one-child-per-level static tree, which takes the top-1 of the scattered [V] log-probabilities,
    with every choice a tie of two target ids (it must go to the lower one)."""
    m = target()
    head = tied_reduced_head()
    chain, tree = (_first_proposal(m, strategy, head) for strategy in (
        Speculative(eagle.Eagle(), gamma=3), TreeDecoding(eagle.Eagle(), tree=TreeTopology(((0,), (0, 0), (0, 0, 0))))))
    np.testing.assert_array_equal(np.asarray(chain.tokens), np.asarray(tree.tokens))
    assert np.isin(np.asarray(chain.tokens)[:, 1:], TIED_D2T[0::2]).all()  # each tie went to the lower id


def _scatters_of_size(jaxpr, v: int) -> list:
    """Every scatter equation (nested jaxprs included) whose operand's last axis has size `v`."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("scatter") and eqn.invars[0].aval.shape[-1:] == (v,):
            found.append(eqn.invars[0].aval.shape)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _scatters_of_size(sub, v)
    return found


def test_reduced_vocabulary_greedy_chain_draft_has_no_vocabulary_scatter():
    """The greedy chain's propose with a reduced vocabulary traces no scatter into a [.., V]
    operand; the sampled chain (whose q is a law over V) keeps one per draft step."""
    m = target()
    head = reduced_head(m, TIED_D2T)
    v = m.config.vocab_size
    counts = {}
    for name, sampling in (("greedy", None), ("sampled", Sampling(temperature=0.8))):
        prep = generation.prepare(m, PROMPTS, strategy=Speculative(eagle.Eagle(), gamma=3), sampling=sampling,
                                  max_new_tokens=MAX_NEW, eos_token_id=(), draft=head, chat=False)
        s, ctx, params = prep.strategy, prep.ctx, prep.params
        state = jax.eval_shape(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k), params, prep.prompt, prep.lengths,
                               prep.key)
        jaxpr = jax.make_jaxpr(lambda p, st: s.propose(ctx, p, st, jax.random.PRNGKey(0)))(params, state)
        counts[name] = _scatters_of_size(jaxpr.jaxpr, v)
    assert counts["greedy"] == [], counts
    assert len(counts["sampled"]) >= 3, counts
