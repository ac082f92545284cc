"""Hidden transfer (drafting/hidden_transfer.py, distill/hidden_transfer.py) on tiny targets.

- Greedy outputs equal greedy autoregressive outputs token for token on the ragged batch of
  `spec_common` (float32), for a chain, a static tree and a dynamic tree, at two layers; some
  rounds accept candidates and some reject.
- The one forward with pseudo positions gives the real tokens the same logits and the same
  keys/values as `decoding.forward` without them (tree mask, non-empty prefix).
- After every round the committed cache equals the cache of a fresh prefill of the committed
  tokens (the pseudo positions' throwaway slots are never committed), and the pseudo states
  the proposer holds equal those of a fresh forward over the committed context (the hand-over
  from verification picks the last accepted node in every row).
- Sampled chains (q = the pseudo positions' processed distributions), static and dynamic trees
  (one-hot siblings) follow the target's law (chi-square over every 4-token continuation).
- Another family (Gemma 3, a sliding window shorter than the prompts) decodes losslessly.
- Training: the recipe's cheaper pseudo forward (target cache + slot mask) equals the
  structured-mask forward per packed sequence; a short run raises the pseudo positions'
  acceptance measured end to end; the maps survive save / load and decode losslessly.
- pseudo="separate" (a partial forward for the accepted node only) drafts exactly what the
  one-forward arrangement drafts.
- Identity maps copy the layer-l state; bad inputs (layer out of range, k < 1, maps for another
  target or size, a missing draft, a too-deep shape) are clear errors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import distill
from decoding import Model, Sampling, Speculative, TreeDecoding, generate, generation
from decoding.model import forward
from distill import data as D
from distill import hidden_transfer as dht
from drafting import DynamicTree, TreeTopology
from drafting import hidden_transfer as ht
from spec_common import (MAX_NEW, PROMPTS, SAMPLE_K, SAMPLE_N, SAMPLE_SEED, SMALL_V_PROMPT, chi_square,
                         committed_kv_error, continuation_index, exact_continuations, fresh_cache, greedy_reference,
                         run_state, small_v_target, target)

K = 3


def maps_for(model: Model, layer: int, seed: int, scale: float, k: int = K) -> Model:
    cfg = ht.config_for(model, k, layer=layer)
    return ht.as_draft(model, cfg, ht.init_maps(cfg, jax.random.PRNGKey(seed), scale=scale))


@functools.cache
def greedy_maps(layer: int = 1) -> Model:
    return maps_for(target(), layer, 5, 0.3)


HT = ht.HiddenTransfer()
GREEDY_CASES = {
    "chain": Speculative(HT, gamma=3),
    "tree-static": TreeDecoding(HT, tree=TreeTopology.from_branching((3, 2, 1))),
    "tree-dynamic": TreeDecoding(HT, tree=DynamicTree(depth=3, top_k=3, total_tokens=8)),
}


@pytest.mark.parametrize("case,layer", [(c, 1) for c in GREEDY_CASES] + [("tree-static", 2)])
def test_greedy_equals_autoregressive(case, layer):
    result, state = run_state(target(), PROMPTS, GREEDY_CASES[case], draft=greedy_maps(layer))
    assert [tuple(r) for r in result.tokens] == list(greedy_reference())
    hist = np.asarray(state.accept_hist)
    assert hist[1:].sum() > 0 and hist[0] > 0, f"{case}: no round accepted (or none rejected): {hist}"
    assert result.stats.extra["draft_forwards"] == 0  # drafting rides on the verify forward


@pytest.mark.parametrize("case", ["chain", "tree-static"])
def test_separate_pseudo_forward_drafts_the_same_tokens(case):
    """pseudo="separate" (the accepted node's pseudo positions in a partial forward at propose
    time) is lossless and proposes what the one-forward arrangement proposes: the same output,
    the same accepted lengths and sibling ranks every round."""
    base = GREEDY_CASES[case]
    separate = dataclasses.replace(base, drafter=ht.HiddenTransfer(pseudo="separate"))
    res_v, st_v = run_state(target(), PROMPTS, base, draft=greedy_maps(1))
    res_s, st_s = run_state(target(), PROMPTS, separate, draft=greedy_maps(1))
    assert [tuple(r) for r in res_s.tokens] == list(greedy_reference())
    np.testing.assert_array_equal(np.asarray(st_s.accept_hist), np.asarray(st_v.accept_hist))
    np.testing.assert_array_equal(np.asarray(st_s.rank_hist), np.asarray(st_v.rank_hist))
    assert res_s.stats.extra["draft_forwards"] == res_s.stats.extra["rounds"]  # one partial forward per round


def test_greedy_equals_autoregressive_on_gemma3_with_a_short_window():
    """Another family (Gemma 3: sliding-window layers, a window shorter than the prompts, so
    pseudo positions sit at the window's edge) decodes losslessly with a static tree."""
    cfg = decoding.Gemma3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                                num_kv_heads=1, head_dim=16, sliding_window=4,
                                layer_types=("sliding_attention", "sliding_attention", "full_attention"))
    m = Model(cfg, decoding.init_params(cfg, jax.random.PRNGKey(4), scale=0.5), source="tiny-gemma3")
    ar = generate(m, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=())
    strategy = TreeDecoding(HT, tree=TreeTopology.from_branching((3, 2)))
    result, state = run_state(m, PROMPTS, strategy, draft=maps_for(m, 1, 5, 0.3))
    assert result.tokens == ar.tokens
    assert np.asarray(state.accept_hist)[1:].sum() > 0


