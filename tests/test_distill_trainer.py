"""The trainer and DistillSpec on a tiny teacher/student pair loaded through decoding.load:
training lowers the divergence and raises the acceptance rate of our own speculative decoding;
a killed run resumes to bitwise the same parameters; no recompilation between steps; LoRA
merged equals LoRA applied; bad inputs are clear errors."""

from __future__ import annotations

import functools
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import distill
from distill import data as D
from distill import lora as L
from test_distill_models import CONVERSATIONS, pair, pruned_student, save_tiny, tokenizer
from tiny import compile_events

SEQ = 128


@functools.lru_cache(maxsize=None)
def teacher_written():
    """Packed teacher-written (greedy) answers to the tiny conversations' first questions."""
    teacher, _ = pair()
    ds = datasets.Dataset.from_dict({"messages": CONVERSATIONS})
    return D.pack(D.regenerate(ds, teacher, max_new_tokens=32, max_prompt_len=SEQ, batch_size=8), SEQ)


def held_out_prompts():
    """Questions the training data does not hold (other numbers)."""
    teacher, _ = pair()
    msgs = [[{"role": "user", "content": f"Question {i}: how many eggs does Janet sell in {i} days?"}]
            for i in range(50, 66)]
    return [D.prompt_ids(teacher.tokenizer, m, SEQ) for m in msgs]


def make_trainer(out_dir, *, steps=40, divergence="fkl", lora=None, on_policy=None, evaluate=False, lr=3e-3,
                 checkpoint_every=100, student=None):
    teacher, default_student = pair()
    student = student or default_student
    cfg = distill.TrainConfig(steps=steps, batch_size=4, accumulate=2, seq_len=SEQ, learning_rate=lr, warmup_steps=5,
                              compute_dtype="float32", log_every=10, checkpoint_every=checkpoint_every)
    recipe = distill.DistillSpec(student.config, teacher.config, distill.Divergence(divergence), lora=lora)
    trainable, frozen = recipe.init(student.params, teacher.params, frozen_dtype=jnp.float32)
    fixed = D.Batches(teacher_written(), cfg.batch_size, cfg.accumulate, seed=0)
    prompts = held_out_prompts()
    train_prompts = [D.prompt_ids(teacher.tokenizer, m, SEQ) for m in CONVERSATIONS]
    batches = distill.batch_source(recipe, fixed, frozen=frozen, tokenizer=teacher.tokenizer, on_policy=on_policy,
                                   prompts=train_prompts, seed=0, compute_dtype=jnp.float32)

    def ev(params):
        drafter = decoding.Model(student.config, recipe.student_params(params, frozen), student.tokenizer)
        return distill.acceptance(teacher, drafter, prompts, gamma=3, max_new_tokens=32, batch_size=8)

    return distill.Trainer(recipe, cfg, trainable, frozen, batches, out_dir=out_dir, evaluate=ev if evaluate else None,
                           identity={"student": distill.checkpoint.config_dict(student.config)}, progress=False)


def test_training_lowers_the_divergence_and_raises_acceptance(tmp_path):
    """150 TVD steps on teacher-written data: the divergence falls, and the acceptance rate and
    tau of our greedy speculative decoding on held-out prompts rise."""
    trainer = make_trainer(tmp_path, steps=150, divergence="tvd", evaluate=True, lr=1e-2, student=pruned_student())
    before = trainer.evaluate(trainer.params)
    summary = trainer.run()
    rows = distill.trainer.read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert train[-1]["acceptance"] > train[0]["acceptance"] + 0.1  # 1 - TVD on the training batches
    after = summary["eval"]
    assert after["acceptance_rate"] > before["acceptance_rate"] + 0.1, (before, after)
    assert after["acceptance_per_position"][0] > before["acceptance_per_position"][0]
    assert after["tau"] > before["tau"] + 0.25, (before, after)
    assert summary["tokens_per_s"] > 0 and (tmp_path / "plot.png").is_file()


def test_steps_do_not_recompile(tmp_path):
    trainer = make_trainer(tmp_path, steps=8)
    trainer.run(steps=2)
    with compile_events() as events:
        trainer.run(steps=8)
    assert trainer.step == 8
    assert not [e for e in events if "train_step" in e], events


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("on_policy", [None, distill.OnPolicy(fraction=0.5, max_new_tokens=16)],
                         ids=["fixed", "on_policy"])
