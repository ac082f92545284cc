"""A preallocated key/value cache as a pytree, with one write cursor per batch row.

Legend: L layers, B batch rows, K kv heads, S capacity (slots), Dh head dim, T new tokens.

`KVCache.k, KVCache.v : [L, B, K, S, Dh]` are preallocated to a static capacity; `lengths:
int32[B]` is the number of committed slots of each row (shared by every layer). Slots at or
after `lengths[b]` are stale: attention never reads them (the model masks them), so rolling
back is only moving the cursor. Rows advance by different amounts, which is what batched
speculative and tree decoding need.

All operations are pure (they return a new cache) and jit-friendly; under `jax.jit` with the
cache donated, XLA performs the updates in place.

Writes past the capacity are dropped, never wrapped or clamped onto live slots; callers check
capacity on the host before decoding (see `decoding.generation`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, K, S, Dh]
    v: jax.Array  # [L, B, K, S, Dh]
    lengths: jax.Array  # int32[B]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @classmethod
    def init(cls, config, batch_size: int, capacity: int, dtype=jnp.bfloat16) -> "KVCache":
        """Empty cache for `config` (a `ModelConfig`) with `capacity` slots per row."""
        shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    def append(self, k_new: jax.Array, v_new: jax.Array, n: jax.Array | None = None) -> "KVCache":
        """Write `k_new, v_new: [L, B, T, K, Dh]` at each row's cursor; advance it by `n[B]`.

        `n` defaults to T for every row; a row with `n[b] < T` keeps the extra entries as stale
        slots (useful for right-padded ragged prompts).
        """
        t = k_new.shape[2]
        slots = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
        k = jax.vmap(write_layer, in_axes=(0, 0, None))(self.k, k_new, slots)
        v = jax.vmap(write_layer, in_axes=(0, 0, None))(self.v, v_new, slots)
        n = jnp.full_like(self.lengths, t) if n is None else n.astype(jnp.int32)
        return KVCache(k, v, self.lengths + n)

    def truncate(self, lengths: jax.Array) -> "KVCache":
        """Set each row's committed length (rollback or commit after a speculative write)."""
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))

    def gather(self, src: jax.Array, n: jax.Array, base: jax.Array | None = None) -> "KVCache":
        """Compact chosen slots into place: the accepted path of a verified tree.

        For each row b and j < n[b]: slot `base[b] + j` receives slot `base[b] + src[b, j]`;
        then `lengths = base + n`. `src: int32[B, N]`, `n: int32[B]`, `base` defaults to the
        current lengths. All reads happen before any write, so overlapping paths are safe.
        """
        base = self.lengths if base is None else base
        width = src.shape[1]
        j = jnp.arange(width, dtype=jnp.int32)[None, :]
        # Entries at j >= n copy a slot onto itself: harmless, keeps shapes static.
        src_slot = base[:, None] + jnp.where(j < n[:, None], src, j)
        dst_slot = base[:, None] + j

        def move(buf):  # [B, K, S, Dh]
            rows = jnp.arange(buf.shape[0])[:, None]
            vals = buf[rows, :, src_slot]  # [B, N, K, Dh]
            return buf.at[rows, :, dst_slot].set(vals, mode="drop")

        k = jax.vmap(move)(self.k)
        v = jax.vmap(move)(self.v)
        return KVCache(k, v, (base + n).astype(jnp.int32))

    def select_rows(self, rows: jax.Array) -> "KVCache":
        """A cache holding rows `rows: int32[B']` of this one (fork, beam or best-of-N)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.lengths[rows])

    def fork(self, copies: int) -> "KVCache":
        """Repeat every row `copies` times (row b becomes rows b*copies .. b*copies+copies-1)."""
        rows = jnp.repeat(jnp.arange(self.batch_size), copies)
        return self.select_rows(rows)


def write_layer(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Write `new: [B, T, K, Dh]` into `buf: [B, K, S, Dh]` at `slots: int32[B, T]`.

    Out-of-range slots are dropped (never clamped onto live entries).
    """
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, :, slots].set(new.astype(buf.dtype), mode="drop")
