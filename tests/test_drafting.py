"""Drafters (drafting/): n-gram lookup, the draft model's cache catch-up, and refusals.

- `lookup` on hand-made contexts (longest n-gram first, most recent match, continuation limited
  to the context, padding never matched, no match -> no proposal) and against a brute-force
  Python reference on random contexts.
- `DraftModel` keeps its own KV cache by feeding, at the start of each round, the committed
  tokens it has not seen: after a whole generation its cache entries below its cursor must equal
  a fresh prefill of the draft model over the same tokens, and the cursor must be at most one
  catch-up behind the context. `LayerSkip` writes into the target's cache, which must still hold
  the full model's entries for every committed token.
- Errors: a missing draft, a layer-skip depth outside the target, prompt lookup asked for a
  tree, a draft with another vocabulary or tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from decoding import (DynamicGamma, KVCache, Model, Sampling, Speculative, TreeDecoding,
                      check_same_tokenizer, generate, init_params)
from decoding import generation
from decoding.model import forward
from drafting import DraftModel, DynamicTree, LayerSkip, PromptLookup, TreeTopology, lookup
from spec_common import (DRAFTS, MAX_NEW, PROMPTS, SMALL_DRAFT_CFG, committed_kv_error, eos_id, fresh_cache,
                         reference_with_eos, run_state, sample_run, small_v_draft, target)

# ------------------------------------------------------------------------------------------
# Prompt lookup
# ------------------------------------------------------------------------------------------


def _lookup(rows, gamma, max_ngram=3, min_ngram=1, width=16, pad=0):
    """Run `lookup` on ragged rows (padded with `pad`) -> list of proposals per row."""
    ctx = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        ctx[i, : len(r)] = r
    length = np.array([len(r) for r in rows], np.int32)
    drafts, n = lookup(jnp.asarray(ctx), jnp.asarray(length), gamma, max_ngram, min_ngram)
    drafts, n = np.asarray(drafts), np.asarray(n)
    return [drafts[i, : n[i]].tolist() for i in range(len(rows))]


def test_lookup_prefers_the_longest_ngram():
    # last 3-gram (5,6,7) occurs at 0 -> (1,9,9,6); the 2-gram (6,7) and the 1-gram (7) recur later
    # and would propose (2,0,...) instead
    ctx = [5, 6, 7, 1, 9, 9, 6, 7, 2, 0, 5, 6, 7]
    assert _lookup([ctx], gamma=4) == [[1, 9, 9, 6]]
    assert _lookup([ctx], gamma=4, max_ngram=2) == [[2, 0, 5, 6]]


def test_lookup_takes_the_most_recent_match():
    assert _lookup([[3, 4, 1, 3, 4, 2, 0, 3, 4]], gamma=3, max_ngram=2) == [[2, 0, 3]]


def test_lookup_continuation_is_limited_to_the_context():
    # (3,4) last seen at 3: the continuation (2, 0, 3, 4) ends at the context's end, not gamma
    assert _lookup([[3, 4, 1, 3, 4, 2, 0, 3, 4]], gamma=6, max_ngram=2) == [[2, 0, 3, 4]]
    # overlapping match: (8, 8) at 0 -> only one token follows inside the context
    assert _lookup([[8, 8, 8]], gamma=4, max_ngram=2) == [[8]]


def test_lookup_no_match_and_min_ngram():
    assert _lookup([[1, 2, 3, 4], [7]], gamma=4) == [[], []]
    # only a 1-gram matches; with min_ngram=2 nothing is proposed
    assert _lookup([[1, 5, 2, 1]], gamma=4) == [[5, 2, 1]]
    assert _lookup([[1, 5, 2, 1]], gamma=4, min_ngram=2) == [[]]


def test_lookup_ignores_padding_past_the_length():
    # the padding repeats the last token; a match there (or a copy of it) would be wrong
    rows = [[5, 6, 5], [2, 2, 9, 1, 9]]
    assert _lookup(rows, gamma=4, pad=5) == [[6, 5], [1, 9]]
    assert _lookup(rows, gamma=4, pad=9) == [[6, 5], [1, 9]]


def _reference_lookup(ctx, gamma, max_ngram, min_ngram):
    n_ctx = len(ctx)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n_ctx < n + 1:
            continue
        suffix = ctx[n_ctx - n:]
        for s in range(n_ctx - n - 1, -1, -1):
            if ctx[s : s + n] == suffix:
                return ctx[s + n : min(s + n + gamma, n_ctx)]
    return []


def test_lookup_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 4, rng.integers(1, 15)).tolist() for _ in range(300)]
    for gamma, max_n, min_n in ((4, 3, 1), (2, 2, 2), (6, 4, 1)):
        got = _lookup(rows, gamma, max_n, min_n, pad=int(rng.integers(0, 4)))
        want = [_reference_lookup(r, gamma, max_n, min_n) for r in rows]
        assert got == want
        assert sum(map(len, want)) > 0 and any(len(w) == 0 for w in want)


# ------------------------------------------------------------------------------------------
# Draft caches after whole generations
# ------------------------------------------------------------------------------------------

# (strategy, draft) — the same programs as the greedy tests of test_speculative (compiled once)
CATCH_UP_CASES = {
    "chain-small": (Speculative(DraftModel(), gamma=4), "small"),
    "chain-noisy": (Speculative(DraftModel(), gamma=4), "noisy"),
    "chain-noisy-dynamic-confidence": (
        Speculative(DraftModel(), gamma=4, dynamic=DynamicGamma(start=2), confidence=0.3), "noisy"),
    "tree-static-noisy": (TreeDecoding(DraftModel(), tree=TreeTopology.from_branching((3, 2, 1))), "noisy"),
    "tree-dynamic-noisy": (TreeDecoding(DraftModel(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)), "noisy"),
}
# |cache - fresh| / (1 + |fresh|): float32 reordering gives <= 8e-6 here (0 for the 1-layer
# draft); a stale or misplaced entry differs by O(0.1 .. 10).
KV_ATOL = 2e-5


def _check_draft_cache(state, draft: Model, max_behind: int, rows=None):
    """The draft cache below its cursor equals a fresh prefill of the committed tokens, and the
    cursor is at most `max_behind` tokens behind the context. (Only slots below both the cursor
    and the root are compared: a row that finished keeps taking part in later rounds, and its
    slots from the root on may hold draft tokens it never committed;
    `test_draft_cursor_of_finished_rows_stays_within_the_context` checks the cursor itself.)"""
    dcache = state.drafter.cache
    dlen = np.asarray(dcache.lengths)
    context_len = np.asarray(state.context_len)
    context = np.asarray(state.context)
    if rows is not None:
        dlen, context_len, context = dlen[rows], context_len[rows], context[rows]
        dcache = dcache.select_rows(jnp.asarray(rows))
    valid = np.minimum(dlen, context_len - 1)
    behind = context_len - valid
    assert (behind <= max_behind).all(), f"draft cache behind the context by {behind}"
    ref = fresh_cache(draft, context, valid)
    err = committed_kv_error(dcache, ref, valid)
    assert err < KV_ATOL, f"draft cache differs from a fresh prefill of the committed tokens by {err}"


@pytest.mark.parametrize("case", list(CATCH_UP_CASES))
def test_draft_model_cache_catches_up(case):
    strategy, draft_name = CATCH_UP_CASES[case]
    draft = DRAFTS[draft_name]()
    eos = eos_id()
    result, state = run_state(target(), PROMPTS, strategy, draft=draft, eos=(eos,))
    assert result.tokens == reference_with_eos(eos)
    assert int(state.rounds) >= 5
    # chains re-feed at most the root and the last accepted draft; trees the accepted path + bonus
    max_behind = 2 if isinstance(strategy, Speculative) else strategy.shape.max_depth + 1
    _check_draft_cache(state, draft, max_behind)


def test_draft_cursor_of_finished_rows_stays_within_the_context():
    """A row that stopped (EOS) keeps taking part in later rounds; its draft cursor must not
    claim slots past its committed context (they hold uncommitted draft tokens)."""
    eos = eos_id()
    _, state = run_state(target(), PROMPTS, Speculative(DraftModel(), gamma=4), draft=DRAFTS["small"](), eos=(eos,))
    assert any(r[-1] == eos for r in reference_with_eos(eos))  # some rows stop early
    dlen, context_len = np.asarray(state.drafter.cache.lengths), np.asarray(state.context_len)
    assert (dlen <= context_len).all(), f"draft cursor {dlen} past the context length {context_len}"


def test_draft_model_cache_catches_up_when_sampling():
    """Sampled chains (stochastic proposals, different acceptance per row) on the V = 6 suite."""
    strategy = Speculative(DraftModel(), gamma=2)
    result, state = sample_run(strategy, True, Sampling(temperature=0.8, top_k=4))
    rows = np.arange(0, 4000, 50)
    _check_draft_cache(state, small_v_draft(), 2, rows=rows)


def test_layer_skip_leaves_the_target_cache_exact():
    """LayerSkip writes its shallow layers into the target cache for draft tokens; after
    verification and commit, every committed slot must hold the full model's entries."""
    eos = eos_id()
    model = target()
    for strategy in (Speculative(LayerSkip(layers=2), gamma=3),
                     Speculative(LayerSkip(layers=1), gamma=4, dynamic=DynamicGamma(start=1, minimum=1),
                                 confidence=0.2)):
        result, state = run_state(model, PROMPTS, strategy, eos=(eos,))
        assert result.tokens == reference_with_eos(eos)
        lengths = np.asarray(state.cache.lengths)
        np.testing.assert_array_equal(np.asarray(state.context_len), lengths + 1)
        err = committed_kv_error(state.cache, fresh_cache(model, np.asarray(state.context), lengths), lengths)
        assert err < KV_ATOL, f"{strategy}: target cache differs from a fresh prefill by {err}"


