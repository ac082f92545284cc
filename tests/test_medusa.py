"""Medusa heads (drafting/medusa.py) in chains, static trees and dynamic trees.

- Greedy outputs with the heads equal greedy autoregressive outputs token for token on the
  ragged batch of `spec_common`, for a chain, a static tree and the dynamic tree; some rounds
  accept candidates (the accepted paths are exercised).
- The hidden state the heads read after a run is the target's final-layer state at the token
  before the root, recomputed from scratch over the committed context (the hand-over from
  verification picks the right node in every row, accepted or rejected).
- Sampled chains (q = a head's processed distribution), static trees (one-hot siblings, or
  siblings drawn without replacement, shared by every parent of a depth) and dynamic trees with
  sampled siblings follow the target's law (chi-square over every 4-token continuation).
- Zero-initialised heads repeat the target's next-token logits (Medusa's init).
- Save / load round trip in bf16; heads for another hidden size or another target, a missing
  draft and a too-deep shape are refused with clear errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from decoding import Model, Sampling, Speculative, TreeDecoding, generate, generation
from decoding.model import forward
from drafting import DynamicTree, TreeTopology
from drafting import medusa
from spec_common import (MAX_NEW, PROMPTS, SAMPLE_K, SAMPLE_N, SAMPLE_SEED, SMALL_V_PROMPT, chi_square,
                         continuation_index, exact_continuations, greedy_reference, run_state, small_v_target, target)

NUM_HEADS = 4


def heads_for(model: Model, seed: int, scale: float) -> Model:
    cfg = medusa.config_for(model, NUM_HEADS)
    return medusa.as_draft(model, cfg, medusa.init_heads(cfg, jax.random.PRNGKey(seed), scale=scale))


@functools.cache
def greedy_heads() -> Model:
    return heads_for(target(), 5, 0.5)


GREEDY_CASES = {
    "chain": Speculative(medusa.Medusa(), gamma=3),
    "tree-static": TreeDecoding(medusa.Medusa(), tree=TreeTopology.from_branching((3, 2, 1))),
    "tree-dynamic": TreeDecoding(medusa.Medusa(), tree=DynamicTree(depth=3, top_k=3, total_tokens=8)),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_equals_autoregressive(case):
    result, state = run_state(target(), PROMPTS, GREEDY_CASES[case], draft=greedy_heads())
    assert [tuple(r) for r in result.tokens] == list(greedy_reference())
    hist = np.asarray(state.accept_hist)
    assert hist[1:].sum() > 0 and hist[0] > 0, f"{case}: no round accepted (or none rejected): {hist}"


@functools.partial(jax.jit, static_argnums=0)
def _last_hidden(config, params, context):
    b, width = context.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    cache = decoding.KVCache.init(config, b, width, jnp.float32)
    return forward(config, params, context, positions, cache, return_hidden=(config.num_layers,)).hidden[
        config.num_layers]


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_heads_read_the_state_before_the_root(case):
    """After every round, the state the heads hold is the target's last-layer state at the token
    before the root, recomputed from scratch over the committed context."""
    m = target()
    prep = generation.prepare(m, PROMPTS, strategy=GREEDY_CASES[case], max_new_tokens=MAX_NEW, eos_token_id=(),
                              draft=greedy_heads(), chat=False)
    s, ctx = prep.strategy, prep.ctx
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(prep.params, prep.prompt, prep.lengths, prep.key)
    step = jax.jit(lambda p, st: s.step(ctx, p, st))
    rows = np.arange(len(PROMPTS))
    for _ in range(MAX_NEW):
        n = np.asarray(state.context_len) - 1  # tokens the target processed (the root is not one)
        want = np.asarray(_last_hidden(m.config, m.params, state.context))[rows, n - 1]
        np.testing.assert_allclose(np.asarray(state.drafter.hidden), want, atol=2e-4, rtol=2e-4)
        if bool(np.all(np.asarray(state.out.done))):
            break
        state = step(prep.params, state)
    hist = np.asarray(state.accept_hist)
    assert hist[1:].sum() > 0, f"no round accepted a candidate: the hand-over was not exercised ({hist})"


def test_zero_heads_repeat_the_next_token_guess():
    m = target()
    cfg = medusa.config_for(m, 2)
    h = jax.random.normal(jax.random.PRNGKey(3), (2, 5, m.config.hidden_size))
    got = medusa.head_logits(m.config, m.params, medusa.init_heads(cfg), h)  # [2, 5, 2, V]
    want = decoding.model.unembed(m.config, m.params, h)
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(np.asarray(want)[:, :, None], got.shape), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Sampled losslessness
# ------------------------------------------------------------------------------------------

SAMPLING = Sampling(temperature=0.8, top_k=4)
ALPHA = 1e-3


@pytest.mark.parametrize("case", ["chain", "tree-static", "tree-static-sampled-siblings",
                                  "tree-dynamic-sampled-siblings"])
def test_sampled_follows_the_target(case):
    strategy = {"chain": Speculative(medusa.Medusa(), gamma=2),
                "tree-static": TreeDecoding(medusa.Medusa(), tree=TreeTopology.from_branching((2, 2))),
                "tree-static-sampled-siblings": TreeDecoding(medusa.Medusa(sampled_siblings=True),
                                                             tree=TreeTopology.from_branching((3, 2))),
                "tree-dynamic-sampled-siblings": TreeDecoding(medusa.Medusa(sampled_siblings=True),
                                                              tree=DynamicTree(depth=2, top_k=3, total_tokens=6))}[case]
    model = small_v_target()
    result, state = run_state(model, [SMALL_V_PROMPT] * SAMPLE_N, strategy, draft=heads_for(model, 7, 0.5),
                              sampling=SAMPLING, max_new_tokens=SAMPLE_K, eos=(), seed=SAMPLE_SEED)
    law = exact_continuations(model, SMALL_V_PROMPT, SAMPLE_K, SAMPLING)
    res = chi_square(continuation_index(result.tokens, model.config.vocab_size, SAMPLE_K), law)
    assert res["impossible"] == 0, res
    assert res["p"] > ALPHA, f"{case}: output law differs from the target's: {res}"
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[1:].sum() > 0, hist
    if "sampled-siblings" in case:  # later siblings were accepted at both depths
        ranks = np.asarray(state.rank_hist)
        assert ranks[0, 1:].sum() > 0 and ranks[1, 1:].sum() > 0, ranks


# ------------------------------------------------------------------------------------------
# Files and refusals
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    heads = greedy_heads()
    path = medusa.save_heads(tmp_path / "heads.safetensors", heads.config, heads.params)
    assert path.stat().st_size < 2 * heads.config.param_count() + 4096  # bf16 + a small header
    loaded = medusa.load_heads(path, target())
    assert loaded.config == heads.config
    for k in heads.params:
        want = np.asarray(jnp.asarray(heads.params[k], jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(loaded.params[k], np.float32), want)
    out = generate(target(), PROMPTS, strategy=GREEDY_CASES["chain"], draft=loaded, max_new_tokens=MAX_NEW,
                   eos_token_id=())
    assert [tuple(r) for r in out.tokens] == list(greedy_reference())


def test_heads_for_another_target_are_refused(tmp_path):
    heads = greedy_heads()
    path = medusa.save_heads(tmp_path / "heads.safetensors", heads.config, heads.params)
    other = Model(target().config, jax.tree.map(lambda w: w * 1.01, target().params), source="other")
    with pytest.raises(medusa.HeadMismatch, match="trained for target"):
        medusa.load_heads(path, other)
    with pytest.raises(medusa.HeadMismatch, match="hidden size 32 .* cannot read a target with hidden size 16"):
        medusa.load_heads(path, small_v_target())
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        medusa.load_heads(tmp_path / "x.safetensors", target())
    with pytest.raises(FileNotFoundError, match="no head file"):
        medusa.load_heads(tmp_path / "missing.safetensors", target())


def test_missing_heads_and_too_deep_shapes_are_refused():
    with pytest.raises(ValueError, match="Medusa needs its heads as the draft"):
        generate(target(), PROMPTS, strategy=Speculative(medusa.Medusa(), gamma=2), max_new_tokens=4)
    with pytest.raises(ValueError, match="drafts at most 4 tokens deep"):
        generate(target(), PROMPTS, strategy=Speculative(medusa.Medusa(), gamma=5), draft=greedy_heads(),
                 max_new_tokens=4)
    with pytest.raises(ValueError, match="num_heads >= 1"):
        medusa.MedusaConfig(num_heads=0, hidden_size=4, vocab_size=8)
