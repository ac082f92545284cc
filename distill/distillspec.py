"""DistillSpec: distilling a draft model toward its target for speculative decoding.

Zhou et al. 2023, "DistillSpec: Improving Speculative Decoding via Knowledge Distillation".
The student q (the draft) is trained to match the frozen teacher p (the target) token by token
over the whole vocabulary, with a divergence D (`distill.losses`: FKL, RKL, JSD(beta), TVD) at
the verification temperature, on sequences from one of two sources:

  fixed       prompts with responses written by the target (or as stored in the data set);
  on-policy   responses the student writes itself, with its current parameters, at
              temperature `OnPolicy.temperature` (the GKD setting of Agarwal et al. 2024).

A mixture fraction lambda picks, per optimizer step, on-policy data with probability lambda
and fixed data otherwise (DistillSpec sec. 4.1, GKD Algorithm 1); lambda = 0 is plain
distillation on fixed data, lambda = 1 purely on-policy.

Choices the paper leaves open: the coin of step s is drawn from (seed, s) and on-policy
responses are sampled with key (seed, s), so a resumed run replays the same data; on-policy
sequences are the first user turns of the fixed data's conversations (`prompts`) rotated by
step, one sequence per row; the teacher's logits are computed inside the train step (never
stored). Lenient acceptance (`decoding.Speculative(lenience=...)`) combines with any trained
draft at evaluation time.

Legend: A micro-batches per step, B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import decoding

from . import data as data_mod
from . import lora as lora_mod
from .losses import Divergence, masked_sum, tvd


class TokenizerMismatch(ValueError):
    """Teacher and student do not share one vocabulary."""


def check_pair(teacher: decoding.Model, student: decoding.Model) -> None:
    """Token-level distillation needs one vocabulary: refuse a pair whose tokenizers differ."""
    try:
        decoding.check_same_tokenizer(teacher, student)
    except ValueError as err:
        raise TokenizerMismatch(
            f"teacher and student tokenizers differ ({err}). DistillSpec compares the two models' "
            "distributions token by token: pick a student from the teacher's family (same tokenizer), "
            "e.g. Qwen2.5-Coder-0.5B-Instruct for Qwen2.5-Coder-1.5B-Instruct.") from None


def segment_mask(segments: jax.Array) -> jax.Array:
    """bool[B, T, T]: causal attention within each packed sequence (`segments` int32[B, T])."""
    t = segments.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & (segments[:, :, None] == segments[:, None, :])


def model_logits(config, params: dict, batch: dict, options=None, return_hidden=()):
    """The common `decoding.forward` over a packed batch: (logits f32[B, T, V], hidden)."""
    tokens = batch["tokens"]
    b, t = tokens.shape
    cache = decoding.KVCache.init(config, b, t, params["embed"].dtype)
    out = decoding.forward(config, params, tokens, batch["positions"], cache, mask=segment_mask(batch["segments"]),
                           return_hidden=tuple(return_hidden), options=options)
    return out.logits, out.hidden


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """The DistillSpec recipe (static, hashable): student and teacher configs, the divergence,
    and optional LoRA adapters (else every student weight trains).

    trainable: {"student": params} or {"lora": adapters}; frozen: {"teacher": params} (+
    {"student": base params} under LoRA).
    """

    student: object
    teacher: object
    divergence: Divergence = Divergence("fkl")
    lora: lora_mod.LoRA | None = None
    options: decoding.Options | None = None

    name = "distillspec"

    def __post_init__(self):
        if self.student.vocab_size != self.teacher.vocab_size:
            raise TokenizerMismatch(
                f"student vocabulary {self.student.vocab_size} != teacher vocabulary {self.teacher.vocab_size}: "
                "distill a student that shares the teacher's tokenizer.")

    def init(self, student_params: dict, teacher_params: dict, *, key=None, frozen_dtype=jnp.bfloat16):
        """(trainable, frozen) pytrees for a run (frozen weights kept in `frozen_dtype`)."""
        to = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, frozen_dtype), tree)  # noqa: E731
        frozen = {"teacher": to(teacher_params)}
        if self.lora is None:
            return {"student": student_params}, frozen
        key = jax.random.PRNGKey(0) if key is None else key
        frozen["student"] = to(student_params)
        return {"lora": lora_mod.init_adapters(self.lora, student_params, key)}, frozen

    def student_params(self, trainable, frozen) -> dict:
        """The student's full parameters (adapters merged under LoRA)."""
        if self.lora is None:
            return trainable["student"]
        base = jax.tree.map(lambda x: x.astype(trainable["lora"][self.lora.targets[0]]["a"].dtype), frozen["student"])
        return lora_mod.merge(self.lora, base, trainable["lora"])

    def loss(self, trainable, frozen, batch: dict):
        """(sum of D over kept positions, (kept positions, {"acceptance": sum of 1 - TVD}))."""
        student = self.student_params(trainable, frozen)
        teacher = jax.lax.stop_gradient(frozen["teacher"])
        t_logits, _ = model_logits(self.teacher, teacher, batch, self.options)
        t_logits = jax.lax.stop_gradient(t_logits)
        s_logits, _ = model_logits(self.student, student, batch, self.options)
        div = self.divergence(t_logits, s_logits)
        total, count = masked_sum(div, batch["loss_mask"])
        accept = 1.0 - tvd(t_logits, jax.lax.stop_gradient(s_logits), self.divergence.temperature)
        accept_sum, _ = masked_sum(accept, batch["loss_mask"])
        return total, (count, {"acceptance": accept_sum})


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """On-policy data: fraction lambda of the steps use responses the student writes itself."""

    fraction: float = 0.0
    max_new_tokens: int = 128
    temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"on-policy fraction must be in [0, 1], got {self.fraction}.")