# ------------------------------------------------------------------------------------------
# Tree proposals: each node's children are the drafter's own top-k after that node
# ------------------------------------------------------------------------------------------


def _state_and_next_tree(strategy, ctx, params, prompt, lengths, key, rounds):
    state = strategy.init(ctx, params, prompt, lengths, key)
    state = jax.lax.fori_loop(0, rounds, lambda i, s: strategy.step(ctx, params, s), state)
    _, tree, _, _, _ = strategy.propose(ctx, params, state, key)
    return state, tree


_state_and_next_tree_jit = jax.jit(_state_and_next_tree, static_argnums=(0, 1, 6))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _last_logits(config, params, tokens, lengths, layers):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache.init(config, b, t, params["embed"].dtype)
    return forward(config, params, tokens, positions, cache, layers=layers,
                   logit_indices=(lengths - 1)[:, None]).logits[:, 0]


# each drafter once, each tree builder once (the other pairings share all the code checked here)
PROPOSAL_CASES = {
    "dynamic-draftmodel": (TreeDecoding(DraftModel(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)), "small"),
    "static-layerskip": (TreeDecoding(LayerSkip(layers=2), tree=TreeTopology(
        ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))), None),
}


@pytest.mark.parametrize("case", list(PROPOSAL_CASES))
def test_tree_proposals_are_the_drafters_top_k(case):
    """After a few rounds, draft a tree and recompute, for every node, the drafter's next-token
    logits from scratch (a plain causal forward over context + the node's path, no cache, no
    tree mask). The node's children must be the best tokens of those logits in rank order
    (static trees: rank r = r-th best; dynamic trees: a best-first prefix of the top-k). This
    checks the drafters' tree masks, positions and catch-up, which losslessness cannot see."""
    strategy, draft_name = PROPOSAL_CASES[case]
    draft = DRAFTS[draft_name]() if draft_name else None
    prep = generation.prepare(target(), PROMPTS, strategy=strategy, sampling=None, max_new_tokens=MAX_NEW, seed=0,
                               stop=(), eos_token_id=(), chat=False, max_cache_len=None, draft=draft)
    state, tree = _state_and_next_tree_jit(prep.strategy, prep.ctx, prep.params, prep.prompt, prep.lengths,
                                           prep.key, 3)
    context, context_len = np.asarray(state.context), np.asarray(state.context_len)
    tokens, children, depth = np.asarray(tree.tokens), np.asarray(tree.children), np.asarray(tree.depth)
    mask, valid = np.asarray(tree.mask), np.asarray(tree.valid)
    assert valid.all()
    b, n = tokens.shape
    # paths from the root, from the children table; the mask must be exactly the ancestor relation
    paths = {}
    for r in range(b):
        paths[r, 0] = []
        for i in range(n):
            for c in children[r, i]:
                if c >= 0:
                    assert c > i and (r, c) not in paths, "children must come after their parent, once"
                    paths[r, c] = paths[r, i] + [c]
        assert len([k for k in paths if k[0] == r]) == n, "every node must be reachable from the root"
        for i in range(n):
            want = np.zeros(n, bool)
            want[[0] + paths[r, i]] = True
            np.testing.assert_array_equal(mask[r, i], want)
            assert depth[r, i] == len(paths[r, i])
    # the drafter's logits after every node, recomputed from scratch
    seqs = [context[r, : context_len[r]].tolist() + [int(tokens[r, j]) for j in paths[r, i]]
            for r in range(b) for i in range(n)]
    width = max(map(len, seqs))
    padded = np.zeros((len(seqs), width), np.int32)
    for k, seq in enumerate(seqs):
        padded[k, : len(seq)] = seq
    lengths = jnp.asarray([len(seq) for seq in seqs], jnp.int32)
    if draft is not None:
        logits = _last_logits(draft.config, draft.params, jnp.asarray(padded), lengths, None)
    else:
        logits = _last_logits(target().config, target().params, jnp.asarray(padded), lengths,
                              (0, strategy.drafter.layers))
    order = np.argsort(-np.asarray(logits), axis=-1, kind="stable").reshape(b, n, -1)
    expanded = 0
    for r in range(b):
        for i in range(n):
            kids = [int(c) for c in children[r, i] if c >= 0]
            got = [int(tokens[r, c]) for c in kids]
            if isinstance(strategy.tree, TreeTopology):
                ranks = [strategy.tree.rank[c] for c in kids]
                want = [int(order[r, i, k]) for k in ranks]
            else:
                want = order[r, i, : len(kids)].tolist()
            assert got == want, f"row {r} node {i}: children {got}, drafter's best tokens {want}"
            expanded += bool(kids) and i > 0
    assert expanded > 0  # nodes below depth 1 were checked too


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


