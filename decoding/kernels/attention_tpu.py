"""Attention for decoding and verification on TPU: a Pallas (Mosaic) kernel.

Legend: B batch rows, T new query tokens (1 for decode, a chain or a tree for verification),
S cache slots (capacity), H query heads, K kv heads, G = H / K query heads per kv head,
Dh head dim, M = T * G query rows of one kv head, Mp = M padded to a multiple of 16,
Tp = T padded to a multiple of 128, BS slots per block, NB = ceil(S / BS) blocks.

The same function as `decoding.kernels.attention.attention_reference` (its jnp reference, in
the GPU kernel's module; `tests/test_kernels_tpu.py` checks the two against each other):
grouped-query attention where query head h reads kv head h // G, scores `q . k * scale` in
float32, softmax in float32, probabilities cast to v's dtype, `probs @ v` accumulated in
float32, result in q's dtype, and a query that sees no slot returns zeros.

The kernel is FlashAttention's online softmax (Dao et al. 2022, "FlashAttention"; Dao 2023,
"FlashAttention-2") arranged for decoding as in FlashDecoding (Dao, Haziza, Massa, Sizov 2023,
"Flash-Decoding for long-context inference"): the G query heads of a kv head and all T query
tokens are stacked as the M rows of one matrix, so each key/value block is read from HBM once
per kv head and multiplied on the MXU. Choices the papers leave open, and those TPU forces:

* Grid (B, K, NB): batch rows and kv heads "parallel", the slot blocks last and "arbitrary"
  (sequential on one core), the running max, sum and unnormalised output living in VMEM
  scratch across them. FlashDecoding's split of the slot axis over several cores is not used:
  a TPU chip has one or two TensorCores, which B * K >= 2 parallel programs fill (batch 1 of
  the Llama family has K >= 2), so there are no partials to combine.
* Only the live span is read. The bounds (`lo`, `hi`: int32[B]) and the prefix lengths are
  scalar-prefetched into SMEM (`PrefetchScalarGridSpec`), so the key/value index maps clamp
  the block index into [lo // BS, (hi - 1) // BS]: past the live span the pipeline sees the
  same block index again and issues no copy, and `pl.when` skips the compute: the bytes read
  follow the live span, not the capacity.
* Tiling: blocks are (Mp, Dh) of q, (BS, Dh) of k and v, with BS a multiple of 128 (or all
  of S when S is smaller), so the scores (Mp, BS) fill whole (8, 128) vregs and Dh is the full
  last dimension. The running max and sum are kept as (Mp, 128) lane-replicated scratch, the
  layout of jax's own Pallas TPU flash attention.
* Prefix form (`attention_tpu_prefix`, what a decode or verification step needs): slots
  `< lengths[b]` are visible to every query and the T new slots `lengths[b] + j` to query t
  iff `block_mask[b, t, j]` (default causal), the rule `decoding.numerics.attention_mask`
  applies without a slot mask. No [B, T, S] mask exists: the block mask, one row per query
  row (Mp, Tp), is read once per program, and a block's visibility of the new slots is the
  0/1 matrix product `rows (Mp, Tp) @ onehot(slot - lengths[b]) (Tp, BS)` (exact: at most one
  term is 1), a gather-free form that runs on the MXU, computed only in the blocks
  that hold new slots (`lax.cond`). The new slots need not align to a block.
* Mask form (`attention_tpu`): an explicit `visible: bool[B, T, S]`, expanded outside the
  kernel to one bfloat16 row per query row ([B, Mp, S], shared by the kv heads), read in
  (Mp, BS) blocks over the span between the first and last slot any query of the row sees.
  It reads B * Mp * S * 2 bytes more than the prefix form. The model's layers call this form
  only where the visibility is more than the prefix rule (a tree's block mask, a drafter's slot
  mask, a sliding window); prefill, decode and chains take the prefix form from the cache
  lengths (`decoding.llama.Setup.lengths`), as they do with the Triton kernel.
* Slots past S in the last block, slots outside the live span and rows past M are masked
  before the softmax, and those slots' value rows zeroed before the product, so padding and
  stale cache entries (even NaN) never reach the output (the reference, which multiplies
  every slot's value by its probability, would pass a NaN through; the cache holds none).
* `layer=i` (or a pair) reads layer i of stacked [L, B, K, S, Dh] keys and values in place,
  as the GPU kernel does (the index map picks the layer; nothing is sliced out first).
* Not carried over from the GPU kernel: FlashDecoding++'s unified max, whose gain is not
  synchronising the partials of split programs; with no split there is less to gain, and
  nothing has been measured on a TPU to say otherwise.
* Export for TPU from a host without one: `sign` (which integer `//` lowers through) and the
  tiling check of rank-1 blocks ask the attached TPU about itself while lowering, so the kernel
  divides with `lax.div` and every block has rank 2 or more.

No TPU is lent to this project: the kernel is tested in the Pallas interpreter on CPU against
the reference, and its lowering to a Mosaic custom call (`tpu_custom_call`) is checked by
cross-platform export on a CPU host; nothing here has been compiled by Mosaic for a chip or
timed on one.

Public: `attention_tpu`, `attention_tpu_prefix`, `live_blocks`, `block_to_read`, `layer_pair`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..shapes import round_up

LANES = 128  # the last dimension of a vreg
ROW_ALIGN = 16  # query rows padded to this: a bfloat16 (16, 128) tile, two float32 (8, 128) tiles


def layer_pair(layer) -> tuple[int, int] | None:
    """`layer` as (index into k, index into v): an int reads both stacks at that index, a pair
    (i, j) reads k[i] and v[j] (a per-layer kv buffer [2, B, K, S, Dh] passed as both k and v is
    read with (0, 1)). Shared by the Triton and Mosaic kernels."""
    if layer is None:
        return None
    pair = (layer, layer) if isinstance(layer, int) else tuple(layer)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"layer must be a static int or a pair of ints (k index, v index), got {layer!r}.")
    return pair


def _dot(a, b, dims, interpret: bool):
    """dot_general accumulated in float32; float32 operands at full precision. In interpret
    mode 16-bit operands are upcast (the CPU lacks a bf16 x bf16 -> f32 dot)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    if interpret and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def live_blocks(lo, hi, block_s: int):
    """The blocks of BS slots that hold live slots [lo, hi): (first, last, nonempty), int32
    scalars and a bool (traced or not). `lax.div` truncates, which is floor here (all
    non-negative); `//` would lower through `sign`, whose Mosaic rule asks the attached TPU for
    its generation, so export for TPU from a CPU host would fail."""
    first = lax.div(lo, block_s)
    last = jnp.maximum(lax.div(hi + block_s - 1, block_s) - 1, first)
    return first, last, hi > lo


