"""Attention for decoding and verification: a Pallas (Triton) kernel beside its jnp reference.

Legend: B batch rows, T new query tokens (1 for decode, a chain or a tree for verification),
S cache slots (capacity), H query heads, K kv heads, G = H / K query heads per kv head,
Dh head dim, M = T * G query rows of one kv head, NS splits of the slot axis.

What is computed (`attention_reference`, the attention every architecture's layers run when the
kernel is not asked for):
grouped-query attention where query head h reads kv head h // G; scores `q . k * scale` in
float32, masked by `visible: bool[B, T, S]`, softmax in float32, probabilities cast to v's
dtype, `probs @ v` accumulated in float32, result in q's dtype. One choice differs: a query
that sees no slot at all returns zeros (a plain softmax over all -inf gives NaN); every
function here does the same.

The kernel follows FlashAttention's online softmax (Dao et al. 2022, "FlashAttention"; Dao 2023,
"FlashAttention-2") arranged for decoding as in FlashDecoding (Dao, Haziza, Massa, Sizov 2023,
"Flash-Decoding for long-context inference"): one program per (batch row, kv head, block of
query rows, split of the slot axis); the G query heads of a kv head and all T query tokens
are stacked as the M rows of one matrix, so each key/value block is read from memory once per
(kv head, row block) and multiplied on the tensor cores; the slot axis is cut into NS splits
whose partial results (unnormalised output, sum, reference max) are combined by a small jnp
step. Choices the papers leave open:

* Splits follow the *live* slots, not the capacity: the prefix form reads only slots below
  `lengths[b]` (plus the T new ones), the mask form only the span between the first and last
  slot any query of the row sees (found by one reduction over the mask), so a half-empty cache
  costs half. Each split takes an equal share of that row's live blocks.
* Compact visibility (`attention_pallas_prefix`): slots `< lengths[b]` are visible to every
  query, the T new slots `lengths[b] + j` to query t iff `block_mask[b, t, j]` (default causal,
  `j <= t`): the rule `decoding.numerics.attention_mask` applies when no `slot_mask` is given.
  No [B, T, S] mask is read; the new slots are one extra block handled by the first split.
* Unified max (Hong et al. 2024, "FlashDecoding++: Faster Large Language Model Inference on
  GPUs", asynchronised softmax with a unified maximum): with `unified_max=phi` every block
  computes `exp(score - phi)`, so the accumulator is never rescaled and no block waits for a
  running max; splits then combine by plain sums. The paper's fallback is kept at split
  granularity: a program still takes its rows' largest visible score (nothing waits on it)
  and, if any is more than `UNIFIED_MAX_MARGIN` above phi (exp would overflow) or below it
  (exp would underflow), recomputes its split with the exact online softmax and reports its
  own max instead of phi. The combine step is the general max-weighted sum, which reduces to
  plain sums when every split reports phi, so results equal the exact path to rounding either
  way. phi is a per-model constant the caller calibrates (the paper takes it from score
  statistics of the model); a bad phi costs time (recomputation), never accuracy.
* Partials: a split writes its unnormalised output, sum and reference max (-inf for rows that
  saw no slot); with a single split the kernel normalises and writes [B, T, H, Dh] itself.
* `layer=i` reads layer i of stacked [L, B, K, S, Dh] keys and values where it lies, and
  `layer=(0, 1)` the keys and values of one layer's kv buffer [2, B, K, S, Dh]
  (`decoding.cache`): slicing outside the kernel can make XLA copy the buffer first, which
  would double the bytes.
* Rows are padded to powers of two of at least 16 (Triton's tensor shapes and its matrix
  product's minimum); the head dim must be a power of two (64 and 128 in the Llama family).

TPU: `decoding.kernels.attention_tpu` holds the Mosaic variant (same signatures, minus the
unified max and the Triton tuning knobs); `attention` picks it when the backend is a TPU.

Public: `attention` (dispatcher), `attention_reference`, `attention_pallas`,
`attention_pallas_prefix`, `prefix_visible`, `UNIFIED_MAX_MARGIN`, `IMPLS`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..numerics import attention_mask, f32_einsum
from .attention_tpu import attention_tpu, attention_tpu_prefix, layer_pair

UNIFIED_MAX_MARGIN = 40.0
"""A split falls back to the exact softmax when a row's largest score is this far from phi:
exp(40) ~ 2e17, so sums over 8k slots stay far from float32's 3e38, and exp(-40) ~ 4e-18
stays far above its smallest normal number (1e-38)."""

_TARGET_PROGRAMS = 128  # splits are added until about this many programs run (132 SMs on H100)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _default_scale(q: jax.Array, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
                        scale: float | None = None) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], visible: bool[B, T, S] -> [B, T, H, Dh] (q's dtype).

    Softmax in float32 over the visible slots; `scale` defaults to Dh ** -0.5. A query with no
    visible slot returns zeros.
    """
    b, t, h, dh = q.shape
    kh = k.shape[1]
    _check_shapes(q, k, v)
    qg = q.reshape(b, t, kh, h // kh, dh)
    scores = f32_einsum("btkgd,bksd->bkgts", qg, k) * _default_scale(q, scale)
    vis = visible.astype(bool)[:, None, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(vis, scores, -jnp.inf), axis=-1)
    probs = jnp.where(jnp.any(vis, axis=-1, keepdims=True), probs, 0.0)
    out = f32_einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, dh).astype(q.dtype)


