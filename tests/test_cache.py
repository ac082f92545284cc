"""KVCache: shapes, cursor arithmetic, compaction and dropping, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import KVCache
from tiny import tiny_config

L, B, K, S, DH = 2, 3, 2, 10, 4


def filled_cache(lengths, seed=0) -> KVCache:
    """A cache whose every slot holds distinct random values (so moves are visible)."""
    rng = np.random.RandomState(seed)
    k = rng.randn(L, B, K, S, DH).astype(np.float32)
    v = rng.randn(L, B, K, S, DH).astype(np.float32)
    return KVCache.from_stacked(jnp.asarray(k), jnp.asarray(v), lengths)


def np_cache(cache):
    return np.array(cache.k), np.array(cache.v), np.array(cache.lengths)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_init_shapes_and_dtypes(dtype):
    config = tiny_config()
    cache = KVCache.init(config, batch_size=3, capacity=24, dtype=dtype)
    shape = (config.num_layers, 3, config.num_kv_heads, 24, config.head_dim)
    assert cache.k.shape == shape and cache.v.shape == shape
    assert cache.k.dtype == dtype and cache.v.dtype == dtype
    assert cache.lengths.shape == (3,) and cache.lengths.dtype == jnp.int32
    assert np.all(np.asarray(cache.lengths) == 0)
    assert (cache.capacity, cache.batch_size, cache.num_layers) == (24, 3, config.num_layers)


def test_init_default_dtype_is_bfloat16():
    assert KVCache.init(tiny_config(), 1, 8).k.dtype == jnp.bfloat16


def test_cache_is_a_pytree_usable_under_jit():
    cache = filled_cache([1, 2, 3])
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == L + 1  # one kv buffer per layer, and the cursor
    assert all(leaf.shape == (2, B, K, S, DH) for leaf in leaves[:-1])
    out = jax.jit(lambda c: c.truncate(c.lengths + 1))(cache)
    assert isinstance(out, KVCache)
    np.testing.assert_array_equal(np.asarray(out.lengths), [2, 3, 4])


def np_append(k, v, lengths, k_new, v_new, n):
    k, v = k.copy(), v.copy()
    t = k_new.shape[2]
    for b in range(B):
        for j in range(t):
            slot = lengths[b] + j
            if slot < S:
                k[:, b, :, slot] = k_new[:, b, j]
                v[:, b, :, slot] = v_new[:, b, j]
    return k, v, lengths + n


@pytest.mark.parametrize("jit", [False, True])
def test_append_writes_at_each_cursor_and_advances_by_ragged_n(jit):
    lengths = np.array([0, 3, 5], np.int32)
    cache = filled_cache(lengths)
    rng = np.random.RandomState(1)
    t = 3
    k_new = rng.randn(L, B, t, K, DH).astype(np.float32)
    v_new = rng.randn(L, B, t, K, DH).astype(np.float32)
    n = np.array([3, 0, 2], np.int32)
    fn = (lambda c, a, b_, m: c.append(a, b_, m))
    if jit:
        fn = jax.jit(fn)
    got = fn(cache, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(n))
    want = np_append(*np_cache(cache), k_new, v_new, n)
    for g, w in zip(np_cache(got), want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.asarray(got.lengths), [3, 3, 7])


def test_append_default_n_is_t():
    lengths = np.array([1, 0, 4], np.int32)
    cache = filled_cache(lengths)
    k_new = np.ones((L, B, 2, K, DH), np.float32)
    got = cache.append(jnp.asarray(k_new), jnp.asarray(2 * k_new))
    want = np_append(*np_cache(cache), k_new, 2 * k_new, np.full(B, 2))
    for g, w in zip(np_cache(got), want):
        np.testing.assert_array_equal(g, w)


def test_append_casts_to_cache_dtype():
    cache = KVCache.init(tiny_config(), 1, 4, jnp.bfloat16)
    config = tiny_config()
    new = jnp.full((config.num_layers, 1, 1, config.num_kv_heads, config.head_dim), 1.5, jnp.float32)
    got = cache.append(new, new)
    assert got.k.dtype == jnp.bfloat16
    assert float(got.k[0, 0, 0, 0, 0]) == 1.5


def test_append_beyond_capacity_is_dropped_not_clamped_or_wrapped():
    # Row 0 has 8 of 10 slots committed: a 4-token write fits 2 and must drop 2.
    lengths = np.array([8, 0, 9], np.int32)
    cache = filled_cache(lengths)
    rng = np.random.RandomState(2)
    k_new = rng.randn(L, B, 4, K, DH).astype(np.float32)
    got = cache.append(jnp.asarray(k_new), jnp.asarray(k_new))
    k_old = np.asarray(cache.k)
    k_got = np.asarray(got.k)
    # The slots that fit hold the first new entries ...
    np.testing.assert_array_equal(k_got[:, 0, :, 8], k_new[:, 0, 0])
    np.testing.assert_array_equal(k_got[:, 0, :, 9], k_new[:, 0, 1])  # not the last entry (clamp)
    np.testing.assert_array_equal(k_got[:, 2, :, 9], k_new[:, 2, 0])
    # ... and no live slot was overwritten by the overflow (no wrap to slot 0).
    np.testing.assert_array_equal(k_got[:, 0, :, :8], k_old[:, 0, :, :8])
    np.testing.assert_array_equal(k_got[:, 2, :, :9], k_old[:, 2, :, :9])
    want = np_append(*np_cache(cache), k_new, k_new, np.full(B, 4))
    np.testing.assert_array_equal(k_got, want[0])


def test_truncate_moves_only_the_cursor():
    cache = filled_cache([5, 6, 7])
    got = cache.truncate(jnp.array([2, 6, 0]))
    np.testing.assert_array_equal(np.asarray(got.lengths), [2, 6, 0])
    assert got.lengths.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(got.v), np.asarray(cache.v))
    # A python list works too.
    np.testing.assert_array_equal(np.asarray(cache.truncate([1, 1, 1]).lengths), [1, 1, 1])


def np_gather(k, v, lengths, src, n, base=None):
    base = lengths if base is None else base
    k2, v2 = k.copy(), v.copy()
    for b in range(B):
        for j in range(n[b]):
            dst = base[b] + j
            if dst < S:
                k2[:, b, :, dst] = k[:, b, :, base[b] + src[b, j]]  # reads from the original
                v2[:, b, :, dst] = v[:, b, :, base[b] + src[b, j]]
    return k2, v2, base + n


@pytest.mark.parametrize("jit", [False, True])
def test_gather_compacts_paths_with_overlap_and_ragged_n(jit):
    lengths = np.array([2, 0, 3], np.int32)
    cache = filled_cache(lengths, seed=3)
    # Row 0: path 0 -> 2 -> 5 (a chain through a tree: sources after destinations overlap).
    # Row 1: a permutation where every source is also a destination (reads before writes).
    # Row 2: nothing accepted.
    src = np.array([[0, 2, 5, 0], [3, 0, 1, 2], [1, 2, 3, 4]], np.int32)
    n = np.array([3, 4, 0], np.int32)
    fn = (lambda c, s, m: c.gather(s, m))
    if jit:
        fn = jax.jit(fn)
    got = fn(cache, jnp.asarray(src), jnp.asarray(n))
    want = np_gather(*np_cache(cache), src, n)
    for g, w in zip(np_cache(got), want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.asarray(got.lengths), [5, 4, 3])


def test_gather_with_explicit_base():
    cache = filled_cache([9, 9, 9], seed=4)  # cursor already past the written block
    base = np.array([1, 4, 0], np.int32)
    src = np.array([[3, 1], [0, 2], [2, 2]], np.int32)
    n = np.array([2, 1, 2], np.int32)
    got = cache.gather(jnp.asarray(src), jnp.asarray(n), jnp.asarray(base))
    want = np_gather(*np_cache(cache), src, n, base)
    for g, w in zip(np_cache(got), want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.asarray(got.lengths), base + n)


def test_gather_near_capacity_drops_writes_past_the_end():
    # base 8, width 4: destinations 8, 9 are real; 10, 11 do not exist and must not clamp onto 9.
    cache = filled_cache([8, 8, 8], seed=5)
    src = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], np.int32)
    n = np.array([2, 2, 1], np.int32)
    got = cache.gather(jnp.asarray(src), jnp.asarray(n))
    want = np_gather(*np_cache(cache), src, n)
    for g, w in zip(np_cache(got), want):
        np.testing.assert_array_equal(g, w)


def test_select_rows_and_fork():
    cache = filled_cache([1, 4, 7], seed=6)
    sel = cache.select_rows(jnp.array([2, 0, 2, 1]))
    assert sel.batch_size == 4
    k, v, lengths = np_cache(cache)
    np.testing.assert_array_equal(np.asarray(sel.k), k[:, [2, 0, 2, 1]])
    np.testing.assert_array_equal(np.asarray(sel.v), v[:, [2, 0, 2, 1]])
    np.testing.assert_array_equal(np.asarray(sel.lengths), [7, 1, 7, 4])

    forked = cache.fork(2)
    assert forked.batch_size == 6
    np.testing.assert_array_equal(np.asarray(forked.k), np.repeat(k, 2, axis=1))
    np.testing.assert_array_equal(np.asarray(forked.lengths), [1, 1, 4, 4, 7, 7])
    # Forked rows are independent: appending to one copy leaves its twin alone.
    new = jnp.ones((L, 6, 1, K, DH))
    grown = forked.append(new, new, jnp.array([1, 0, 0, 0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(grown.lengths), [2, 1, 4, 4, 7, 7])
    np.testing.assert_array_equal(np.asarray(grown.k[:, 0, :, 1]), 1.0)
    np.testing.assert_array_equal(np.asarray(grown.k[:, 1, :, :1]), k[:, 0, :, :1])


@pytest.mark.parametrize("batch", [1, 3, 10])  # one row, per-row writes, the scatter past ROW_WRITE_LIMIT
@pytest.mark.parametrize("t", [1, 3, S])
def test_write_matches_numpy_at_every_cursor_including_past_the_end(batch, t):
    """`write` puts k and v of row b at slots cursor[b] + j and drops what falls past the end,
    for cursors anywhere from 0 to past the capacity, whichever write path the batch takes."""
    from decoding.cache import ROW_WRITE_LIMIT, write

    assert 3 <= ROW_WRITE_LIMIT < 10  # the cases above take both paths
    rng = np.random.RandomState(batch * 100 + t)
    kv = rng.randn(2, batch, K, S, DH).astype(np.float32)
    k_new = rng.randn(batch, t, K, DH).astype(np.float32)
    v_new = rng.randn(batch, t, K, DH).astype(np.float32)
    cursor = rng.randint(0, S + 2, size=batch).astype(np.int32)
    cursor[0] = S - 1  # a write that runs past the end for every t > 1
    got = np.asarray(jax.jit(write)(jnp.asarray(kv), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(cursor)))
    want = kv.copy()
    for b in range(batch):
        for j in range(t):
            if cursor[b] + j < S:
                want[0, b, :, cursor[b] + j] = k_new[b, j]
                want[1, b, :, cursor[b] + j] = v_new[b, j]
    np.testing.assert_array_equal(got, want)


def test_layers_are_separate_buffers_and_stacked_views_agree():
    cache = filled_cache([1, 2, 3], seed=7)
    assert cache.num_layers == L and all(kv.shape == (2, B, K, S, DH) for kv in cache.layers)
    for i, kv in enumerate(cache.layers):
        np.testing.assert_array_equal(np.asarray(kv[0]), np.asarray(cache.k[i]))
        np.testing.assert_array_equal(np.asarray(kv[1]), np.asarray(cache.v[i]))
    with pytest.raises(ValueError, match=r"\[L, B, K, S, Dh\]"):
        KVCache.from_stacked(jnp.zeros((B, K, S, DH)), jnp.zeros((B, K, S, DH)), [0] * B)