def block_to_read(j, lo, hi, block_s: int):
    """The key/value block grid step j reads: j clamped into the live blocks, so steps outside
    them repeat the nearest live block's index and the pipeline issues no copy for them."""
    first, last, _ = live_blocks(lo, hi, block_s)
    return jnp.clip(j, first, last)


def _kernel(lo_ref, hi_ref, len_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref, acc_ref, *, form,
            block_s, num_blocks, s_len, t, tp, scale, interpret):
    """One program: kv head kh of batch row b, slot block j.

    lo_ref, hi_ref, len_ref: int32[B] in SMEM (live span, prefix lengths); q_ref: [Mp, Dh];
    k_ref, v_ref: [BS, Dh]; mask_ref: [Mp, Tp] block-mask rows (prefix form) or [Mp, BS]
    visibility rows (mask form); o_ref: [Mp, Dh]; scratch m_ref, l_ref: f32[Mp, 128],
    acc_ref: f32[Mp, Dh].
    """
    b, j = pl.program_id(0), pl.program_id(2)
    lo, hi = lo_ref[b], hi_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    s0 = j * block_s
    first, last, nonempty = live_blocks(lo, hi, block_s)

    @pl.when(nonempty & (j >= first) & (j <= last))
    def _step():
        m_rows = q_ref.shape[0]
        slot = s0 + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)  # [1, BS]
        live = (slot >= lo) & (slot < hi) & (slot < s_len)
        scores = _dot(q_ref[...], k_ref[...], ((1,), (1,)), interpret) * scale  # [Mp, BS]
        if form == "prefix":
            length = len_ref[b]

            def new_slots():
                jj = lax.broadcasted_iota(jnp.int32, (tp, block_s), 0)
                onehot = (slot - length == jj).astype(mask_ref.dtype)  # [Tp, BS]
                return _dot(mask_ref[...], onehot, ((1,), (0,)), interpret)  # [Mp, BS], 0 or 1

            touches_new = (s0 + block_s > length) & (s0 < length + t)  # only blocks holding new slots
            new_seen = lax.cond(touches_new, new_slots, lambda: jnp.zeros((m_rows, block_s), jnp.float32))
            vis = live & ((slot < length) | (new_seen > 0.5))
        else:
            vis = live & (mask_ref[...].astype(jnp.float32) > 0.5)
        scores = jnp.where(vis, scores, -jnp.inf)
        m_prev = m_ref[...][:, :1]  # [Mp, 1]: whole-vreg loads, then a lane slice of the value
        l_prev = l_ref[...][:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(scores - m_safe)  # 0 where not visible
        vb = v_ref[...]
        slot_col = s0 + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        live_col = (slot_col >= lo) & (slot_col < hi) & (slot_col < s_len)
        vb = jnp.where(live_col, vb, jnp.zeros_like(vb))  # padding past S and dead slots may hold anything
        pv = _dot(p.astype(vb.dtype), vb, ((1,), (0,)), interpret)  # [Mp, Dh]
        acc_ref[...] = alpha * acc_ref[...] + pv
        l_ref[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), (m_rows, LANES))
        m_ref[...] = jnp.broadcast_to(m_new, (m_rows, LANES))

    @pl.when(j == num_blocks - 1)
    def _finish():
        l_sum = l_ref[...][:, :1]
        out = jnp.where(l_sum > 0, acc_ref[...] / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)
        o_ref[...] = out.astype(o_ref.dtype)