def prefix_visible(lengths: jax.Array, block_mask: jax.Array | None, t: int, capacity: int) -> jax.Array:
    """The [B, T, S] mask of the prefix rule: `lengths: int32[B]`, `block_mask: bool[B, T, T]`
    (None: causal) -> visible: bool[B, T, S]: `decoding.numerics.attention_mask` without a slot
    mask or a sliding window (positions then do not matter)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return attention_mask(lengths, jnp.zeros((lengths.shape[0], t), jnp.int32), capacity, block_mask)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q: [B, T, H, Dh] and k, v: [B, K, S, Dh] of equal shape; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}.")
    b, _, h, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or h % k.shape[1]:
        raise ValueError(f"q {q.shape} and k/v {k.shape} disagree: need the same B and Dh, and H a multiple of K.")


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot(a, b, *, trans_b: bool, interpret: bool):
    """a @ b (or a @ b.T) accumulated in float32. float32 operands use full float32 products
    (no tf32); 16-bit operands are upcast in interpret mode, where the CPU lacks such a dot."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    if interpret and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, bounds_ref, *refs, form, t, g, s_len, dh, block_m, block_s, block_t,
            num_splits, scale, unified_max, interpret):
    """One program: rows [mi * block_m, +block_m) of kv head kh of batch row b, split j.

    q_ref: [T, H, Dh] of row b; k_ref, v_ref: [S, Dh] of (b, kh); bounds_ref: int32[B] lengths
    (prefix form) or int32[B, 2] live span (mask form); then the mask ref (int8 [T, S] or
    [T, T]; absent for the causal prefix form) and the outputs: o [T, H, Dh] when there is one
    split, else the partials o [block_m, Dh], l [block_m], m [block_m] (float32).
    """
    has_mask = form in ("mask", "prefix_mask")
    mask_ref = refs[0] if has_mask else None
    out_refs = refs[1:] if has_mask else refs
    b, kh, mi, j = (pl.program_id(i) for i in range(4))

    rows = mi * block_m + jnp.arange(block_m, dtype=jnp.int32)  # [BM] query rows r = t * G + g
    row_ok = rows < t * g
    t_row = rows // g
    h_row = kh * g + rows % g
    dcol = jnp.arange(dh, dtype=jnp.int32)
    t2 = jnp.broadcast_to(t_row[:, None], (block_m, dh))
    h2 = jnp.broadcast_to(h_row[:, None], (block_m, dh))
    d2 = jnp.broadcast_to(dcol[None, :], (block_m, dh))
    rows_ok2 = jnp.broadcast_to(row_ok[:, None], (block_m, dh))
    q = plgpu.load(q_ref.at[t2, h2, d2], mask=rows_ok2, other=0.0)  # [BM, Dh]

    if form == "mask":
        lo, hi = bounds_ref[b, 0], bounds_ref[b, 1]
    else:
        length = bounds_ref[b]
        lo, hi = jnp.int32(0), jnp.minimum(length, s_len)
    first = lo // block_s
    n_blocks = jnp.maximum(pl.cdiv(hi, block_s) - first, 0)
    per_split = pl.cdiv(n_blocks, num_splits)
    blk0 = first + j * per_split
    blk1 = jnp.minimum(blk0 + per_split, first + n_blocks)
    cols = jnp.arange(block_s, dtype=jnp.int32)

    def cache_block(i):
        """Scores [BM, BS] and visibility of cache block i, and its values [BS, Dh]."""
        s0 = i * block_s
        slot = s0 + cols
        live = (slot >= lo) & (slot < hi)
        kv_mask = jnp.broadcast_to(live[:, None], (block_s, dh))
        kb = plgpu.load(k_ref.at[pl.ds(s0, block_s), :], mask=kv_mask, other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(s0, block_s), :], mask=kv_mask, other=0.0)
        scores = _dot(q, kb, trans_b=True, interpret=interpret) * scale
        vis = row_ok[:, None] & live[None, :]
        if form == "mask":
            tt = jnp.broadcast_to(t_row[:, None], (block_m, block_s))
            ss = jnp.broadcast_to(slot[None, :], (block_m, block_s))
            seen = plgpu.load(mask_ref.at[tt, ss], mask=vis, other=0)
            vis = vis & (seen != 0)
        return scores, vis, vb

    def new_block():
        """Scores [BM, BT] and visibility of the T new slots `length + jj`, and their values;
        only split 0 takes them (elsewhere nothing is loaded and nothing is visible)."""
        jj = jnp.arange(block_t, dtype=jnp.int32)
        live = (jj < t) & (length + jj < s_len) & (j == 0)
        kv_mask = jnp.broadcast_to(live[:, None], (block_t, dh))
        kb = plgpu.load(k_ref.at[pl.ds(length, block_t), :], mask=kv_mask, other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(length, block_t), :], mask=kv_mask, other=0.0)
        scores = _dot(q, kb, trans_b=True, interpret=interpret) * scale
        vis = row_ok[:, None] & live[None, :]
        if form == "prefix_mask":
            tt = jnp.broadcast_to(t_row[:, None], (block_m, block_t))
            jj2 = jnp.broadcast_to(jj[None, :], (block_m, block_t))
            seen = plgpu.load(mask_ref.at[tt, jj2], mask=vis, other=0)
            vis = vis & (seen != 0)
        else:
            vis = vis & (jj[None, :] <= t_row[:, None])
        return scores, vis, vb

    def exact_step(block, state):
        scores, vis, vb = block
        acc, l_sum, m_run = state
        scores = jnp.where(vis, scores, -jnp.inf)
        m_new = jnp.maximum(m_run, jnp.max(scores, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_run - m_safe)
        p = jnp.exp(scores - m_safe[:, None])
        l_sum = alpha * l_sum + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(vb.dtype), vb, trans_b=False, interpret=interpret)
        return acc, l_sum, m_new

    def unified_step(block, state):
        scores, vis, vb = block
        acc, l_sum, m_seen = state
        scores = jnp.where(vis, scores, -jnp.inf)
        m_seen = jnp.maximum(m_seen, jnp.max(scores, axis=1))
        p = jnp.exp(scores - unified_max)
        l_sum = l_sum + jnp.sum(p, axis=1)
        acc = acc + _dot(p.astype(vb.dtype), vb, trans_b=False, interpret=interpret)
        return acc, l_sum, m_seen

    def sweep(step):
        state = (jnp.zeros((block_m, dh), jnp.float32), jnp.zeros((block_m,), jnp.float32),
                 jnp.full((block_m,), -jnp.inf, jnp.float32))
        if form != "mask":
            state = step(new_block(), state)
        return lax.fori_loop(blk0, blk1, lambda i, st: step(cache_block(i), st), state)

    if unified_max is None:
        acc, l_sum, m_ref = sweep(exact_step)
    else:
        acc, l_sum, m_seen = sweep(unified_step)
        gap = m_seen - unified_max
        bad = (m_seen > -jnp.inf) & ((gap > UNIFIED_MAX_MARGIN) | (gap < -UNIFIED_MAX_MARGIN))
        fall_back = jnp.max(bad.astype(jnp.int32)) > 0
        acc, l_sum, m_ref = lax.cond(
            fall_back,
            lambda: sweep(exact_step),
            lambda: (acc, l_sum, jnp.where(m_seen > -jnp.inf, unified_max, -jnp.inf)),
        )

    if num_splits == 1:
        (o_ref,) = out_refs
        out = jnp.where(l_sum[:, None] > 0, acc / jnp.where(l_sum > 0, l_sum, 1.0)[:, None], 0.0)
        plgpu.store(o_ref.at[t2, h2, d2], out.astype(o_ref.dtype), mask=rows_ok2)
    else:
        o_ref, l_ref, m_out = out_refs
        o_ref[...] = acc
        l_ref[...] = l_sum
        m_out[...] = m_ref