def test_a_killed_run_resumes_bitwise(tmp_path, on_policy):
    """Kill after step 7 (checkpoints every 3 steps: the last one is step 6), resume, finish at
    10: every parameter equals an uninterrupted run's, bit for bit."""
    straight = make_trainer(tmp_path / "straight", steps=10, on_policy=on_policy, checkpoint_every=3)
    straight.run()
    want = jax.device_get(straight.params)

    killed = make_trainer(tmp_path / "killed", steps=10, on_policy=on_policy, checkpoint_every=3)
    inner = killed.batches

    def dies_at_8(step, params):
        if step == 7:
            raise Killed
        return inner(step, params)

    killed.batches = dies_at_8
    with pytest.raises(Killed):
        killed.run()
    assert killed.step == 7
    resumed = make_trainer(tmp_path / "killed", steps=10, on_policy=on_policy, checkpoint_every=3)
    assert resumed.step == 6
    resumed.run()
    got = jax.device_get(resumed.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in distill.trainer.read_jsonl(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_lora_merged_equals_applied_and_trains(tmp_path):
    _, student = pair()
    lora = L.LoRA(rank=4, alpha=8.0)
    adapters = L.init_adapters(lora, student.params, jax.random.PRNGKey(1))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
    merged = L.merge(lora, student.params, adapters)
    x = np.random.default_rng(0).normal(size=(3, student.config.hidden_size)).astype(np.float32)
    for name in lora.targets:
        a, b = np.asarray(adapters[name]["a"], np.float64), np.asarray(adapters[name]["b"], np.float64)
        for layer in range(student.config.num_layers):
            w = np.asarray(student.params["layers"][name][layer], np.float64)
            xin = x if w.shape[0] == x.shape[1] else np.random.default_rng(layer).normal(size=(3, w.shape[0]))
            applied = xin @ w + lora.scale * (xin @ a[layer]) @ b[layer]
            np.testing.assert_allclose(xin @ np.asarray(merged["layers"][name][layer], np.float64), applied,
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                np.asarray(L.apply(lora, jnp.asarray(xin, jnp.float32), student.params["layers"][name][layer],
                                   {"a": adapters[name]["a"][layer], "b": adapters[name]["b"][layer]})),
                applied, rtol=1e-4, atol=1e-4)
    untouched = [k for k in student.params["layers"] if k not in lora.targets]
    for k in untouched:
        np.testing.assert_array_equal(np.asarray(merged["layers"][k]), np.asarray(student.params["layers"][k]))
    # an untrained adapter changes nothing; training only moves the adapters and lowers the loss
    fresh = L.merge(lora, student.params, L.init_adapters(lora, student.params, jax.random.PRNGKey(3)))
    for u, v in zip(jax.tree.leaves(fresh), jax.tree.leaves(student.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    trainer = make_trainer(tmp_path, steps=30, lora=lora, lr=3e-2, student=pruned_student())
    assert set(trainer.params) == {"lora"}
    trainer.run()
    train = [r for r in distill.trainer.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    print(train[0]["loss"], train[-1]["loss"])
    assert train[-1]["loss"] < 0.85 * train[0]["loss"]


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, steps=2).run()
    teacher, student = pair()
    other = decoding.load(str(save_tiny(tmp_path / "wider", 1, 3, tokenizer(), hidden=48)), dtype=jnp.float32)
    with pytest.raises(distill.CheckpointMismatch, match="another model.*train into another output directory"):
        make_trainer(tmp_path, steps=2, student=other)


def test_different_tokenizers_are_refused(tmp_path):
    teacher, student = pair()
    other_tok = tokenizer(corpus="Completely different words make another vocabulary: zebra quartz jumping fox. ")
    assert other_tok.get_vocab() != teacher.tokenizer.get_vocab()
    other = decoding.load(str(save_tiny(tmp_path / "other", 1, 4, other_tok)), dtype=jnp.float32)
    with pytest.raises(distill.TokenizerMismatch, match="teacher and student tokenizers differ.*same tokenizer"):
        distill.check_pair(teacher, other)
    distill.check_pair(teacher, student)
    small = decoding.load(str(save_tiny(tmp_path / "small", 1, 4, tokenizer(vocab=300))), dtype=jnp.float32)
    with pytest.raises(distill.TokenizerMismatch, match="vocabulary"):
        distill.DistillSpec(small.config, teacher.config)
