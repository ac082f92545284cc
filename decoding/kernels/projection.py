"""Fused projections of a decoder layer for few rows: Pallas (Triton) kernels beside their jnp
references.

Legend: R rows (B * T tokens: a decode step or a short chain), D hidden (a normed input),
K input width of a plain projection, N output columns, F MLP width (gate and up each),
RP rows padded to a power of two >= 16 in registers, BK input rows of a weight tile, BN output
columns of a tile.

What is computed (the references, which the layers run when the kernels are off):
  `norm_matmul_reference`      rms_norm(x, norm_w) @ w (+ bias)          [R, D] -> [R, N]
  `norm_gate_up_reference`     act(gate) * up, [gate | up] = rms_norm(x, norm_w) @ w_gate_up
                                                                          [R, D] -> [R, F]
  `matmul_residual_reference`  residual + x @ w                          [R, K] -> [R, N]
with `decoding.numerics.rms_norm` (float32 statistics, the normed input rounded to x's dtype).

Why: at batch 1 a projection is a matrix-vector product whose cost is streaming its weight
once. XLA compiles these to reductions that reach 0.8-1.6 TB/s of an H100's 3.3 and launches
the norm, bias, activation and residual as kernels of their own (about 25 per layer,
`docs/performance.md`). Each kernel here is one launch per projection with its neighbours folded
in: norm + QKV (+ bias), output projection + residual, norm + gate/up + activation, down
projection + residual.

Choices:
* One program per tile of BN output columns, looping over the input in tiles of BK weight rows:
  every weight element is read once, by one program; the few rows of x (a few KB) are read by
  every program from L2. The norm is a first pass over x in each program (sum of squares), so
  no program waits on another. Default BN gives about 128 programs where N allows (H100: 132
  SMs); a BN of 16 bf16 columns reads weight rows in 32-byte sectors.
* Weights `[in, out]` as the model stores them (`decoding.llama`): no relayout at load time;
  with `layer=i` a kernel takes the stacked `[L, in, out]` weights (and norms, biases) and reads
  layer i where it lies, since a slice handed to a custom call can cost a copy of the weight.
  `norm_gate_up` reads the matching column tiles of the gate and up halves in one program, so
  the activation and product happen in registers.
* Rows are padded to RP = 16 in registers by masked loads (Triton's matrix product needs 16
  rows; no padded copy in memory); products run on the tensor cores, accumulated in float32
  (float32 operands in full float32, no tf32).
* The normed input is rounded to x's dtype before the product, as `rms_norm` does; the product,
  bias, activation and residual stay in float32 and are rounded once at the end (the references
  round the product first: 16-bit results differ by about one rounding, float32 ones by the
  summation order).
* Sizes that the tiles do not divide take masked edge tiles (Qwen2.5-1.5B: D 1536, q/k/v width 2048,
  F 8960, H * Dh 1536; 0.5B: D 896, q/k/v width 1152, F 4864 are divided by the defaults).

Public: `norm_matmul`, `norm_gate_up`, `matmul_residual` (kernels), their `*_reference`,
`Projections` (the layer's switch between both), `MAX_ROWS`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..numerics import rms_norm, split_parts

MAX_ROWS = 16
"""The layers use the kernels for at most this many rows (B * T); more rows are a matrix
product that XLA's GEMM handles well."""

_KERNEL_MAX_ROWS = 64  # registers: RP x BN accumulators per program
_TARGET_PROGRAMS = 128  # programs wanted per launch (132 SMs on an H100)
_TILE_BYTES = 16384  # bytes of weight per tile when BK is chosen by default


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def norm_matmul_reference(x: jax.Array, norm_w: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                          eps: float) -> jax.Array:
    """x: [..., D], norm_w: [D], w: [D, N], bias: [N] | None -> [..., N]: rms_norm(x) @ w (+ bias)."""
    out = jnp.dot(rms_norm(x, norm_w, eps), w)
    return out if bias is None else out + bias


def norm_gate_up_reference(x: jax.Array, norm_w: jax.Array, w_gate_up: jax.Array, *, eps: float,
                           activation: Callable = jax.nn.silu) -> jax.Array:
    """x: [..., D], norm_w: [D], w_gate_up: [D, 2F] (gate columns, then up) -> [..., F]:
    activation(gate) * up."""
    f = w_gate_up.shape[-1] // 2
    gate, up = split_parts(jnp.dot(rms_norm(x, norm_w, eps), w_gate_up), (("gate", f), ("up", f)))
    return activation(gate) * up