def test_pseudo_positions_leave_the_real_tokens_unchanged():
    """A tree of 7 nodes after a 5-token prefix (different per row): logits and keys/values of
    the nodes are those of a plain forward with the tree mask."""
    m = target()
    cfg, maps = greedy_maps(1).config, greedy_maps(1).params
    topo = TreeTopology.from_branching((2, 2))
    b, n = 2, topo.num_nodes
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(rng.integers(0, 64, (b, 5)), jnp.int32)
    cache = decoding.KVCache.init(m.config, b, 64, jnp.float32)
    cache = forward(m.config, m.params, prefix, jnp.broadcast_to(jnp.arange(5), (b, 5)), cache).cache
    cache = cache.truncate(jnp.array([5, 3], jnp.int32))  # ragged committed prefixes
    tokens = jnp.asarray(rng.integers(0, 64, (b, n)), jnp.int32)
    positions = cache.lengths[:, None] + jnp.asarray(topo.depth)[None]
    mask = jnp.broadcast_to(jnp.asarray(topo.mask), (b, n, n))
    plain = forward(m.config, m.params, tokens, positions, cache, mask=mask)
    logits, pseudo, got = ht.forward_with_pseudo(m.config, m.params, maps, cfg.layer, tokens, positions, cache, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain.logits), atol=1e-5, rtol=1e-5)
    assert pseudo.shape == (b, n, K, m.config.hidden_size)
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(plain.cache.lengths))
    lengths = np.asarray(got.lengths)
    assert committed_kv_error(got, plain.cache, lengths) < 1e-5
    # the pseudo positions did write (upper layers, past the tree's slots): the slots are throwaway
    k_up = np.asarray(got.k)[cfg.layer:, 0, :, lengths[0]:lengths[0] + n * K]
    assert np.abs(k_up).max() > 0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fresh_pseudo(config, layer, params, maps, context):
    """Pseudo outputs of every position of `context` in one causal forward from scratch."""
    b, width = context.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    cache = decoding.KVCache.init(config, b, width * (1 + K) + 1, jnp.float32)
    return ht.forward_with_pseudo(config, params, maps, layer, context, positions, cache)[1]


@pytest.mark.parametrize("case", ["chain", "tree-static"])
def test_each_round_commits_the_autoregressive_cache_and_hands_over_fresh_pseudo_states(case):
    m = target()
    draft = greedy_maps(1)
    prep = generation.prepare(m, PROMPTS, strategy=GREEDY_CASES[case], max_new_tokens=MAX_NEW, eos_token_id=(),
                              draft=draft, chat=False)
    s, ctx = prep.strategy, prep.ctx
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(prep.params, prep.prompt, prep.lengths, prep.key)
    step = jax.jit(lambda p, st: s.step(ctx, p, st))
    rows = np.arange(len(PROMPTS))
    accepted = 0
    for _ in range(MAX_NEW):
        lengths = np.asarray(state.cache.lengths)  # committed tokens before the root
        context = np.asarray(state.context)
        err = committed_kv_error(state.cache, fresh_cache(m, context, lengths), lengths)
        assert err < 2e-5, f"committed KV entries differ from a fresh prefill by {err}"
        want = np.asarray(_fresh_pseudo(m.config, draft.config.layer, m.params, draft.params,
                                        jnp.asarray(context)))[rows, lengths - 1]
        np.testing.assert_allclose(np.asarray(state.drafter.pseudo), want, atol=2e-4, rtol=2e-4)
        if bool(np.all(np.asarray(state.out.done))):
            break
        state = step(prep.params, state)
        accepted = int(np.asarray(state.accept_hist)[1:].sum())
    assert accepted > 0, "no round accepted a candidate: the hand-over was not exercised"


def test_identity_maps_copy_the_state():
    m = target()
    cfg = ht.config_for(m, 2, layer=1)
    h = jax.random.normal(jax.random.PRNGKey(3), (2, 5, m.config.hidden_size))
    got = ht.transfer(ht.init_maps(cfg), h)
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(np.asarray(h)[:, :, None], got.shape))


