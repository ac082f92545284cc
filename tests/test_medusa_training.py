"""Training Medusa heads (distill/medusa.py) on a tiny target loaded through decoding.load.

- The loss's label alignment: on a hand-made packed batch (two sequences in one row), the hard
  and soft losses equal a position-by-position numpy computation in which head i at position t
  predicts token t + 2 + i only inside one sequence and only where that token is an assistant
  token.
- A short run on target-written data lowers the loss and raises the heads' greedy acceptance
  measured end to end (tau of `Speculative(Medusa())` on held-out prompts).
- The trained heads survive save / load (bf16 file) and decode losslessly; a recipe for heads
  of another size is refused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import distill
from distill import data as D
from drafting import Medusa, medusa
from test_distill_models import pair
from test_distill_trainer import SEQ, held_out_prompts, teacher_written


LR = 5e-2


def _batch():
    """One row: a 6-token sequence then a 5-token one, then padding; assistant tokens marked."""
    t = 16
    tokens = np.array([[5, 9, 11, 3, 7, 2, 4, 4, 8, 13, 6, 0, 0, 0, 0, 0]], np.int32)
    segments = np.array([[1] * 6 + [2] * 5 + [0] * 5], np.int32)
    positions = np.array([list(range(6)) + list(range(5)) + [0] * 5], np.int32)
    loss = np.zeros((1, t), np.float32)
    loss[0, 1:5] = 1  # tokens 2..5 of sequence 1 are assistant tokens
    loss[0, 7:10] = 1  # tokens 8..10 of sequence 2
    return {"tokens": tokens, "positions": positions, "segments": segments, "loss_mask": loss}


@pytest.mark.parametrize("soft", [False, True])
def test_loss_aligns_each_head_with_its_token(soft):
    target, _ = pair()
    cfg = medusa.config_for(target, 3)
    recipe = distill.MedusaRecipe(target.config, cfg, soft=soft, decay=0.5)
    heads = medusa.init_heads(cfg, jax.random.PRNGKey(0), scale=1.0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    total, (count, metrics) = recipe.loss({"heads": heads}, {"target": target.params}, batch)

    logits, hidden = distill.distillspec.model_logits(target.config, target.params, batch,
                                                      return_hidden=(target.config.num_layers,))
    h = hidden[target.config.num_layers][0]
    out = np.asarray(medusa.head_logits(target.config, target.params, heads, h), np.float64)  # [T, k, V]
    logp = out - np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1, keepdims=True)) - out.max(-1, keepdims=True)
    tl = np.asarray(logits[0], np.float64)
    tp = np.exp(tl - tl.max(-1, keepdims=True))
    tp /= tp.sum(-1, keepdims=True)
    seg, tok, lm = _batch()["segments"][0], _batch()["tokens"][0], _batch()["loss_mask"][0]
    want, kept0 = 0.0, 0
    for i in range(3):
        for t in range(16):
            lab = t + 2 + i
            if lab >= 16 or seg[t] == 0 or seg[lab] != seg[t] or not lm[lab - 1]:
                continue
            ce = -(tp[lab - 1] @ logp[t, i]) if soft else -logp[t, i, tok[lab]]
            want += 0.5 ** i * ce
            kept0 += i == 0
    assert kept0 == 4 + 3  # head 0: labels 2..5 (t = 0..3) and 8..10 (t = 6..8)
    assert float(count) == kept0
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    assert set(metrics) == {"top1_head0", "top1_head1", "top1_head2", "acceptance"}


@functools.lru_cache(maxsize=None)
def trained(tmp: str):
    target, _ = pair()
    cfg = medusa.config_for(target, 3)
    recipe = distill.MedusaRecipe(target.config, cfg)
    trainable, frozen = recipe.init(target.params, frozen_dtype=jnp.float32)
    tc = distill.TrainConfig(steps=120, batch_size=4, accumulate=2, seq_len=SEQ, learning_rate=LR, warmup_steps=5,
                             compute_dtype="float32", log_every=10, checkpoint_every=1000)
    batches = D.Batches(teacher_written(), tc.batch_size, tc.accumulate, seed=0)

    def ev(params):
        return distill.acceptance(target, distill.medusa.drafter(target, recipe, params), held_out_prompts(), gamma=3,
                                  max_new_tokens=32, batch_size=8, drafter=Medusa())

    trainer = distill.Trainer(recipe, tc, trainable, frozen, lambda s, p: batches.batch(s), out_dir=tmp, evaluate=ev,
                              progress=False)
    before = trainer.evaluate(trainer.params)
    summary = trainer.run()
    return recipe, trainer, before, summary


def test_training_raises_the_heads_acceptance(tmp_path_factory):
    recipe, trainer, before, summary = trained(str(tmp_path_factory.mktemp("medusa")))
    rows = distill.trainer.read_jsonl(trainer.metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    for i in range(3):  # every head's top-1 agreement with the target rises on the training batches
        assert train[-1][f"top1_head{i}"] > train[0][f"top1_head{i}"] + 0.1, (train[0], train[-1])
    after = summary["eval"]  # greedy decoding of held-out prompts: deterministic figures
    assert after["tau"] > before["tau"] + 0.1, (before, after)
    assert after["acceptance_per_position"][0] > before["acceptance_per_position"][0] + 0.05, (before, after)


def test_trained_heads_save_load_and_decode_losslessly(tmp_path_factory, tmp_path):
    recipe, trainer, _, _ = trained(str(tmp_path_factory.mktemp("medusa")))
    target, _ = pair()
    path = medusa.save_heads(tmp_path / "heads.safetensors", recipe.heads, recipe.head_params(trainer.params))
    heads = medusa.load_heads(path, target)
    prompts = held_out_prompts()[:4]
    ar = decoding.generate(target, prompts, max_new_tokens=24, eos_token_id=())
    out = decoding.generate(target, prompts, strategy=decoding.Speculative(Medusa(), gamma=3), draft=heads,
                            max_new_tokens=24, eos_token_id=())
    assert out.tokens == ar.tokens
    assert out.stats.extra["accepted_per_round"] > 0.1  # the trained heads are accepted (untrained: ~0.02)


def test_recipe_refuses_heads_of_another_size():
    target, _ = pair()
    cfg = medusa.MedusaConfig(num_heads=2, hidden_size=16, vocab_size=target.config.vocab_size)
    with pytest.raises(medusa.HeadMismatch, match="do not fit the target"):
        distill.MedusaRecipe(target.config, cfg)


def test_a_killed_run_resumes_to_the_same_heads(tmp_path):
    target, _ = pair()
    recipe = distill.MedusaRecipe(target.config, medusa.config_for(target, 2), soft=True)
    tc = distill.TrainConfig(steps=6, batch_size=2, accumulate=1, seq_len=SEQ, learning_rate=LR, warmup_steps=1,
                             compute_dtype="float32", log_every=1, checkpoint_every=3)
    batches = D.Batches(teacher_written(), tc.batch_size, tc.accumulate, seed=1)

    def make(out):
        trainable, frozen = recipe.init(target.params, frozen_dtype=jnp.float32)
        return distill.Trainer(recipe, tc, trainable, frozen, lambda s, p: batches.batch(s), out_dir=out,
                               progress=False)

    whole = make(tmp_path / "whole")
    whole.run()
    part = make(tmp_path / "part")
    part.run(steps=3)  # stops after the checkpoint of step 3
    resumed = make(tmp_path / "part")
    assert resumed.step == 3
    resumed.run()
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(whole.params["heads"]["w"]), 0.0)  # it trained