def matmul_residual_reference(x: jax.Array, w: jax.Array, residual: jax.Array) -> jax.Array:
    """x: [..., K], w: [K, N], residual: [..., N] -> [..., N]: residual + x @ w."""
    return residual + jnp.dot(x, w)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one launch: r rows padded to rp; k input rows in tiles of bk; output
    columns n (per half for gate/up) in tiles of bn; whether edge tiles need masks."""

    r: int
    rp: int
    k: int
    bk: int
    n: int
    bn: int
    compute: jnp.dtype  # dtype of the product's operands

    @property
    def k_tiles(self) -> int:
        return pl.cdiv(self.k, self.bk)

    @property
    def mask_k(self) -> bool:
        return self.k % self.bk != 0

    @property
    def mask_n(self) -> bool:
        return self.n % self.bn != 0


def _plan(x, w_dtype, n: int, block_n, block_k) -> _Plan:
    r, k = x.shape
    if not 1 <= r <= _KERNEL_MAX_ROWS:
        raise ValueError(f"the projection kernels take 1 to {_KERNEL_MAX_ROWS} rows (R = B * T), got {r}; "
                         "use the *_reference functions for more rows.")
    if k < 16 or n < 16:
        raise ValueError(f"the projection kernels need input and output widths >= 16 (Triton's matrix product), "
                         f"got {k} and {n}; use the *_reference functions.")
    for name, val in (("block_n", block_n), ("block_k", block_k)):
        if val is not None and (val < 16 or val & (val - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}.")
    if block_n is None:
        block_n = next((bn for bn in (128, 64, 32) if pl.cdiv(n, bn) >= _TARGET_PROGRAMS), 16)
    bn = min(block_n, _pow2_floor(n))
    compute = jnp.result_type(x.dtype, w_dtype)
    if block_k is None:
        block_k = max(32, min(512, _pow2_floor(_TILE_BYTES // (bn * jnp.dtype(w_dtype).itemsize))))
    bk = min(block_k, _pow2_floor(k))
    return _Plan(r=r, rp=max(16, 1 << (r - 1).bit_length()), k=k, bk=bk, n=n, bn=bn, compute=compute)


def _dot(a, b, *, interpret: bool):
    """a [M, K] @ b [K, N] accumulated in float32: float32 operands in full float32 (no tf32);
    16-bit operands are upcast in interpret mode, where the CPU has no such product."""
    full = a.dtype == jnp.float32 and b.dtype == jnp.float32
    if interpret and not full:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST if full else None,
                           preferred_element_type=jnp.float32)


def _rows_tile(ref, c0, width: int, limit: int, p: _Plan):
    """ref[0:R, c0:c0 + width] of a [R, C] ref as a [RP, width] tile; rows past R and columns
    at or past `limit` read as zeros."""
    rows = jnp.arange(p.rp, dtype=jnp.int32)
    cols = c0 + jnp.arange(width, dtype=jnp.int32)
    ok = jnp.broadcast_to((rows < p.r)[:, None] & (cols < limit)[None, :], (p.rp, width))
    r2 = jnp.broadcast_to(jnp.minimum(rows, p.r - 1)[:, None], (p.rp, width))
    c2 = jnp.broadcast_to(jnp.minimum(cols, limit - 1)[None, :], (p.rp, width))
    return plgpu.load(ref.at[r2, c2], mask=ok, other=0)


def _store_rows(ref, c0, value, limit: int, p: _Plan):
    """ref[0:R, c0:c0 + BN] = value[:R] (value: [RP, BN]), columns below `limit` only."""
    rows = jnp.arange(p.rp, dtype=jnp.int32)
    cols = c0 + jnp.arange(p.bn, dtype=jnp.int32)
    ok = jnp.broadcast_to((rows < p.r)[:, None] & (cols < limit)[None, :], (p.rp, p.bn))
    r2 = jnp.broadcast_to(rows[:, None], (p.rp, p.bn))  # not clamped: the interpreter drops writes
    c2 = jnp.broadcast_to(cols[None, :], (p.rp, p.bn))  # out of range, it would repeat clamped ones
    plgpu.store(ref.at[r2, c2], value.astype(ref.dtype), mask=ok)


def _vector_tile(ref, c0, width: int, limit: int, masked: bool):
    """ref[c0:c0 + width] of a 1-D ref (zeros at or past `limit` when `masked`)."""
    if not masked:
        return ref[pl.ds(c0, width)]
    cols = c0 + jnp.arange(width, dtype=jnp.int32)
    return plgpu.load(ref.at[pl.ds(c0, width)], mask=cols < limit, other=0)


def _weight_tile(w_ref, k0, c0, limit: int, p: _Plan):
    """w[k0:k0 + BK, c0:c0 + BN] as the product's dtype; rows at or past K and columns at or
    past `limit` read as zeros (masks only where the tiles do not divide)."""
    if not (p.mask_k or p.mask_n):
        tile = w_ref[pl.ds(k0, p.bk), pl.ds(c0, p.bn)]
    else:
        rows = k0 + jnp.arange(p.bk, dtype=jnp.int32)
        cols = c0 + jnp.arange(p.bn, dtype=jnp.int32)
        ok = jnp.broadcast_to((rows < p.k)[:, None] & (cols < limit)[None, :], (p.bk, p.bn))
        tile = plgpu.load(w_ref.at[pl.ds(k0, p.bk), pl.ds(c0, p.bn)], mask=ok, other=0)
    return tile.astype(p.compute)


def _inv_rms(x_ref, p: _Plan, eps: float):
    """float32[RP]: 1 / sqrt(mean(x ** 2) + eps) over the row (padded rows: 1 / sqrt(eps))."""

    def body(i, total):
        xt = _rows_tile(x_ref, i * p.bk, p.bk, p.k, p).astype(jnp.float32)
        return total + jnp.sum(xt * xt, axis=1)

    total = lax.fori_loop(0, p.k_tiles, body, jnp.zeros((p.rp,), jnp.float32))
    return lax.rsqrt(total / p.k + eps)


def _normed_tile(x_ref, nw_ref, k0, inv, p: _Plan):
    """rms_norm(x)[:, k0:k0 + BK] as `decoding.numerics.rms_norm` rounds it (x's dtype), then
    as the product's dtype."""
    xt = _rows_tile(x_ref, k0, p.bk, p.k, p).astype(jnp.float32)
    nw = _vector_tile(nw_ref, k0, p.bk, p.k, p.mask_k).astype(jnp.float32)
    return ((xt * inv[:, None]) * nw[None, :]).astype(x_ref.dtype).astype(p.compute)


def _norm_matmul_kernel(x_ref, nw_ref, w_ref, *refs, p: _Plan, eps: float, has_bias: bool, interpret: bool):
    """Program j: out[:, j * BN:(j + 1) * BN] = rms_norm(x) @ w[:, tile] (+ bias[tile])."""
    o_ref = refs[-1]
    n0 = pl.program_id(0) * p.bn
    inv = _inv_rms(x_ref, p, eps)

    def body(i, acc):
        k0 = i * p.bk
        return acc + _dot(_normed_tile(x_ref, nw_ref, k0, inv, p), _weight_tile(w_ref, k0, n0, p.n, p),
                          interpret=interpret)

    acc = lax.fori_loop(0, p.k_tiles, body, jnp.zeros((p.rp, p.bn), jnp.float32))
    if has_bias:
        acc = acc + _vector_tile(refs[0], n0, p.bn, p.n, p.mask_n).astype(jnp.float32)[None, :]
    _store_rows(o_ref, n0, acc, p.n, p)


def _norm_gate_up_kernel(x_ref, nw_ref, w_ref, o_ref, *, p: _Plan, eps: float, activation, interpret: bool):
    """Program j: out[:, tile] = act(h @ w[:, tile]) * (h @ w[:, F + tile]), h = rms_norm(x)."""
    n0 = pl.program_id(0) * p.bn
    inv = _inv_rms(x_ref, p, eps)

    def body(i, accs):
        k0 = i * p.bk
        h = _normed_tile(x_ref, nw_ref, k0, inv, p)
        gate = _dot(h, _weight_tile(w_ref, k0, n0, p.n, p), interpret=interpret)
        up = _dot(h, _weight_tile(w_ref, k0, p.n + n0, 2 * p.n, p), interpret=interpret)
        return accs[0] + gate, accs[1] + up

    zeros = jnp.zeros((p.rp, p.bn), jnp.float32)
    gate, up = lax.fori_loop(0, p.k_tiles, body, (zeros, zeros))
    _store_rows(o_ref, n0, activation(gate) * up, p.n, p)


def _matmul_residual_kernel(x_ref, w_ref, res_ref, o_ref, *, p: _Plan, interpret: bool):
    """Program j: out[:, tile] = residual[:, tile] + x @ w[:, tile]."""
    n0 = pl.program_id(0) * p.bn

    def body(i, acc):
        k0 = i * p.bk
        xt = _rows_tile(x_ref, k0, p.bk, p.k, p).astype(p.compute)
        return acc + _dot(xt, _weight_tile(w_ref, k0, n0, p.n, p), interpret=interpret)

    acc = lax.fori_loop(0, p.k_tiles, body, jnp.zeros((p.rp, p.bn), jnp.float32))
    residual = _rows_tile(res_ref, n0, p.bn, p.n, p).astype(jnp.float32)
    _store_rows(o_ref, n0, acc + residual, p.n, p)


def _launch(kernel, name: str, args, stacked, out_shape, p: _Plan, layer, num_warps: int, num_stages: int,
            interpret: bool):
    """One program per tile of BN output columns. Arguments flagged in `stacked` are [L, ...]
    stacks of which the kernel sees layer `layer` only, read where it lies (a slice taken
    outside would be a copy of the weight before the kernel); the others are seen whole."""
    specs = []
    for a, is_stacked in zip(args, stacked):
        if is_stacked and layer is not None:
            specs.append(pl.BlockSpec((None, *a.shape[1:]), lambda j, n=layer, nd=a.ndim - 1: (n,) + (0,) * nd))
        else:
            specs.append(pl.BlockSpec(a.shape, lambda j, nd=a.ndim: (0,) * nd))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(p.n, p.bn),),
        in_specs=specs,
        out_specs=pl.BlockSpec(out_shape.shape, lambda j: (0, 0)),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def _flat(x: jax.Array, name: str, width: int) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} must be [..., {width}], got {x.shape}.")
    return x.reshape(-1, width)


