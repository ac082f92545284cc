"""Training hidden-transfer maps on a frozen target (Wu et al. 2024, "Parallel Decoding via Hidden
Transfer for Lossless Large Language Model Acceleration", arXiv 2404.12022).

The target stays frozen; only the k transfer maps at layer l train (`drafting.hidden_transfer`).
For every position p of a packed training sequence at once, pseudo state (p, i) (i = 1..k, at
rope position p + i) is `transfer(maps, h_l[p])` run through layers [l, L) seeing the real
positions q <= p of its own sequence and pseudo (p, 1..i); its distribution Q_{p,i} (the
target's norm and head) is trained towards the target's own next-token distribution at real
position p + i, P_{p+i} (which predicts token p + i + 1, the token pseudo (p, i) drafts):

    loss = sum_i decay^(i-1) sum_p m_{p,i} KL(P_{p+i} || Q_{p,i}),
    m_{p,i} = loss_mask[p + i] (token p + i + 1 is an assistant token) and p + i in p's sequence,

divided by the kept positions of i = 1 (as `distill.medusa`). Online: the target's logits, its
layer-l states and its keys/values come from the train step's own forward; nothing is written.

One forward of the upper layers over real + T * k pseudo positions, made cheaper exactly: the
real positions never attend to pseudo positions, so their keys/values in layers [l, L) are the
target's own; the step runs the frozen target once over the T real tokens into a cache of
T + T k slots, then layers [l, L) over the T k pseudo positions only, with a slot mask (pseudo
(p, i) sees real slots q <= p of its sequence and pseudo slots (p, i' <= i)). Equal to the
structured-mask forward over T (1 + k) positions, at T k query rows instead of T (1 + k) and
with no gradient through the target. Attention cost O(T k (T + T k)) per layer: keep T modest
(512) for k of 3-5. (For architectures with a sliding window the window is then measured in
slots, i.e. exact for unpacked rows only; Qwen2.5 and Llama have none.)

Choices the paper leaves open: the maps train as w = I + delta (delta and b start at zero: the
identity init of `drafting.hidden_transfer.init_maps`, and AdamW's weight decay pulls towards
the identity, not towards zero); the forward KL to the target's full distribution (the issue's
loss); per-position weights decay^(i-1) with decay = 1 by default. Metrics: `top1_pos{i}`, the
fraction of kept positions where Q_{p,i}'s argmax equals P_{p+i}'s (a greedy chain's
acceptance of depth i given the earlier tokens), `acceptance` = `top1_pos1`.

Legend: B rows, T tokens, k maps, D hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import decoding
from drafting import hidden_transfer as ht

from .distillspec import segment_mask
from .losses import masked_sum


def pseudo_slot_mask(segments: jax.Array, k: int) -> jax.Array:
    """bool[B, T k, T + T k]: which slots pseudo (p, i) (row p k + i) sees: real slots q <= p of
    p's packed sequence, and pseudo slots T + p k + i' for i' <= i."""
    b, t = segments.shape
    seg = segment_mask(segments)  # [B, T, T]
    real = jnp.repeat(seg, k, axis=1)  # [B, T k, T]
    diag = seg & jnp.eye(t, dtype=bool)  # same p (traced: nothing for XLA to constant-fold)
    own = diag[:, :, None, :, None] & jnp.tril(jnp.ones((k, k), bool))[None, None, :, None, :]  # and i' <= i
    return jnp.concatenate([real, own.reshape(b, t * k, t * k)], axis=2)