def batch_source(recipe: DistillSpec, fixed: data_mod.Batches, *, frozen, tokenizer, on_policy: OnPolicy | None = None,
                 prompts: Sequence[Sequence[int]] = (), seed: int = 0, compute_dtype=jnp.bfloat16):
    """`batches(step, trainable) -> {key: [A, B, T]}` mixing fixed and on-policy data.

    Step s is on-policy when a uniform draw from (seed, s) falls below `on_policy.fraction`;
    its A x B prompts are `prompts` from index s * A * B on (cyclically), answered by the
    current student through `decoding.generate` in one batch of A x B rows (sampled with seed
    (seed, s)).
    """
    from decoding import shapes

    if on_policy is None or on_policy.fraction == 0.0:
        return lambda step, trainable: fixed.batch(step)
    if not prompts:
        raise data_mod.DataError("on-policy distillation needs prompts (the first user turns of the training data).")
    a, b, t = fixed.accumulate, fixed.batch_size, fixed.seq_len
    longest = max(len(p) for p in prompts)
    if longest + on_policy.max_new_tokens > t:
        raise ValueError(f"on-policy sequences (prompts up to {longest} tokens + {on_policy.max_new_tokens} new) "
                         f"do not fit seq_len={t}: raise seq_len or lower max_new_tokens / the prompt length.")
    bucket = shapes.prompt_bucket(longest)
    sampling = decoding.Sampling(temperature=on_policy.temperature)
    cfg = recipe.student

    def batches(step: int, trainable):
        coin = np.random.default_rng([seed, step, 1]).random()
        if coin >= on_policy.fraction:
            return fixed.batch(step)
        params = jax.tree.map(lambda x: x.astype(compute_dtype), recipe.student_params(trainable, frozen))
        student = decoding.Model(config=cfg, params=params, tokenizer=tokenizer, source="student")
        idx = [(step * a * b + i) % len(prompts) for i in range(a * b)]
        rows = data_mod.generate_rows(student, [prompts[i] for i in idx], max_new_tokens=on_policy.max_new_tokens,
                                      batch_size=a * b, sampling=sampling, seed=int(seed * 1_000_003 + step),
                                      prompt_bucket=bucket, options=recipe.options)
        out = data_mod.one_row_each(rows, t)
        return {k: v.reshape(a, b, t) for k, v in out.items()}

    return batches
