"""Training Medusa heads on a frozen target (Cai et al. 2024, "Medusa", Medusa-1 training).

The target runs frozen inside the train step (`distill.distillspec.model_logits` over the
packed batch) and supplies both the features (its residual stream after the last layer) and
the labels; only the heads train. Head i (0-based) at position t predicts token t + 2 + i:

    hard labels (`soft=False`, Medusa-1 on target-written data): cross-entropy with the token
        t + 2 + i of the batch;
    soft labels (`soft=True`, Medusa's self-distillation): cross-entropy with the target's own
        distribution at position t + 1 + i (which predicts the same token).

The loss is sum_i decay^i * CE_i (Medusa's lambda_k = 0.8^k) over the positions whose label is
an assistant token of the same packed sequence as t (`loss_mask[t + 1 + i]`), divided by the kept
positions of head 0. Metrics per head: `top1_head{i}`, the fraction of positions where head i's
argmax equals the target's argmax at t + 1 + i (a greedy verifier's acceptance of that head,
given the earlier tokens).

Choices the paper leaves open: heads are trained one at a time inside the step (a Python loop
over k, so memory holds one [B, T, V] head output at a time, like the target's logits); the
target is kept in `frozen` (bf16 by default) and never differentiated.

Legend: B rows, T tokens, D hidden size, V vocabulary, k heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import decoding
from drafting import medusa as heads_mod

from .distillspec import model_logits
from .losses import masked_sum


@dataclasses.dataclass(frozen=True)
class MedusaRecipe:
    """Medusa heads for a frozen target (static, hashable).

    trainable: {"heads": {"w": [k, D, D], "b": [k, D]}}; frozen: {"target": params}.
    """

    target: object
    heads: heads_mod.MedusaConfig
    soft: bool = False
    decay: float = 0.8
    options: decoding.Options | None = None

    name = "medusa"

    def __post_init__(self):
        if (self.heads.hidden_size, self.heads.vocab_size) != (self.target.hidden_size, self.target.vocab_size):
            raise heads_mod.HeadMismatch(
                f"heads of hidden size {self.heads.hidden_size} / vocab {self.heads.vocab_size} do not fit the target "
                f"(hidden size {self.target.hidden_size} / vocab {self.target.vocab_size}): build the config with "
                "drafting.medusa.config_for(target, num_heads).")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}.")

    def init(self, target_params: dict, *, heads: dict | None = None, frozen_dtype=jnp.bfloat16):
        """(trainable, frozen) pytrees: zero-initialised heads (Medusa's init) unless given."""
        frozen = {"target": jax.tree.map(lambda x: jnp.asarray(x, frozen_dtype), target_params)}
        return {"heads": heads if heads is not None else heads_mod.init_heads(self.heads)}, frozen

    def head_params(self, trainable) -> dict:
        """The heads' parameters (what `drafting.medusa.save_heads` writes)."""
        return trainable["heads"]

    def loss(self, trainable, frozen, batch: dict):
        """(weighted CE sum, (kept positions of head 0, {"top1_head{i}": sums}))."""
        target = jax.lax.stop_gradient(frozen["target"])
        logits, hidden = model_logits(self.target, target, batch, self.options,
                                      return_hidden=(self.target.num_layers,))
        logits = jax.lax.stop_gradient(logits)  # [B, T, V]
        h = jax.lax.stop_gradient(hidden[self.target.num_layers])  # [B, T, D]
        heads = trainable["heads"]
        tokens, mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
        t = tokens.shape[1]
        total = jnp.zeros((), jnp.float32)
        count = None
        metrics = {}
        for i in range(self.heads.num_heads):
            j = i + 1  # the label of head i at position t is token t + 1 + j
            one = {"w": heads["w"][i:i + 1], "b": heads["b"][i:i + 1]}
            out = heads_mod.head_logits(self.target, target, one, h[:, : t - j])[:, :, 0]  # [B, T - j, V]
            logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
            if self.soft:
                p = jax.nn.softmax(logits[:, j:], axis=-1)
                ce = -jnp.sum(p * logp, axis=-1)
            else:
                label = jnp.concatenate([tokens[:, j + 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [B, T - j]
                ce = -jnp.take_along_axis(logp, label[..., None], axis=-1)[..., 0]
            m = mask[:, j:] * (batch["segments"][:, : t - j] == batch["segments"][:, j:])  # one packed sequence
            loss_i, count_i = masked_sum(ce, m)
            total = total + (self.decay ** i) * loss_i
            count = count_i if count is None else count
            hit = (jnp.argmax(out, axis=-1) == jnp.argmax(logits[:, j:], axis=-1)).astype(jnp.float32)
            metrics[f"top1_head{i}"] = masked_sum(jax.lax.stop_gradient(hit), m)[0]
        metrics["acceptance"] = metrics["top1_head0"]
        return total, (count, metrics)


def drafter(target: decoding.Model, recipe: MedusaRecipe, trainable) -> decoding.Model:
    """The trained heads as the `draft=` model of `decoding.generate` (cast to the target's dtype)."""
    dtype = target.params["embed"].dtype
    heads = jax.tree.map(lambda x: jnp.asarray(x, dtype), recipe.head_params(trainable))
    return heads_mod.as_draft(target, recipe.heads, heads)