def pseudo_outputs(config, params: dict, maps: dict, layer: int, batch: dict, options=None):
    """The frozen target over a packed batch plus every pseudo position: (target logits
    f32[B, T, V], pseudo outputs [B, T, k, D] after the last layer, before the final norm).
    Gradients flow to `maps` only through the pseudo positions."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segments"]
    b, t = tokens.shape
    k = maps["w"].shape[0]
    cache = decoding.KVCache.init(config, b, t + t * k, params["embed"].dtype)
    out = decoding.forward(config, params, tokens, positions, cache, mask=segment_mask(segments),
                           return_hidden=(layer,), options=options)
    logits = jax.lax.stop_gradient(out.logits)
    h = jax.lax.stop_gradient(out.hidden[layer])
    cache = jax.lax.stop_gradient(out.cache)  # lengths = T: the real tokens' keys/values
    x = ht.transfer(maps, h).reshape(b, t * k, h.shape[-1])
    pos = ht.pseudo_positions(positions, k).reshape(b, t * k)
    y, _, _ = decoding.run_layers(config, params, x, pos, cache, slot_mask=pseudo_slot_mask(segments, k),
                                  layers=(layer, config.num_layers), options=options)
    return logits, y.reshape(b, t, k, y.shape[-1])


@dataclasses.dataclass(frozen=True)
class HiddenTransferRecipe:
    """Hidden-transfer maps for a frozen target (static, hashable).

    trainable: {"delta": [k, D, D], "b": [k, D]} (maps w = I + delta); frozen: {"target": params}.
    """

    target: object
    maps: ht.TransferConfig
    decay: float = 1.0
    options: decoding.Options | None = None

    name = "hidden_transfer"

    def __post_init__(self):
        t, m = self.target, self.maps
        if (m.hidden_size, m.vocab_size, m.num_layers) != (t.hidden_size, t.vocab_size, t.num_layers):
            raise ht.TransferMismatch(
                f"maps for hidden size {m.hidden_size} / vocab {m.vocab_size} / {m.num_layers} layers do not fit "
                f"the target (hidden size {t.hidden_size} / vocab {t.vocab_size} / {t.num_layers} layers): build the "
                "config with drafting.hidden_transfer.config_for(target, k, layer).")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}.")

    def init(self, target_params: dict, *, maps: dict | None = None, frozen_dtype=jnp.bfloat16):
        """(trainable, frozen) pytrees: identity maps (delta = 0, b = 0) unless `maps` are given."""
        frozen = {"target": jax.tree.map(lambda x: jnp.asarray(x, frozen_dtype), target_params)}
        start = maps if maps is not None else ht.init_maps(self.maps)
        eye = jnp.eye(self.maps.hidden_size, dtype=jnp.float32)
        delta = jnp.asarray(start["w"], jnp.float32) - eye
        return {"delta": delta, "b": jnp.asarray(start["b"], jnp.float32)}, frozen

    def map_params(self, trainable) -> dict:
        """The maps {"w": I + delta, "b"} (what `drafting.hidden_transfer.save_maps` writes)."""
        delta = trainable["delta"]
        eye = jnp.eye(delta.shape[-1], dtype=jnp.float32)
        return {"w": (eye + delta.astype(jnp.float32)).astype(delta.dtype), "b": trainable["b"]}

    def loss(self, trainable, frozen, batch: dict):
        """(weighted KL sum, (kept positions of i = 1, {"top1_pos{i}": sums, "acceptance"}))."""
        target = jax.lax.stop_gradient(frozen["target"])
        maps = self.map_params(trainable)
        logits, pseudo = pseudo_outputs(self.target, target, maps, self.maps.layer, batch, self.options)
        mask = batch["loss_mask"].astype(jnp.float32)
        seg = batch["segments"]
        t = logits.shape[1]
        total = jnp.zeros((), jnp.float32)
        count = None
        metrics = {}
        for i in range(1, self.maps.num_maps + 1):  # one [B, T, V] output at a time
            q = ht.pseudo_logits(self.target, target, pseudo[:, : t - i, i - 1])  # [B, T - i, V]
            logq = jax.nn.log_softmax(q.astype(jnp.float32), axis=-1)
            logp = jax.nn.log_softmax(logits[:, i:].astype(jnp.float32), axis=-1)
            kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
            m = mask[:, i:] * (seg[:, : t - i] == seg[:, i:])  # one packed sequence
            loss_i, count_i = masked_sum(kl, m)
            total = total + (self.decay ** (i - 1)) * loss_i
            count = count_i if count is None else count
            hit = (jnp.argmax(q, axis=-1) == jnp.argmax(logits[:, i:], axis=-1)).astype(jnp.float32)
            metrics[f"top1_pos{i}"] = masked_sum(jax.lax.stop_gradient(hit), m)[0]
        metrics["acceptance"] = metrics["top1_pos1"]
        return total, (count, metrics)


def drafter(target: decoding.Model, recipe: HiddenTransferRecipe, trainable) -> decoding.Model:
    """The trained maps as the `draft=` model of `decoding.generate` (cast to the target's dtype)."""
    dtype = target.params["embed"].dtype
    maps = jax.tree.map(lambda x: jnp.asarray(x, dtype), recipe.map_params(trainable))
    return ht.as_draft(target, recipe.maps, maps)