# ------------------------------------------------------------------------------------------
# Sampled losslessness
# ------------------------------------------------------------------------------------------

SAMPLING = Sampling(temperature=0.8, top_k=4)
ALPHA = 1e-3


@pytest.mark.parametrize("case", ["chain", "tree-static", "tree-dynamic"])
def test_sampled_follows_the_target(case):
    strategy = {"chain": Speculative(HT, gamma=2),
                "tree-static": TreeDecoding(HT, tree=TreeTopology.from_branching((2, 2))),
                "tree-dynamic": TreeDecoding(HT, tree=DynamicTree(depth=2, top_k=2, total_tokens=4))}[case]
    model = small_v_target()
    result, state = run_state(model, [SMALL_V_PROMPT] * SAMPLE_N, strategy, draft=maps_for(model, 1, 7, 0.5),
                              sampling=SAMPLING, max_new_tokens=SAMPLE_K, eos=(), seed=SAMPLE_SEED)
    law = exact_continuations(model, SMALL_V_PROMPT, SAMPLE_K, SAMPLING)
    res = chi_square(continuation_index(result.tokens, model.config.vocab_size, SAMPLE_K), law)
    assert res["impossible"] == 0, res
    assert res["p"] > ALPHA, f"{case}: output law differs from the target's: {res}"
    hist = np.asarray(state.accept_hist)
    assert hist[0] > 0 and hist[1:].sum() > 0, hist