def _launch(form, q, k, v, lo, hi, lengths, mask_rows, *, layer, scale, block_s, interpret):
    """q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (or stacks with `layer`); lo, hi, lengths: int32[B];
    mask_rows: bf16[B, Mp, Tp] (prefix) or bf16[B, Mp, S] (mask) -> [B, T, H, Dh]."""
    pair = layer_pair(layer)
    kk, vv = (k, v) if pair is None else (k[0], v[0])  # shapes only
    if pair is not None and (k.ndim != 5 or v.ndim != 5 or not 0 <= pair[0] < k.shape[0]
                             or not 0 <= pair[1] < v.shape[0]):
        raise ValueError(f"layer={layer} needs stacked k, v: [L, B, K, S, Dh] with each index < L; got k {k.shape}, "
                         f"v {v.shape}.")
    if q.ndim != 4 or kk.ndim != 4 or kk.shape != vv.shape:
        raise ValueError(f"expected q: [B, T, H, Dh] and k, v: [B, K, S, Dh] of equal shape; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}.")
    b, t, h, dh = q.shape
    _, kh, s_len, _ = kk.shape
    if kk.shape[0] != b or kk.shape[3] != dh or h % kh:
        raise ValueError(f"q {q.shape} and k/v {kk.shape} disagree: need the same B and Dh, and H a multiple of K.")
    if block_s % LANES:
        raise ValueError(f"block_s must be a multiple of {LANES} (the TPU lane width), got {block_s}.")
    block_s = min(block_s, s_len) if s_len <= block_s else block_s  # a block of all of S is allowed
    num_blocks = pl.cdiv(s_len, block_s)
    g = h // kh
    m_pad = mask_rows.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    # q rows r = t * G + g of kv head kh: [B, K, Mp, Dh]
    qr = q.reshape(b, t, kh, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, dh)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, m_pad - t * g), (0, 0)))

    def kv_block(bi, ki, ji, lo_r, hi_r, len_r):
        return block_to_read(ji, lo_r[bi], hi_r[bi], block_s)

    if pair is None:
        k_spec = v_spec = pl.BlockSpec((None, None, block_s, dh),
                                       lambda bi, ki, ji, *s: (bi, ki, kv_block(bi, ki, ji, *s), 0))
    else:
        k_spec, v_spec = (pl.BlockSpec((None, None, None, block_s, dh),
                                       lambda bi, ki, ji, *s, n=n: (n, bi, ki, kv_block(bi, ki, ji, *s), 0))
                          for n in pair)
    if form == "prefix":
        mask_spec = pl.BlockSpec((None, m_pad, mask_rows.shape[2]), lambda bi, ki, ji, *s: (bi, 0, 0))
    else:
        mask_spec = pl.BlockSpec((None, m_pad, block_s), lambda bi, ki, ji, *s: (bi, 0, kv_block(bi, ki, ji, *s)))
    row_spec = pl.BlockSpec((None, None, m_pad, dh), lambda bi, ki, ji, *s: (bi, ki, 0, 0))
    kernel = functools.partial(_kernel, form=form, block_s=block_s, num_blocks=num_blocks, s_len=s_len,
                               t=t, tp=mask_rows.shape[2], scale=float(scale), interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kh, num_blocks),
            in_specs=[row_spec, k_spec, v_spec, mask_spec],
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((m_pad, LANES), jnp.float32), pltpu.VMEM((m_pad, LANES), jnp.float32),
                            pltpu.VMEM((m_pad, dh), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, kh, m_pad, dh), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"decode_attention_tpu_{form}",
    )(lo, hi, lengths, qr, k, v, mask_rows)
    out = out[:, :, : t * g].reshape(b, kh, t, g, dh).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, dh)


