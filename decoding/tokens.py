"""The output of a generation: the token buffer `Tokens`, the `StopRule`, and `commit`.

Every strategy's state carries `out: Tokens`, and `commit(out, new, n, ...)` is the single
place where tokens enter the output: it appends up to `n[b]` tokens per row and stops each row
independently at EOS, at `max_new_tokens`, or at a stop sequence, cutting any tokens past the
stop. Rows therefore accept different numbers of
tokens in the same step and finish independently.

Legend: B batch, N output capacity (max_new_tokens), M tokens offered per step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
    """Generated tokens. tokens: int32[B, N]; count: int32[B]; done: bool[B]; steps: int32[B]
    (target forwards made while the row was still running, prefill included)."""

    tokens: jax.Array
    count: jax.Array
    done: jax.Array
    steps: jax.Array

    @classmethod
    def init(cls, batch: int, max_new_tokens: int, pad_id: int = 0) -> "Tokens":
        return cls(
            tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
            count=jnp.zeros((batch,), jnp.int32),
            done=jnp.zeros((batch,), bool),
            steps=jnp.zeros((batch,), jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Static stopping rule: EOS ids and stop token sequences (hashable, a jit static arg)."""

    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()


def commit(out: Tokens, new: jax.Array, n: jax.Array, rule: StopRule, count_step: bool = True) -> Tokens:
    """Append `new[b, :n[b]]` to each running row, stopping at EOS / length / stop sequence.

    new: int32[B, M]; n: int32[B] (0 <= n <= M). A row that is already done is unchanged.
    The token that triggers a stop (EOS, last token of a stop sequence) is kept; tokens after it
    are dropped.
    """
    b, m = new.shape
    cap = out.tokens.shape[1]
    j = jnp.arange(m, dtype=jnp.int32)[None, :]
    n = jnp.where(out.done, 0, jnp.minimum(n, cap - out.count))
    valid = j < n[:, None]
    stop_here = jnp.zeros((b, m), bool)
    for eos in rule.eos_ids:
        stop_here |= new == eos
    if rule.stop_sequences:
        # Window of the last (len-1) committed tokens followed by the new ones.
        width = max(len(s) for s in rule.stop_sequences) - 1
        if width > 0:
            idx = out.count[:, None] - width + jnp.arange(width)[None, :]
            prev = jnp.take_along_axis(out.tokens, jnp.clip(idx, 0, cap - 1), axis=1)
            prev = jnp.where(idx >= 0, prev, -1)
            seq = jnp.concatenate([prev, new], axis=1)
        else:
            seq = new
        for s in rule.stop_sequences:
            ls = len(s)
            match = jnp.ones((b, m), bool)
            for k, tok in enumerate(s):
                # token s[k] must sit at new-position j - (ls - 1 - k)
                offset = width - (ls - 1 - k)
                match &= seq[:, offset : offset + m] == tok
            stop_here |= match
    stop_here &= valid
    first_stop = jnp.min(jnp.where(stop_here, j, m), axis=1)
    n_eff = jnp.minimum(n, first_stop + 1)
    write = j < n_eff[:, None]
    pos = jnp.where(write, out.count[:, None] + j, cap)  # cap = out of range: dropped
    rows = jnp.arange(b)[:, None]
    tokens = out.tokens.at[rows, pos].set(new.astype(jnp.int32), mode="drop")
    count = out.count + n_eff
    done = out.done | (first_stop < n) | (count >= cap)
    steps = out.steps + jnp.where(out.done | (not count_step), 0, 1)
    return Tokens(tokens=tokens, count=count, done=done, steps=steps)