def _layer_view(layer, w: jax.Array, *vectors) -> tuple:
    """The per-layer shapes (w [In, Out], each vector [W]) of possibly stacked arguments; checks
    `layer` against the stack."""
    if layer is None:
        return w.shape, tuple(None if v is None else v.shape for v in vectors)
    if not isinstance(layer, int) or w.ndim != 3 or not 0 <= layer < w.shape[0]:
        raise ValueError(f"layer={layer!r} needs a static int below L and a stacked weight [L, In, Out]; "
                         f"got w {w.shape}.")
    for v in vectors:
        if v is not None and (v.ndim != 2 or v.shape[0] != w.shape[0]):
            raise ValueError(f"with layer={layer}, the norm and bias are stacked too ([L, W], L = {w.shape[0]}); "
                             f"got {v.shape}.")
    return w.shape[1:], tuple(None if v is None else v.shape[1:] for v in vectors)


def norm_matmul(x: jax.Array, norm_w: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, eps: float,
                layer: int | None = None, block_n: int | None = None, block_k: int | None = None,
                num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """x: [..., D], norm_w: [D], w: [D, N], bias: [N] | None -> [..., N]: `norm_matmul_reference`
    in one kernel (the rows R = prod(...) at most 64).

    `layer`: a static int; norm_w, w and bias are then stacks [L, D], [L, D, N], [L, N] and
    layer `layer` of each is read where it lies (as `decoding.llama` stores them).
    `block_n`, `block_k`: output columns and weight rows per tile (powers of two >= 16; None:
    about 128 programs, 16 KiB weight tiles); `num_warps`, `num_stages`: Triton's warps per
    program and software-pipelining depth. `interpret=True` runs the Pallas interpreter.
    """
    (d, n), (nw_shape, b_shape) = _layer_view(layer, w, norm_w, bias)
    if nw_shape != (d,) or (bias is not None and b_shape != (n,)):
        raise ValueError(f"w {w.shape} needs norm_w: [{d}] and bias: [{n}] or None (stacked alike with `layer`); "
                         f"got norm_w {norm_w.shape}, bias {None if bias is None else bias.shape}.")
    x2 = _flat(x, "x", d)
    p = _plan(x2, w.dtype, n, block_n, block_k)
    dtype = jnp.result_type(x.dtype, w.dtype, *(() if bias is None else (bias.dtype,)))
    kernel = functools.partial(_norm_matmul_kernel, p=p, eps=float(eps), has_bias=bias is not None,
                               interpret=interpret)
    args = (x2, norm_w, w) + (() if bias is None else (bias,))
    out = _launch(kernel, "norm_matmul", args, (False, True, True, True), jax.ShapeDtypeStruct((p.r, n), dtype), p,
                  layer, num_warps, num_stages, interpret)
    return out.reshape(*x.shape[:-1], n)


def norm_gate_up(x: jax.Array, norm_w: jax.Array, w_gate_up: jax.Array, *, eps: float,
                 activation: Callable = jax.nn.silu, layer: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, num_warps: int = 4, num_stages: int = 3,
                 interpret: bool = False) -> jax.Array:
    """x: [..., D], norm_w: [D], w_gate_up: [D, 2F] -> [..., F]: `norm_gate_up_reference` in one
    kernel; `activation` is applied in float32 inside it (any jnp function Triton lowers: SiLU,
    GELU). `layer`, tiles and flags as in `norm_matmul`, with BN columns of each half per program."""
    (d, two_f), (nw_shape,) = _layer_view(layer, w_gate_up, norm_w)
    if nw_shape != (d,) or two_f % 2:
        raise ValueError(f"w_gate_up must be [D, 2F] with norm_w: [D] (stacked alike with `layer`); got "
                         f"w_gate_up {w_gate_up.shape}, norm_w {norm_w.shape}.")
    f = two_f // 2
    x2 = _flat(x, "x", d)
    p = _plan(x2, w_gate_up.dtype, f, block_n, block_k)
    kernel = functools.partial(_norm_gate_up_kernel, p=p, eps=float(eps), activation=activation,
                               interpret=interpret)
    out = _launch(kernel, "norm_gate_up", (x2, norm_w, w_gate_up), (False, True, True),
                  jax.ShapeDtypeStruct((p.r, f), jnp.result_type(x.dtype, w_gate_up.dtype)), p, layer, num_warps,
                  num_stages, interpret)
    return out.reshape(*x.shape[:-1], f)


def matmul_residual(x: jax.Array, w: jax.Array, residual: jax.Array, *, layer: int | None = None,
                    block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                    num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """x: [..., K], w: [K, N], residual: [..., N] -> [..., N]: `matmul_residual_reference` in one
    kernel. `layer` (w a stack [L, K, N]), tiles and flags as in `norm_matmul`."""
    (k, n), _ = _layer_view(layer, w)
    if residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"residual must be x's rows by w's columns, {(*x.shape[:-1], n)}; got {residual.shape}.")
    x2 = _flat(x, "x", k)
    p = _plan(x2, w.dtype, n, block_n, block_k)
    kernel = functools.partial(_matmul_residual_kernel, p=p, interpret=interpret)
    dtype = jnp.result_type(residual.dtype, x.dtype, w.dtype)
    out = _launch(kernel, "matmul_residual", (x2, w, residual.reshape(-1, n)), (False, True, False),
                  jax.ShapeDtypeStruct((p.r, n), dtype), p, layer, num_warps, num_stages, interpret)
    return out.reshape(residual.shape)


# --------------------------------------------------------------------------------------------
# The layers' switch
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Projections:
    """The three fused projections a layer runs: the kernels (`kernel=True`; `interpret` for
    hosts without a GPU) or the references. `Projections.choose` decides per call. Each method
    takes `layer=i` with stacked weights (the kernels read layer i in place, the references
    slice it)."""

    kernel: bool = False
    interpret: bool = False

    @classmethod
    def choose(cls, impl: str, rows: int, sharded: bool = False) -> Projections:
        """impl "pallas" (`decoding.Options.projections`) takes the kernels for at most MAX_ROWS
        rows on one device: compiled on GPUs, interpreted on CPUs (tests); TPUs, meshes and
        more rows take the references."""
        backend = jax.default_backend()
        use = impl == "pallas" and rows <= MAX_ROWS and not sharded and backend != "tpu"
        return cls(kernel=use, interpret=use and backend != "gpu")

    def norm_matmul(self, x, norm_w, w, bias=None, *, eps: float, layer: int | None = None):
        if self.kernel:
            return norm_matmul(x, norm_w, w, bias, eps=eps, layer=layer, interpret=self.interpret)
        norm_w, w, bias = _pick(layer, norm_w, w, bias)
        return norm_matmul_reference(x, norm_w, w, bias, eps=eps)

    def norm_gate_up(self, x, norm_w, w_gate_up, *, eps: float, activation: Callable = jax.nn.silu,
                     layer: int | None = None):
        if self.kernel:
            return norm_gate_up(x, norm_w, w_gate_up, eps=eps, activation=activation, layer=layer,
                                interpret=self.interpret)
        norm_w, w_gate_up = _pick(layer, norm_w, w_gate_up)
        return norm_gate_up_reference(x, norm_w, w_gate_up, eps=eps, activation=activation)

    def matmul_residual(self, x, w, residual, *, layer: int | None = None):
        if self.kernel:
            return matmul_residual(x, w, residual, layer=layer, interpret=self.interpret)
        (w,) = _pick(layer, w)
        return matmul_residual_reference(x, w, residual)


def _pick(layer, *stacks):
    """Layer `layer` of each stack (None passes through); all arguments as given when layer is None."""
    if layer is None:
        return stacks
    return tuple(None if a is None else a[layer] for a in stacks)