def _rows(x: jax.Array, g: int, m_pad: int) -> jax.Array:
    """x: [B, T, N] (one row per query token) -> bf16[B, Mp, N], row r = t * G + g taking x[:, t],
    rows past T * G zero (they see nothing)."""
    rows = jnp.repeat(x.astype(jnp.bfloat16), g, axis=1)
    return jnp.pad(rows, ((0, 0), (0, m_pad - rows.shape[1]), (0, 0)))


def attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *, scale: float | None = None,
                  layer=None, block_s: int = 512, interpret: bool = False) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], visible: bool[B, T, S] -> [B, T, H, Dh].

    The Mosaic kernel on an explicit mask (same function as `attention_reference`); only the
    blocks between the first and last slot any query of the row sees are read. `layer`: a
    static int (k, v are then stacks [L, B, K, S, Dh]) or a pair (k index, v index).
    `block_s`: slots per block, a multiple of 128. `interpret=True` runs the Pallas
    interpreter (any backend).
    """
    b, t, h, _ = q.shape
    s_len = k.shape[-2]
    if visible.shape != (b, t, s_len):
        raise ValueError(f"visible must be bool[B, T, S] = {(b, t, s_len)}, got {visible.shape}.")
    kh = k.shape[-3]
    seen = jnp.any(visible.astype(bool), axis=1)  # [B, S]
    any_seen = jnp.any(seen, axis=1)
    lo = jnp.where(any_seen, jnp.argmax(seen, axis=1), 0).astype(jnp.int32)
    hi = jnp.where(any_seen, s_len - jnp.argmax(seen[:, ::-1], axis=1), 0).astype(jnp.int32)
    g = h // kh if kh and h % kh == 0 else 1
    rows = _rows(visible, g, round_up(t * g, ROW_ALIGN))
    return _launch("mask", q, k, v, lo, hi, hi, rows, layer=layer, scale=scale, block_s=block_s,
                   interpret=interpret)


def attention_tpu_prefix(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                         block_mask: jax.Array | None = None, *, scale: float | None = None, layer=None,
                         block_s: int = 512, interpret: bool = False) -> jax.Array:
    """q: [B, T, H, Dh], k/v: [B, K, S, Dh], lengths: int32[B], block_mask: bool[B, T, T] | None
    -> [B, T, H, Dh].

    Visibility by the prefix rule (`decoding.kernels.attention.prefix_visible`): slots
    `< lengths[b]` for every query, new slot `lengths[b] + j` for query t iff
    `block_mask[b, t, j]` (None: `j <= t`, a chain). The new tokens' keys/values must already
    be in the cache; slots at or past S do not exist. Reads only blocks below
    `lengths[b] + T`. Other arguments as in `attention_tpu`.
    """
    b, t, h, _ = q.shape
    kh, s_len = k.shape[-3], k.shape[-2]
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))
    if block_mask is None:
        block_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    elif block_mask.shape != (b, t, t):
        raise ValueError(f"block_mask must be bool[B, T, T] = {(b, t, t)}, got {block_mask.shape}.")
    g = h // kh if kh and h % kh == 0 else 1
    tp = round_up(t, LANES)
    rows = _rows(jnp.pad(block_mask, ((0, 0), (0, 0), (0, tp - t))), g, round_up(t * g, ROW_ALIGN))
    hi = jnp.minimum(lengths + t, s_len)
    return _launch("prefix", q, k, v, jnp.zeros_like(lengths), hi, lengths, rows, layer=layer, scale=scale,
                   block_s=block_s, interpret=interpret)