# ------------------------------------------------------------------------------------------
# Files and refusals
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    maps = greedy_maps(1)
    path = ht.save_maps(tmp_path / "maps.safetensors", maps.config, maps.params)
    assert path.stat().st_size < 2 * maps.config.param_count() + 4096  # bf16 + a small header
    loaded = ht.load_maps(path, target())
    assert loaded.config == maps.config
    for k in maps.params:
        want = np.asarray(jnp.asarray(maps.params[k], jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(loaded.params[k], np.float32), want)
    out = generate(target(), PROMPTS, strategy=GREEDY_CASES["tree-static"], draft=loaded, max_new_tokens=MAX_NEW,
                   eos_token_id=())
    assert [tuple(r) for r in out.tokens] == list(greedy_reference())


def test_bad_inputs_are_clear_errors(tmp_path):
    m = target()  # 3 layers
    for layer in (0, 3, -1):
        with pytest.raises(ValueError, match=r"layer must be in \[1, 2\]"):
            ht.config_for(m, 2, layer=layer)
    with pytest.raises(ValueError, match="num_maps \\(k\\) >= 1"):
        ht.config_for(m, 0, layer=1)
    maps = greedy_maps(1)
    path = ht.save_maps(tmp_path / "maps.safetensors", maps.config, maps.params)
    other = Model(m.config, jax.tree.map(lambda w: w * 1.01, m.params), source="other")
    with pytest.raises(ht.TransferMismatch, match="trained for target"):
        ht.load_maps(path, other)
    with pytest.raises(ht.TransferMismatch, match="hidden size 32 .* cannot run on a target with hidden size 16"):
        ht.load_maps(path, small_v_target())
    with pytest.raises(FileNotFoundError, match="no head file"):
        ht.load_maps(tmp_path / "missing.safetensors", m)
    with pytest.raises(ValueError, match="needs its transfer maps as the draft"):
        generate(m, PROMPTS, strategy=Speculative(HT, gamma=2), max_new_tokens=4)
    with pytest.raises(ValueError, match="drafts at most 3 tokens deep"):
        generate(m, PROMPTS, strategy=Speculative(HT, gamma=4), draft=maps, max_new_tokens=4)
    with pytest.raises(ValueError, match="pseudo='later' is not one of"):
        ht.HiddenTransfer(pseudo="later")
    with pytest.raises(ht.TransferMismatch, match="do not fit the target"):
        dht.HiddenTransferRecipe(small_v_target().config, maps.config)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def _packed_batch():
    """One row: a 6-token sequence then a 5-token one, then padding; assistant tokens marked."""
    tokens = np.array([[5, 9, 11, 3, 7, 2, 4, 4, 8, 13, 6, 0, 0, 0, 0, 0]], np.int32)
    segments = np.array([[1] * 6 + [2] * 5 + [0] * 5], np.int32)
    positions = np.array([list(range(6)) + list(range(5)) + [0] * 5], np.int32)
    loss = np.zeros((1, 16), np.float32)
    loss[0, 1:5] = 1
    loss[0, 7:10] = 1
    return {"tokens": tokens, "positions": positions, "segments": segments, "loss_mask": loss}


def test_training_forward_equals_the_structured_forward_and_the_loss_is_the_kl():
    """Per packed sequence, the recipe's pseudo outputs (target cache + slot mask) equal
    `forward_with_pseudo` over that sequence alone; the loss is the masked KL sum."""
    m = target()
    maps = maps_for(m, 1, 2, 0.5)
    recipe = dht.HiddenTransferRecipe(m.config, maps.config, decay=0.5)
    batch = {k: jnp.asarray(v) for k, v in _packed_batch().items()}
    logits, pseudo = jax.jit(dht.pseudo_outputs, static_argnums=(0, 3))(m.config, m.params, maps.params, 1, batch)
    for start, length in ((0, 6), (6, 5)):
        seq = batch["tokens"][:, start:start + length]
        pos = jnp.arange(length)[None]
        cache = decoding.KVCache.init(m.config, 1, length * (1 + K), jnp.float32)
        lg, want, _ = jax.jit(ht.forward_with_pseudo, static_argnums=(0, 3))(m.config, m.params, maps.params, 1, seq,
                                                                             pos, cache)
        np.testing.assert_allclose(np.asarray(pseudo[:, start:start + length]), np.asarray(want), atol=2e-4,
                                   rtol=2e-4)
        np.testing.assert_allclose(np.asarray(logits[:, start:start + length]), np.asarray(lg), atol=2e-4, rtol=2e-4)
    trainable, _ = recipe.init(m.params, maps=maps.params)
    total, (count, metrics) = jax.jit(recipe.loss)(trainable, {"target": m.params}, batch)
    q = np.asarray(ht.pseudo_logits(m.config, m.params, pseudo), np.float64)[0]  # [T, k, V]
    p = np.asarray(logits, np.float64)[0]

    def lsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    seg, lm = _packed_batch()["segments"][0], _packed_batch()["loss_mask"][0]
    want, kept = 0.0, 0
    for i in range(1, K + 1):
        for t in range(16):
            if t + i >= 16 or seg[t] == 0 or seg[t + i] != seg[t] or not lm[t + i]:
                continue
            lp, lq = lsm(p[t + i]), lsm(q[t, i - 1])
            want += 0.5 ** (i - 1) * float(np.exp(lp) @ (lp - lq))
            kept += i == 1
    assert kept == 4 + 3 and float(count) == kept
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    assert set(metrics) == {"top1_pos1", "top1_pos2", "top1_pos3", "acceptance"}


def test_training_raises_pseudo_acceptance(tmp_path):
    from test_distill_models import pair
    from test_distill_trainer import SEQ, held_out_prompts, teacher_written

    teacher, _ = pair()  # 2 layers: the maps sit after layer 1
    cfg = ht.config_for(teacher, 2, layer=1)
    recipe = dht.HiddenTransferRecipe(teacher.config, cfg)
    trainable, frozen = recipe.init(teacher.params, frozen_dtype=jnp.float32)
    tc = distill.TrainConfig(steps=40, batch_size=4, accumulate=1, seq_len=SEQ, learning_rate=1e-1, warmup_steps=5,
                             compute_dtype="float32", log_every=10, checkpoint_every=1000)
    batches = D.Batches(teacher_written(), tc.batch_size, tc.accumulate, seed=0)
    prompts = held_out_prompts()[:8]

    def ev(params):
        return distill.acceptance(teacher, dht.drafter(teacher, recipe, params), prompts, gamma=2, max_new_tokens=24,
                                  batch_size=8, drafter=ht.HiddenTransfer())

    trainer = distill.Trainer(recipe, tc, trainable, frozen, lambda s, p: batches.batch(s), out_dir=str(tmp_path),
                              evaluate=ev, progress=False)
    before = trainer.evaluate(trainer.params)
    summary = trainer.run()
    rows = distill.trainer.read_jsonl(trainer.metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    late = lambda key: float(np.mean([r[key] for r in train[-3:]]))  # noqa: E731  (batches differ: average)
    assert late("loss") < 0.8 * train[0]["loss"]
    for i in (1, 2):  # each pseudo position's top-1 agreement with the target rises on the training batches
        assert late(f"top1_pos{i}") > train[0][f"top1_pos{i}"] + 0.07, (train[0], train[-1])
    after = summary["eval"]
    assert after["tau"] > before["tau"] + 0.08, (before, after)
    assert after["acceptance_per_position"][0] > before["acceptance_per_position"][0] + 0.05, (before, after)
    # the trained maps decode losslessly after a save / load round trip
    path = ht.save_maps(tmp_path / "maps.safetensors", cfg, recipe.map_params(trainer.params))
    maps = ht.load_maps(path, teacher)
    ar = generate(teacher, prompts[:4], max_new_tokens=16, eos_token_id=())
    out = generate(teacher, prompts[:4], strategy=TreeDecoding(HT, tree=TreeTopology.from_branching((2, 2))),
                   draft=maps, max_new_tokens=16, eos_token_id=())
    assert out.tokens == ar.tokens