def _combine(o, l_sum, m, b, t, h, dh, kh, dtype):
    """Partials o: [B, K, NS, Mp, Dh], l, m: [B, K, NS, Mp] -> [B, T, H, Dh]. The max-weighted
    sum; with every m equal (unified max, no fallback) the weights are all one."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    w = jnp.exp(m - m_all)  # [B, K, NS, Mp]
    total = jnp.sum(w * l_sum, axis=2)  # [B, K, Mp]
    out = jnp.sum(w[..., None] * o, axis=2)  # [B, K, Mp, Dh]
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    g = h // kh
    out = out[:, :, : t * g].reshape(b, kh, t, g, dh).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, dh).astype(dtype)


def _launch(form, q, k, v, bounds, mask, *, layer, scale, unified_max, block_m, block_s, num_splits, num_warps,
            num_stages, interpret):
    pair = layer_pair(layer)
    if pair is not None and (k.ndim != 5 or v.ndim != 5 or not 0 <= pair[0] < k.shape[0]
                             or not 0 <= pair[1] < v.shape[0]):
        raise ValueError(f"layer={layer} needs stacked k, v: [L, B, K, S, Dh] with each index < L; got k {k.shape}, "
                         f"v {v.shape}.")
    _check_shapes(q, k[0] if layer is not None else k, v[0] if layer is not None else v)
    b, t, h, dh = q.shape
    kh, s_len = k.shape[-3], k.shape[-2]
    g = h // kh
    if dh < 16 or dh & (dh - 1):
        raise ValueError(f"the Pallas attention kernel needs a power-of-two head dim >= 16, got Dh={dh}; "
                         "use impl='reference' for this model.")
    for name, val in (("block_m", block_m), ("block_s", block_s)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}.")
    block_m = min(block_m, max(16, _next_pow2(t * g)))
    block_t = max(16, _next_pow2(t))
    n_m = pl.cdiv(t * g, block_m)
    if num_splits is None:
        num_splits = max(1, min(pl.cdiv(s_len, block_s), pl.cdiv(_TARGET_PROGRAMS, b * kh * n_m)))
    scale = _default_scale(q, scale)
    kernel = functools.partial(
        _kernel, form=form, t=t, g=g, s_len=s_len, dh=dh, block_m=block_m, block_s=block_s, block_t=block_t,
        num_splits=num_splits, scale=scale, unified_max=None if unified_max is None else float(unified_max),
        interpret=interpret)

    if pair is None:
        k_spec = v_spec = pl.BlockSpec((None, None, s_len, dh), lambda bi, ki, mi, ji: (bi, ki, 0, 0))
    else:  # read k[pair[0]], v[pair[1]] of the stacks in place (no slice copied out first)
        k_spec, v_spec = (pl.BlockSpec((None, None, None, s_len, dh), lambda bi, ki, mi, ji, n=n: (n, bi, ki, 0, 0))
                          for n in pair)
    in_specs = [
        pl.BlockSpec((None, t, h, dh), lambda bi, ki, mi, ji: (bi, 0, 0, 0)),
        k_spec,
        v_spec,
        pl.BlockSpec(bounds.shape, lambda bi, ki, mi, ji: (0,) * bounds.ndim),
    ]
    args = [q, k, v, bounds]
    if mask is not None:
        in_specs.append(pl.BlockSpec((None, *mask.shape[1:]), lambda bi, ki, mi, ji: (bi, 0, 0)))
        args.append(mask)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [pl.BlockSpec((None, t, h, dh), lambda bi, ki, mi, ji: (bi, 0, 0, 0))]
    else:
        m_pad = n_m * block_m
        out_shape = [jax.ShapeDtypeStruct((b, kh, num_splits, m_pad, dh), jnp.float32),
                     jax.ShapeDtypeStruct((b, kh, num_splits, m_pad), jnp.float32),
                     jax.ShapeDtypeStruct((b, kh, num_splits, m_pad), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, block_m, dh), lambda bi, ki, mi, ji: (bi, ki, ji, mi, 0)),
                     pl.BlockSpec((None, None, None, block_m), lambda bi, ki, mi, ji: (bi, ki, ji, mi)),
                     pl.BlockSpec((None, None, None, block_m), lambda bi, ki, mi, ji: (bi, ki, ji, mi))]
    outs = pl.pallas_call(
        kernel,
        grid=(b, kh, n_m, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"decode_attention_{form}",
    )(*args)
    if num_splits == 1:
        return outs[0]
    return _combine(*outs, b, t, h, dh, kh, q.dtype)


def attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
                     scale: float | None = None, unified_max: float | None = None, layer: int | None = None,
                     block_m: int = 64, block_s: int = 64, num_splits: int | None = None, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], visible: bool[B, T, S] -> [B, T, H, Dh].

    The Pallas kernel on an explicit mask (same function as `attention_reference`). Only the
    span of slots between the first and last one any query of the row sees is read.
    `unified_max`: FlashDecoding++'s fixed softmax reference phi (None: exact online max).
    `layer`: a static int; k, v are then stacks [L, B, K, S, Dh] and k[layer], v[layer] are read
    where they lie (slicing `k[layer]` first can cost XLA a copy of the whole layer); a pair
    (i, j) reads k[i] and v[j] (a layer's kv buffer [2, B, K, S, Dh] as both k and v: (0, 1)).
    `num_splits`: splits of the slot axis (None: enough for about 128 programs).
    `block_m`, `block_s`: query rows and slots per tile (powers of two >= 16); `num_warps`,
    `num_stages`: Triton's warps per program and software-pipelining depth.
    `interpret=True` runs the kernel through the Pallas interpreter (any backend).
    """
    b, t, _, _ = q.shape
    s_len = k.shape[-2]
    if visible.shape != (b, t, s_len):
        raise ValueError(f"visible must be bool[B, T, S] = {(b, t, s_len)}, got {visible.shape}.")
    seen = jnp.any(visible.astype(bool), axis=1)  # [B, S]
    any_seen = jnp.any(seen, axis=1)
    lo = jnp.where(any_seen, jnp.argmax(seen, axis=1), 0)
    hi = jnp.where(any_seen, s_len - jnp.argmax(seen[:, ::-1], axis=1), 0)
    bounds = jnp.stack([lo, hi], axis=1).astype(jnp.int32)  # [B, 2]
    return _launch("mask", q, k, v, bounds, visible.astype(jnp.int8), layer=layer, scale=scale,
                   unified_max=unified_max, block_m=block_m, block_s=block_s, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def attention_pallas_prefix(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                            block_mask: jax.Array | None = None, *, scale: float | None = None,
                            unified_max: float | None = None, layer: int | None = None, block_m: int = 64,
                            block_s: int = 64, num_splits: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], lengths: int32[B], block_mask: bool[B, T, T] | None
    -> [B, T, H, Dh].

    Visibility by the prefix rule (`prefix_visible`): slots `< lengths[b]` for every query, new
    slot `lengths[b] + j` for query t iff `block_mask[b, t, j]` (None: `j <= t`, a chain).
    The new tokens' keys/values must already be in the cache at those slots; slots at or past
    S do not exist. Reads only the live slots. Other arguments as in `attention_pallas`.
    """
    b, t, _, _ = q.shape
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))
    form = "prefix"
    if block_mask is not None:
        if block_mask.shape != (b, t, t):
            raise ValueError(f"block_mask must be bool[B, T, T] = {(b, t, t)}, got {block_mask.shape}.")
        form, block_mask = "prefix_mask", block_mask.astype(jnp.int8)
    return _launch(form, q, k, v, lengths, block_mask, layer=layer, scale=scale, unified_max=unified_max,
                   block_m=block_m, block_s=block_s, num_splits=num_splits, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def _pallas_supported(q: jax.Array) -> bool:
    """Whether "auto" takes a kernel: the Triton one on GPUs (a power-of-two head dim >= 16),
    the Mosaic one on TPUs (a head dim that is a multiple of 64, whole sublane tiles for the
    MXU); never elsewhere."""
    dh = q.shape[-1]
    backend = jax.default_backend()
    if backend == "gpu":
        return dh >= 16 and not dh & (dh - 1)
    return backend == "tpu" and dh % 64 == 0


IMPLS = ("auto", "reference", "pallas", "pallas_tpu")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | None = None, *,
              lengths: jax.Array | None = None, block_mask: jax.Array | None = None,
              scale: float | None = None, impl: str = "auto", unified_max: float | None = None,
              layer: int | None = None, interpret: bool = False) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh] -> [B, T, H, Dh], visibility given either as
    `visible: bool[B, T, S]` or by the prefix rule (`lengths: int32[B]`, `block_mask: bool[B, T, T]`
    or None for causal).

    impl: "reference" (jnp), "pallas" (the backend's kernel: Mosaic on TPUs,
    `decoding.kernels.attention_tpu`, Triton elsewhere; `interpret=True` runs it anywhere),
    "pallas_tpu" (the Mosaic kernel whatever the backend, for interpret-mode runs off TPUs) or
    "auto" (the kernel on GPUs and TPUs when the head dim allows, the reference elsewhere).
    `unified_max` applies to the Triton kernel only (the reference and the Mosaic kernel are
    exact). `layer` (a static int, or a pair of them): k, v are stacks [L, B, K, S, Dh] and
    k[layer], v[layer] are attended to (a pair (i, j): k[i], v[j]).
    """
    if (visible is None) == (lengths is None):
        raise ValueError("give exactly one of `visible` (bool[B, T, S]) or `lengths` (int32[B], with an "
                         "optional `block_mask`).")
    if visible is not None and block_mask is not None:
        raise ValueError("`block_mask` goes with `lengths`; fold it into `visible` instead.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    use_pallas = impl in ("pallas", "pallas_tpu") or (impl == "auto" and _pallas_supported(q))
    if not use_pallas:
        if layer is not None:
            i, j = layer_pair(layer)
            k, v = k[i], v[j]
        if visible is None:
            visible = prefix_visible(lengths, block_mask, q.shape[1], k.shape[2])
        return attention_reference(q, k, v, visible, scale=scale)
    if impl == "pallas_tpu" or jax.default_backend() == "tpu":
        kw = dict(scale=scale, layer=layer, interpret=interpret)
        if visible is None:
            return attention_tpu_prefix(q, k, v, lengths, block_mask, **kw)
        return attention_tpu(q, k, v, visible, **kw)
    kw = dict(scale=scale, unified_max=unified_max, layer=layer, interpret=interpret)
    if visible is None:
        return attention_pallas_prefix(q, k, v, lengths, block_mask, **kw)
    return attention_pallas(q, k, v, visible, **kw)
