"""Training the EAGLE-3-style head (distill/eagle.py) with training-time test.

- The unrolled training forward is the decoding-time computation: step s's logits at position
  p equal those of the head run as at decoding time (a cache of target-feature pairs up to
  p - s, then s chain steps on its own output states with the data's tokens), for every p and s.
- A short run on a tiny target's own answers lowers the loss and raises the head's greedy
  acceptance measured end to end (`Speculative(Eagle())` on held-out prompts).
- The same with EAGLE-3's reduced draft vocabulary (the most frequent label tokens of the
  data, `distill.data.token_counts`): the head's own lm_head and d2t map train and decode.
- Bad recipes are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import distill
from distill import data as D
from distill import eagle as recipe_mod
from drafting import Eagle, eagle
from test_distill_models import pair
from test_distill_trainer import SEQ, held_out_prompts, teacher_written


def test_unrolled_steps_equal_the_decoding_computation():
    target, _ = pair()
    c = target.config
    cfg = eagle.config_for(target)
    head = eagle.init_head(c, jax.random.PRNGKey(1), scale=0.3)
    t, steps = 10, 3
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, c.vocab_size, (1, t)), jnp.int32)
    batch = {"tokens": tokens, "positions": jnp.arange(t, dtype=jnp.int32)[None],
             "segments": jnp.ones((1, t), jnp.int32), "loss_mask": jnp.ones((1, t), jnp.float32)}
    _, outs = recipe_mod.unroll(c, target.params, head, cfg.layers, batch, steps)

    layers = tuple(sorted(set(cfg.layers)))
    hidden = decoding.forward(c, target.params, tokens, batch["positions"], decoding.KVCache.init(c, 1, t, jnp.float32),
                              return_hidden=layers).hidden
    f = eagle.fuse(head, hidden, cfg.layers)
    head_forward = jax.jit(eagle.head_forward, static_argnums=0)
    full = decoding.KVCache.init(eagle.layer_config(c), 1, t + steps, jnp.float32)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    _, prefix_out, full = head_forward(c, target.params, head, full, f, nxt, batch["positions"])
    checked = 0
    for b0 in range(t - 2):
        cache = full.truncate(jnp.array([b0 + 1]))  # the pairs 0 .. b0 with target features
        h = prefix_out[:, b0 : b0 + 1]
        for s in range(1, steps):
            p = b0 + s
            if p + 1 >= t:
                break
            lg, out, cache = head_forward(c, target.params, head, cache, h, tokens[:, p + 1 : p + 2], jnp.array([[p]]))
            cache = cache.truncate(cache.lengths + 1)
            h = out
            np.testing.assert_allclose(np.asarray(lg[0, 0]), np.asarray(outs[s][0, p]), atol=2e-4, rtol=2e-4)
            checked += 1
    assert checked >= 2 * (t - 4)


def reduced_vocab_for(size: int):
    target, _ = pair()
    return eagle.reduced_vocab(D.token_counts(teacher_written(), target.config.vocab_size), size)


def trainer_for(tmp, steps=100, draft_vocab=None):
    target, _ = pair()
    recipe = distill.EagleRecipe(target.config, eagle.config_for(target), weights=(1.0, 0.8, 0.6),
                                 draft_vocab=draft_vocab)
    trainable, frozen = recipe.init(target.params, jax.random.PRNGKey(0), frozen_dtype=jnp.float32)
    tc = distill.TrainConfig(steps=steps, batch_size=4, accumulate=2, seq_len=SEQ, learning_rate=1e-2, warmup_steps=5,
                             compute_dtype="float32", log_every=10, checkpoint_every=1000)
    batches = D.Batches(teacher_written(), tc.batch_size, tc.accumulate, seed=0)

    def ev(params):
        return distill.acceptance(target, recipe_mod.drafter(target, recipe, params), held_out_prompts(), gamma=3,
                                  max_new_tokens=32, batch_size=8, drafter=Eagle())

    return distill.Trainer(recipe, tc, trainable, frozen, lambda s, p: batches.batch(s), out_dir=tmp, evaluate=ev,
                           progress=False)


def test_training_raises_the_heads_acceptance(tmp_path):
    trainer = trainer_for(tmp_path)
    before = trainer.evaluate(trainer.params)
    summary = trainer.run()
    train = [r for r in distill.trainer.read_jsonl(trainer.metrics_path) if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert train[-1]["top1_step1"] > train[0]["top1_step1"] + 0.1, (train[0], train[-1])
    after = summary["eval"]
    assert after["tau"] > before["tau"] + 0.1, (before, after)


def test_training_with_a_reduced_vocabulary_raises_the_heads_acceptance(tmp_path):
    """EAGLE-3's reduced vocabulary: the labels' most frequent tokens (token_counts covers every
    label of the data, and the draft vocabulary keeps the most frequent of them)."""
    target, _ = pair()
    counts = D.token_counts(teacher_written(), target.config.vocab_size)
    labels = int((counts > 0).sum())
    size = max(labels // 2, 4)
    d2t = reduced_vocab_for(size)
    assert counts[d2t].min() >= np.sort(counts)[-size]  # the most frequent labels were kept
    trainer = trainer_for(tmp_path, steps=50, draft_vocab=d2t)
    assert trainer.recipe.head.draft_vocab == size
    before = trainer.evaluate(trainer.params)
    summary = trainer.run()
    train = [r for r in distill.trainer.read_jsonl(trainer.metrics_path) if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    after = summary["eval"]
    assert after["tau"] > before["tau"] + 0.1, (before, after)
    head = recipe_mod.drafter(target, trainer.recipe, trainer.params)
    assert head.params["lm_head"].shape == (target.config.hidden_size, size)
    np.testing.assert_array_equal(np.asarray(head.params["d2t"]), d2t)


def test_token_counts_count_the_labels():
    target, _ = pair()
    packed = teacher_written()
    counts = D.token_counts(packed, target.config.vocab_size)
    rows = packed[:]
    tokens, keep = np.asarray(rows["tokens"]), np.asarray(rows["loss_mask"]) > 0
    assert counts.sum() == keep[:, :-1].sum()
    want = np.zeros_like(counts)
    for r in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if keep[r, t]:
                want[tokens[r, t + 1]] += 1
    np.testing.assert_array_equal(counts, want)


def test_bad_recipes_are_refused():
    target, _ = pair()
    cfg = eagle.config_for(target)
    with pytest.raises(ValueError, match="one non-negative weight per unrolled step"):
        distill.EagleRecipe(target.config, cfg, weights=())
    import dataclasses

    with pytest.raises(eagle.HeadMismatch, match="does not fit the target"):
        distill.EagleRecipe(target.config, dataclasses.replace(cfg, hidden_size=16))
    with pytest.raises(ValueError, match="draft_vocab must be distinct target ids"):
        distill.EagleRecipe(target.config, cfg, draft_vocab=(1, 1, 2))
    with pytest.raises(ValueError, match="pass the map itself"):
        distill.EagleRecipe(target.config, dataclasses.replace(cfg, draft_vocab=8))