def test_draft_model_needs_a_draft():
    with pytest.raises(ValueError, match="DraftModel needs the draft model"):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=Speculative(DraftModel(), gamma=2))
    with pytest.raises(ValueError, match="DraftModel needs the draft model"):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=TreeDecoding(DraftModel(), tree=TreeTopology.chain(2)))


@pytest.mark.parametrize("layers", [0, 3, 5])
def test_layer_skip_depth_must_be_inside_the_target(layers):
    with pytest.raises(ValueError, match=r"LayerSkip\(layers=%d\) needs 1 <= layers < 3" % layers):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=Speculative(LayerSkip(layers=layers), gamma=2))


def test_prompt_lookup_refuses_trees():
    with pytest.raises(ValueError, match="PromptLookup drafts a chain"):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=TreeDecoding(PromptLookup(), tree=TreeTopology.chain(2)))
    with pytest.raises(ValueError, match="PromptLookup drafts a chain"):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=TreeDecoding(PromptLookup(), tree=DynamicTree()))
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="1 <= min_ngram"):
        PromptLookup(min_ngram=0)


def _word_tokenizer(vocab: dict, eos: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos)


def _with_tokenizer(model: Model, tokenizer) -> Model:
    return Model(model.config, model.params, tokenizer=tokenizer, source=model.source)


