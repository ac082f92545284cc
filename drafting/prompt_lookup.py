"""Prompt lookup decoding: draft by copying what followed the last n-gram earlier in the context.

Training-free n-gram drafting (Saxena 2023, "Prompt Lookup Decoding"; the n-gram proposer of
vLLM and transformers' `prompt_lookup_num_tokens`). For n from `max_ngram` down to
`min_ngram`, find the most recent earlier occurrence of the context's last n tokens; the
tokens that followed it are the proposal (at most gamma, at most what the context holds).
Rows with no match propose nothing and take a plain target step. Proposals are
deterministic, so sampled verification uses the one-hot rule (lossless).

Legend: B batch, C context slots, G gamma.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .proposer import View
from .shapes import chain_batch


def lookup(context: jax.Array, length: jax.Array, gamma: int, max_ngram: int, min_ngram: int):
    """(drafts: int32[B, G], n_proposed: int32[B]) from `context: int32[B, C]` of `length[B]`."""
    b, c = context.shape
    rows = jnp.arange(b)
    s = jnp.arange(c, dtype=jnp.int32)[None, :]
    found = jnp.zeros((b,), bool)
    start = jnp.zeros((b,), jnp.int32)  # first continuation slot
    for n in range(max_ngram, min_ngram - 1, -1):
        match = (s + n < length[:, None]) & (length[:, None] >= n + 1)
        for j in range(n):
            want = context[rows, jnp.maximum(length - n + j, 0)]
            shifted = jnp.concatenate([context[:, j:], jnp.zeros((b, j), context.dtype)], axis=1)
            match &= shifted == want[:, None]
        latest = jnp.max(jnp.where(match, s, -1), axis=1)
        take = ~found & (latest >= 0)
        start = jnp.where(take, latest + n, start)
        found |= take
    idx = start[:, None] + jnp.arange(gamma, dtype=jnp.int32)[None, :]
    drafts = jnp.take_along_axis(context, jnp.minimum(idx, c - 1), axis=1)
    n_prop = jnp.where(found, jnp.clip(length - start, 0, gamma), 0).astype(jnp.int32)
    return drafts.astype(jnp.int32), n_prop


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """n-gram drafter over the context (prompt + generated text); no model, no state."""

    max_ngram: int = 3
    min_ngram: int = 1

    name = "prompt_lookup"

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}.")

    def validate(self, ctx, draft, shape):
        if not shape.is_chain:
            raise ValueError("PromptLookup drafts a chain (one continuation per match); use "
                             "Speculative(PromptLookup(), gamma=...) rather than TreeDecoding.")
        if shape.confidence is not None:
            raise ValueError("PromptLookup has no draft probabilities, so Speculative(confidence=...) does not "
                             "apply to it; leave confidence unset.")

    def slack(self, shape) -> int:
        return 0

    def init(self, ctx, params, prompt, lengths, cache):
        return jnp.zeros((), jnp.int32), cache

    def propose(self, ctx, params, dstate, view: View, shape, limit, key):
        drafts, n_prop = lookup(view.context, view.context_len, shape.gamma, self.max_ngram, self.min_ngram)
        n_prop = jnp.minimum(n_prop, limit)
        drafts = jnp.where(jnp.arange(shape.gamma)[None, :] < n_prop[:, None], drafts, 0)
        return chain_batch(view.root, drafts, n_prop), dstate, view.cache, jnp.zeros((), jnp.int32)

    def commit(self, ctx, params, dstate, view, shape, tree, acc, running):
        return dstate
