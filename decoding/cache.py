"""A preallocated key/value cache as a pytree: one buffer per layer, one write cursor per row.

Legend: L layers, B batch rows, K kv heads, S capacity (slots), Dh head dim, T new tokens.

`KVCache.layers: tuple of L arrays kv[2, B, K, S, Dh]` (keys at `kv[0]`, values at `kv[1]`)
are preallocated to a static capacity; `lengths: int32[B]` is the number of committed slots of
each row (shared by every layer). Slots at or after `lengths[b]` are stale: attention never
reads them (the model masks them), so rolling back is only moving the cursor. Rows advance by
different amounts, which is what batched speculative and tree decoding need.

Layout (docs/performance.md, "The cache layout"): each layer owns one buffer holding its keys
and values side by side, so a decoder layer writes its T new entries with `write`: one
`lax.dynamic_update_slice` per layer and row block for k and v together, done in place under
`jax.jit` (the whole-generation loop, or a donated cache). A scatter into one stacked
`[L, B, K, S, Dh]` array, the layout before this one, compiles at batch 1 to a read-select-
update of the whole array and a device copy per layer. Choices:

* Rows at different cursors (ragged batches): one row is one block, so `write` issues one
  `dynamic_update_slice` per row up to `ROW_WRITE_LIMIT` rows (small in-place writes, no
  scatter), and one scatter (also in place, touching only the new entries) for larger
  batches, where per-row writes would multiply the kernels.
* k and v share a buffer: one write instead of two, and attention reads `kv[0]`, `kv[1]`
  (contiguous halves; the Pallas kernel reads them in place). With two buffers per layer
  XLA:CPU duplicates the key write into the attention's operand and copies the buffer twice
  per step (measured with `experiments.profile_step.hlo_counts`).
* `k`, `v` (properties) stack the layers into `[L, B, K, S, Dh]` for inspection and tests; the
  stack is a copy, never used by the model.

All operations are pure (they return a new cache) and jit-friendly. Writes past the capacity
are dropped, never wrapped or clamped onto live slots; callers check capacity on the host
before decoding (see `decoding.generation`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

ROW_WRITE_LIMIT = 8
"""Batches up to this many rows write each row with its own `dynamic_update_slice`; larger
batches use one scatter per buffer."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple  # L x kv[2, B, K, S, Dh]
    lengths: jax.Array  # int32[B]

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def capacity(self) -> int:
        return self.layers[0].shape[3]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def k(self) -> jax.Array:
        """All keys stacked, [L, B, K, S, Dh] (a copy: for inspection, not for the model)."""
        return jnp.stack([kv[0] for kv in self.layers])

    @property
    def v(self) -> jax.Array:
        """All values stacked, [L, B, K, S, Dh] (a copy: for inspection, not for the model)."""
        return jnp.stack([kv[1] for kv in self.layers])

    @classmethod
    def init(cls, config, batch_size: int, capacity: int, dtype=jnp.bfloat16) -> "KVCache":
        """Empty cache for `config` (a `ModelConfig`) with `capacity` slots per row."""
        shape = (2, batch_size, config.num_kv_heads, capacity, config.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   jnp.zeros((batch_size,), jnp.int32))

    @classmethod
    def from_stacked(cls, k: jax.Array, v: jax.Array, lengths) -> "KVCache":
        """A cache from stacked `k, v: [L, B, K, S, Dh]` (split into per-layer buffers)."""
        if k.ndim != 5 or k.shape != v.shape:
            raise ValueError(f"from_stacked needs k, v: [L, B, K, S, Dh] of one shape, got {k.shape} and {v.shape}.")
        return cls(tuple(jnp.stack([k[i], v[i]]) for i in range(k.shape[0])), jnp.asarray(lengths, jnp.int32))

    def with_layers(self, layers) -> "KVCache":
        """The same cursor over other per-layer buffers."""
        return KVCache(tuple(layers), self.lengths)

    def append(self, k_new: jax.Array, v_new: jax.Array, n: jax.Array | None = None) -> "KVCache":
        """Write `k_new, v_new: [L, B, T, K, Dh]` at each row's cursor; advance it by `n[B]`.

        `n` defaults to T for every row; a row with `n[b] < T` keeps the extra entries as stale
        slots (useful for right-padded ragged prompts).
        """
        t = k_new.shape[2]
        layers = tuple(write(kv, k_new[i], v_new[i], self.lengths) for i, kv in enumerate(self.layers))
        n = jnp.full_like(self.lengths, t) if n is None else n.astype(jnp.int32)
        return KVCache(layers, self.lengths + n)

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
        rows = jnp.arange(self.batch_size)[:, None]

        def move(kv):  # [2, B, K, S, Dh]
            vals = kv[:, rows, :, src_slot]  # [B, N, 2, K, Dh]
            return kv.at[:, rows, :, dst_slot].set(vals, mode="drop")

        return KVCache(tuple(map(move, self.layers)), (base + n).astype(jnp.int32))

    def select_rows(self, rows: jax.Array) -> "KVCache":
        """A cache holding rows `rows: int32[B']` of this one (fork, beam or best-of-N)."""
        return KVCache(tuple(kv[:, rows] for kv in self.layers), self.lengths[rows])

    def fork(self, copies: int) -> "KVCache":
        """Repeat every row `copies` times (row b becomes rows b*copies .. b*copies+copies-1)."""
        rows = jnp.repeat(jnp.arange(self.batch_size), copies)
        return self.select_rows(rows)


def write(kv: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array) -> jax.Array:
    """Write `k, v: [B, T, K, Dh]` into one layer's `kv: [2, B, K, S, Dh]` at slots
    `cursor[b] + t` (`cursor: int32[B]`); entries that fall past the capacity are dropped.

    Up to `ROW_WRITE_LIMIT` rows: one `lax.dynamic_update_slice` per row, of k and v together,
    over a window of min(T, S) slots (moved back to fit when a row's write runs past the end;
    the slots it then covers before the cursor keep their old values, so nothing is clamped
    onto a live slot). More rows: one scatter with dropped out-of-range slots.
    """
    b, t = k.shape[0], k.shape[1]
    new = jnp.stack([k, v]).astype(kv.dtype)  # [2, B, T, K, Dh]
    if b > ROW_WRITE_LIMIT:
        slots = cursor[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        return kv.at[:, jnp.arange(b)[:, None], :, slots].set(new.transpose(1, 2, 0, 3, 4), mode="drop")
    s = kv.shape[3]
    t = min(t, s)  # entries at t >= S can never land (cursors are >= 0)
    new = new[:, :, :t].transpose(0, 1, 3, 2, 4)  # [2, B, K, T, Dh]
    cursor = jnp.asarray(cursor, jnp.int32)
    for row in range(b):
        c = cursor[row]
        start = jnp.minimum(c, s - t)  # the window [start, start + t) always fits
        upd = new[:, row:row + 1]
        if t == 1:
            keep = c >= s
        else:  # window slot start + w receives entry w - shift (shift > 0 only past the end)
            shift = c - start
            w = jnp.arange(t, dtype=jnp.int32)
            upd = jnp.take(upd, jnp.clip(w - shift, 0, t - 1), axis=3)
            keep = (w < shift)[:, None]
        old = lax.dynamic_slice(kv, (0, row, 0, start, 0), upd.shape)
        kv = lax.dynamic_update_slice(kv, jnp.where(keep, old, upd), (0, row, 0, start, 0))
    return kv