def test_draft_with_another_vocabulary_is_refused():
    cfg = dataclasses.replace(SMALL_DRAFT_CFG, vocab_size=32)
    other = Model(cfg, init_params(cfg, jax.random.PRNGKey(3), scale=0.5))
    with pytest.raises(ValueError, match="draft and target tokenizers differ: vocab sizes 64 vs 32"):
        check_same_tokenizer(target(), other)
    with pytest.raises(ValueError, match="draft and target tokenizers differ"):
        generate(target(), PROMPTS, max_new_tokens=4, strategy=Speculative(DraftModel(), gamma=2), draft=other)


def test_draft_with_another_tokenizer_is_refused():
    words = [f"w{i}" for i in range(62)] + ["<unk>", "</s>"]
    vocab = {w: i for i, w in enumerate(words)}
    shuffled = {w: i for i, w in enumerate(words[:62][::-1] + ["<unk>", "</s>"])}  # same words, other ids
    tok_a = _word_tokenizer(vocab, "</s>")
    tok_b = _word_tokenizer(shuffled, "</s>")
    tok_c = _word_tokenizer(vocab, "<unk>")  # same map, another EOS
    t = _with_tokenizer(target(), tok_a)
    check_same_tokenizer(t, _with_tokenizer(DRAFTS["small"](), _word_tokenizer(vocab, "</s>")))  # equal: accepted
    with pytest.raises(ValueError, match=r"draft and target tokenizers differ: token-to-id maps differ"):
        check_same_tokenizer(t, _with_tokenizer(DRAFTS["small"](), tok_b))
    with pytest.raises(ValueError, match=r"draft and target tokenizers differ: EOS ids 63 vs 62"):
        check_same_tokenizer(t, _with_tokenizer(DRAFTS["small"](), tok_c))
    with pytest.raises(ValueError, match="draft and target tokenizers differ"):
        generate(t, PROMPTS, max_new_tokens=4, strategy=Speculative(DraftModel(), gamma=2),
                 draft=_with_tokenizer(DRAFTS["small"](), tok_b))
