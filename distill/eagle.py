"""Training the EAGLE-3-style head with training-time test (Li et al. 2025, "EAGLE-3").

The target runs frozen inside the train step on the packed batch and supplies the features
(its residual stream after the head's three layers) and the soft labels (its own next-token
distributions); only the head (`drafting.eagle`) trains. Training-time test unrolls the head
`len(weights)` steps the way decoding uses it:

  step 0   pairs (target feature f_p, token p + 1) at every position p, causal within each
           packed sequence: the head's output at p predicts token p + 2;
  step s   pairs (the head's own step s-1 output at p - 1, token p + 1): the query at p sees the
           step-0 keys of positions <= p - s (target features, as the head cache holds them at
           decoding time) and its own chain, the step-j key of position p - s + j for
           1 <= j <= s: exactly what a chain draft at depth s + 1 sees after the prefix p - s.

Step s's loss is the cross-entropy of the head's distribution at p against the target's at
p + 1, over positions whose label is an assistant token and whose chain start p - s lies in
the same packed sequence, weighted by `weights[s]`; the loss is divided by the kept positions
of step 0. Metrics: `top1_step{s}` (the head's argmax equals the target's).

Reduced draft vocabulary (EAGLE-3, `draft_vocab=`): the head's own `lm_head: [D, Vd]` over the
most frequent label tokens of the training data; its target is the target's distribution
restricted to those Vd tokens and renormalised, and positions whose target argmax falls outside
them are dropped from the loss (EAGLE-3's rule); `top1_step{s}` maps the head's argmax back
through d2t.

Choices the paper leaves open: the chain uses the data's tokens (teacher forcing of tokens, the
head's own features), and the keys of all steps live in one buffer of `len(weights) * T` slots
read through a slot mask, so each step is one call of the family's decoder layer.

Legend: B rows, T tokens, D hidden size, V vocabulary, k unrolled steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import decoding
from drafting import eagle as head_mod
from drafting import HeadMismatch

from .distillspec import model_logits, segment_mask
from .losses import masked_sum


def ttt_slot_mask(segments: jax.Array, step: int, steps: int) -> jax.Array:
    """bool[B, T, steps * T]: what the step-`step` query at p sees (module doc)."""
    t = segments.shape[-1]
    p = jnp.arange(t)[:, None]
    q = jnp.arange(t)[None, :]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0)
    blocks = [(q <= p - step)[None] & same]
    blocks += [(q == p - step + j)[None] & same for j in range(1, step + 1)]
    blocks += [jnp.zeros_like(same)] * (steps - 1 - step)
    return jnp.concatenate(blocks, axis=-1)


def unroll(target_config, target_params: dict, head: dict, layers, batch: dict, steps: int, options=None):
    """Training-time test: (target logits f32[B, T, V], [head logits f32[B, T, V or Vd]] * steps);
    a head with a draft vocabulary (`head["d2t"]`) gives its Vd logits in draft ids."""
    feat_layers = tuple(sorted(set(layers)))
    logits, hidden = model_logits(target_config, target_params, batch, options, return_hidden=feat_layers)
    logits = jax.lax.stop_gradient(logits)
    hidden = {i: jax.lax.stop_gradient(h) for i, h in hidden.items()}
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segments"]
    b, t = tokens.shape
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    dtype = target_params["embed"].dtype
    cache = decoding.KVCache.init(head_mod.layer_config(target_config), b, steps * t, dtype)
    feats = head_mod.fuse(head, hidden, layers)
    outs = []
    for s in range(steps):
        cache = cache.truncate(jnp.full((b,), s * t, jnp.int32))
        if s == 0:
            lg, out, cache = head_mod.head_forward(target_config, target_params, head, cache, feats, nxt, positions,
                                                   mask=segment_mask(segments), options=options, draft_ids=True)
        else:
            lg, out, cache = head_mod.head_forward(target_config, target_params, head, cache, feats, nxt, positions,
                                                   slot_mask=ttt_slot_mask(segments, s, steps), options=options,
                                                   draft_ids=True)
        outs.append(lg)
        feats = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)  # own output at p - 1
    return logits, outs


@dataclasses.dataclass(frozen=True)
class EagleRecipe:
    """The EAGLE-3-style head for a frozen target (static, hashable).

    trainable: {"head": params}; frozen: {"target": params}. `weights`: the loss weight of each
    unrolled step (its length is the training-time-test depth). `draft_vocab`: None (the
    target's head) or the reduced draft vocabulary d2t (`drafting.eagle.reduced_vocab` of
    `distill.data.token_counts`), target ids ascending; the head then trains its own
    `lm_head: [D, Vd]` (initialised from the target's head columns) and `head.draft_vocab` is
    set to its size.
    """

    target: object
    head: head_mod.EagleConfig
    weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    options: decoding.Options | None = None
    draft_vocab: tuple[int, ...] | None = None

    name = "eagle3"

    def __post_init__(self):
        if self.draft_vocab is not None:
            d2t = tuple(int(i) for i in np.asarray(self.draft_vocab).reshape(-1))
            if not d2t or len(set(d2t)) != len(d2t) or min(d2t) < 0 or max(d2t) >= self.target.vocab_size:
                raise ValueError(f"draft_vocab must be distinct target ids in [0, {self.target.vocab_size}) "
                                 "(drafting.eagle.reduced_vocab(distill.data.token_counts(packed, V), size)).")
            object.__setattr__(self, "draft_vocab", tuple(sorted(d2t)))
            object.__setattr__(self, "head", dataclasses.replace(self.head, draft_vocab=len(d2t)))
        elif self.head.draft_vocab:
            raise ValueError(f"the head config names a draft vocabulary of {self.head.draft_vocab} tokens: pass the "
                             "map itself as EagleRecipe(..., draft_vocab=drafting.eagle.reduced_vocab(counts, size)).")
        if (self.head.hidden_size, self.head.vocab_size) != (self.target.hidden_size, self.target.vocab_size):
            raise HeadMismatch(f"an EAGLE head of hidden size {self.head.hidden_size} does not fit the target "
                               f"(hidden size {self.target.hidden_size}): build its config with "
                               "drafting.eagle.config_for(target).")
        if not self.weights or any(w < 0 for w in self.weights):
            raise ValueError(f"weights must be one non-negative weight per unrolled step, got {self.weights}.")

    def init(self, target_params: dict, key: jax.Array, *, frozen_dtype=jnp.bfloat16, scale: float = 0.02):
        frozen = {"target": jax.tree.map(lambda x: jnp.asarray(x, frozen_dtype), target_params)}
        head = head_mod.init_head(self.target, key, scale, d2t=self.draft_vocab)
        if self.draft_vocab is not None:
            del head["d2t"]  # a constant of the recipe, not a trained parameter
            head["lm_head"] = head_mod.target_head_columns(self.target, target_params, self.draft_vocab).astype(jnp.float32)
        return {"head": head}, frozen

    def head_params(self, trainable) -> dict:
        """The head's parameters as decoding reads them (with `d2t` for a draft vocabulary)."""
        if self.draft_vocab is None:
            return trainable["head"]
        return {**trainable["head"], "d2t": jnp.asarray(self.draft_vocab, jnp.int32)}

    def loss(self, trainable, frozen, batch: dict):
        """(weighted CE sum over the unrolled steps, (kept positions of step 0, {"top1_step{s}": sums}))."""
        target = jax.lax.stop_gradient(frozen["target"])
        head = self.head_params(trainable)
        steps = len(self.weights)
        t_logits, outs = unroll(self.target, target, head, self.head.layers, batch, steps, self.options)
        segments, mask = batch["segments"], batch["loss_mask"].astype(jnp.float32)
        t = segments.shape[1]
        t_top = jnp.argmax(t_logits[:, 1:], axis=-1)  # the target's next-token argmax at p + 1
        label_ok = mask[:, 1:] * (segments[:, 1:] == segments[:, :-1])  # token p + 2 is an assistant token
        if self.draft_vocab is None:
            p_next = jax.nn.softmax(t_logits[:, 1:], axis=-1)  # the target's distribution at p + 1
            to_target = None
        else:  # EAGLE-3: the target's law restricted to the draft vocabulary; positions whose argmax is outside are dropped
            to_target = jnp.asarray(self.draft_vocab, jnp.int32)
            p_next = jax.nn.softmax(jnp.take(t_logits[:, 1:], to_target, axis=-1), axis=-1)
            in_vocab = jnp.zeros((self.target.vocab_size,), bool).at[to_target].set(True)
            label_ok = label_ok * in_vocab[t_top].astype(jnp.float32)
        total, count, metrics = jnp.zeros((), jnp.float32), None, {}
        for s, w in enumerate(self.weights):
            start = jnp.concatenate([jnp.zeros_like(segments[:, :s]), segments[:, : t - s]], axis=1)[:, :-1]
            keep = label_ok * (start == segments[:, :-1])  # the chain start p - s is in the same sequence
            logp = jax.nn.log_softmax(outs[s][:, :-1].astype(jnp.float32), axis=-1)
            ce = -jnp.sum(p_next * logp, axis=-1)
            loss_s, count_s = masked_sum(ce, keep)
            total = total + w * loss_s
            count = count_s if count is None else count
            top = jnp.argmax(outs[s][:, :-1], axis=-1)
            top = top if to_target is None else to_target[top]
            hit = (top == t_top).astype(jnp.float32)
            metrics[f"top1_step{s}"] = masked_sum(jax.lax.stop_gradient(hit), keep)[0]
        metrics["acceptance"] = metrics["top1_step0"]
        return total, (count, metrics)


def drafter(target: decoding.Model, recipe: EagleRecipe, trainable) -> decoding.Model:
    """The trained head as the `draft=` model of `decoding.generate` (cast to the target's dtype)."""
    dtype = target.params["embed"].dtype
    head = {k: v if k == "d2t" else jax.tree.map(lambda x: jnp.asarray(x, dtype), v)
            for k, v in recipe.head_params(trainable).items()}
    return head_mod.as_draft(target, recipe.head, head)
