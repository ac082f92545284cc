"""Micro-benchmarks of the Pallas kernels against their jnp references: the decode/verification
attention (`--kernel attention`, the default) and the fused projections (`--kernel projection`).

Shapes are those of decoding with Qwen2.5-1.5B (H=12, K=2, Dh=128) and Qwen2.5-0.5B (H=14, K=2,
Dh=64): batch B, T new query tokens (1: decode, 5: a chain, 61: a tree with a random ancestor
mask) against a cache of capacity S holding `fill * S - T` committed slots, bf16.

Each variant runs once per layer over `--layers` distinct cache buffers inside one jitted
function (as the unrolled model does), so the caches together exceed the L2 cache and the
time per layer includes each kernel's launch; the median over `--reps` calls is reported,
after warm-up calls that compile. Variants:

  reference       decoding.kernels.attention_reference on the [B, T, S] mask (the model's path)
  pallas_mask     the kernel on the same mask
  pallas_prefix   the kernel on lengths + block mask (no [B, T, S] mask read)
  pallas_unified  pallas_prefix with FlashDecoding++'s unified max (phi = --phi)
  tpu_mask        the TPU (Mosaic) kernel on the mask (decoding.kernels.attention_tpu)
  tpu_prefix      the TPU kernel on lengths + block mask

The default variants follow the backend: the Triton ones on GPUs, the TPU ones on TPUs (with
`--tpu-block-s` slots per block, a multiple of 128); `--variants` overrides.

Correctness: ||out - exact|| / ||exact|| where `exact` is the reference on float32 copies of
the inputs. The floor is the bytes a kernel must move (live keys and values, queries, output)
over the copy bandwidth measured here (a large device-to-device copy, bytes read + written).

Projections (`--kernel projection`, `decoding.kernels.projection`): the four fused steps of a
Llama-family layer at Qwen2.5 shapes for R = B * T rows (`--rows`): norm + QKV + bias
(`norm_qkv`), output projection + residual (`wo_residual`), norm + gate/up + SiLU
(`norm_gate_up`), down projection + residual (`down_residual`). Each runs once per layer over
`--layers` distinct weights held in one stacked [L, ...] array as the model holds them; variants
`reference` (the jnp path the layer runs by default, on slices, as XLA compiles it), `pallas`
(the kernel reading each layer in the stacks, as the unrolled model runs it), `pallas_sliced`
(the kernel on slices: what a slice costs before a custom call; `copies` counts the copy
instructions of the compiled program).
GB/s counts the weight bytes read (weight, norm, bias) per layer over the time per layer.

    python -m experiments.bench_kernels --out experiments/results/kernels
    python -m experiments.bench_kernels --kernel projection --out experiments/results/projections
    python -m experiments.bench_kernels --interpret --tiny --out /tmp/kernels   # CPU smoke test
    python -m experiments.bench_kernels --out experiments/results/kernels_tpu   # on a TPU host
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decoding.kernels import (
    attention_pallas,
    attention_pallas_prefix,
    attention_reference,
    attention_tpu,
    attention_tpu_prefix,
    prefix_visible,
)
from decoding.kernels import projection
from drafting.shapes import ancestor_mask

from . import environment

MODELS = {"qwen2.5-1.5b": dict(h=12, kh=2, dh=128), "qwen2.5-0.5b": dict(h=14, kh=2, dh=64)}
VARIANTS = ("reference", "pallas_mask", "pallas_prefix", "pallas_unified")
TPU_VARIANTS = ("reference", "tpu_mask", "tpu_prefix")
# D hidden, QKV = (H + 2K) * Dh, F MLP width, HD = H * Dh
PROJECTION_MODELS = {"qwen2.5-1.5b": dict(d=1536, qkv=2048, f=8960, hd=1536),
                     "qwen2.5-0.5b": dict(d=896, qkv=1152, f=4864, hd=896),
                     "tiny": dict(d=64, qkv=96, f=80, hd=64)}  # CPU smoke tests
PROJECTION_OPS = ("norm_qkv", "wo_residual", "norm_gate_up", "down_residual")
PROJECTION_VARIANTS = ("reference", "pallas", "pallas_sliced")


def tree_mask(rng: np.random.Generator, t: int) -> np.ndarray:
    """Ancestor mask bool[T, T] of a random tree whose nodes are numbered parents first."""
    parents = np.array([[-1] + [int(rng.integers(0, i)) for i in range(1, t)]])
    return ancestor_mask(parents)[0]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 copies."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def make_case(key, model: dict, b: int, t: int, s: int, layers: int, fill: float, dtype):
    h, kh, dh = model["h"], model["kh"], model["dh"]
    kq, kk, kv, kl = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, t, h, dh), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (layers, b, kh, s, dh), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (layers, b, kh, s, dh), jnp.float32).astype(dtype)
    top = max(1, int(fill * s) - t)
    lengths = jax.random.randint(kl, (b,), max(0, top - 8), top + 1).astype(jnp.int32)
    rng = np.random.default_rng(int(jax.random.randint(kl, (), 0, 2**31 - 1)))
    block_mask = None if t <= 5 else jnp.asarray(np.stack([tree_mask(rng, t) for _ in range(b)]))
    visible = prefix_visible(lengths, block_mask, t, s)
    return q, k, v, lengths, block_mask, visible


def variant_fn(name: str, *, interpret: bool, phi: float, block_s: int, num_splits, tpu_block_s: int = 512):
    """fn(q, k_all, v_all, layer, lengths, block_mask, visible) -> [B, T, H, Dh] for layer `layer`
    (a Python int) of the stacked caches k_all, v_all: [L, B, K, S, Dh]. The reference slices the
    layer out, as `decoding.model` does; the kernel reads it in place (`layer=`)."""
    kw = dict(interpret=interpret, block_s=block_s, num_splits=num_splits)
    if name == "reference":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_reference(q, k[i], v[i], visible)
    if name == "pallas_mask":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_pallas(q, k, v, visible, layer=i, **kw)
    if name == "pallas_prefix":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_pallas_prefix(
            q, k, v, lengths, block_mask, layer=i, **kw)
    if name == "pallas_unified":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_pallas_prefix(
            q, k, v, lengths, block_mask, layer=i, unified_max=phi, **kw)
    tpu_kw = dict(interpret=interpret, block_s=tpu_block_s)
    if name == "tpu_mask":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_tpu(q, k, v, visible, layer=i, **tpu_kw)
    if name == "tpu_prefix":
        return lambda q, k, v, i, lengths, block_mask, visible: attention_tpu_prefix(
            q, k, v, lengths, block_mask, layer=i, **tpu_kw)
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS + TPU_VARIANTS[1:]}.")


def one_layer(fn):
    return jax.jit(lambda q, k, v, lengths, block_mask, visible: fn(q, k, v, 0, lengths, block_mask, visible))


def all_layers(fn):
    """One jitted call running `fn` once per layer buffer (unrolled, as the model on GPUs)."""

    @jax.jit
    def run(q, k, v, lengths, block_mask, visible):
        return [fn(q, k, v, i, lengths, block_mask, visible) for i in range(k.shape[0])]

    return run


def time_call(f, args, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(compile + first run seconds, median seconds of `reps` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def rel_err(out, exact) -> float:
    out, exact = np.asarray(out, np.float64), np.asarray(exact, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - exact) / max(np.linalg.norm(exact), 1e-30))


def live_bytes(q, k, lengths, t) -> int:
    """Bytes the kernel must move for one layer: live keys + values, queries, output."""
    _, b, kh, s, dh = k.shape
    slots = np.minimum(np.asarray(lengths) + t, s).sum()
    return int(2 * kh * slots * dh * k.dtype.itemsize + 2 * q.size * q.dtype.itemsize)


def check_accuracy(row: dict, out, exact, dtype) -> None:
    """row["rel_err"] of `out` against `exact`, and row["ok"]: within bf16's or float32's tolerance."""
    row["rel_err"] = rel_err(out, exact)
    row["ok"] = bool(row["rel_err"] < (1e-2 if dtype == jnp.bfloat16 else 1e-4))


def record_variant(rows: list[dict], row: dict, label: str, measure, *, layers: int, nbytes: int,
                   floor_us: float | None, ref_us: float | None) -> float | None:
    """Append one variant's `row` to `rows`: with row["error"] when `measure()` (which checks the
    accuracy and returns (compile + first run seconds, seconds per call of `layers` layers))
    fails, else its time per layer, GB/s of `nbytes` per layer, floor and speedup over `ref_us`.
    A failing variant is reported (printed under `label`), not fatal. Returns the reference's
    time per layer: this variant's when it is the reference, else `ref_us`."""
    try:
        compile_s, per_call = measure()
    except Exception as err:  # a variant that fails to build is reported, not fatal
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
        print(f"{label}: FAILED {row['error']}", flush=True)
        return ref_us
    us = 1e6 * per_call / layers
    row.update(us_per_layer=us, compile_s=compile_s, floor_us=floor_us, gbps=nbytes / (us * 1e-6) / 1e9)
    if row["variant"] == "reference":
        ref_us = us
    row["speedup_vs_reference"] = None if ref_us is None else ref_us / us
    rows.append(row)
    return ref_us


def _measure_attention(row, fn, case, exact, dtype, reps: int) -> tuple[float, float]:
    check_accuracy(row, one_layer(fn)(*case), exact, dtype)
    return time_call(all_layers(fn), case, reps)


def run(args, on_case=None) -> tuple[list[dict], float | None]:
    """Every (model, B, T, S) case x variant; `on_case(rows, bw)` after each case, so a run cut off
    by a time limit keeps what it measured."""
    dtype = jnp.dtype(args.dtype)
    rows = []
    bw = None if args.interpret else copy_bandwidth()
    key = jax.random.PRNGKey(args.seed)
    for model_name in args.models:
        model = MODELS[model_name]
        for b in args.batch_sizes:
            for t in args.tokens:
                for s in args.capacities:
                    key, sub = jax.random.split(key)
                    case = make_case(sub, model, b, t, s, args.layers, args.fill, dtype)
                    q, k, v, lengths, block_mask, visible = case
                    with jax.default_matmul_precision("float32"):  # not tf32
                        exact = attention_reference(q.astype(jnp.float32), k[0].astype(jnp.float32),
                                                    v[0].astype(jnp.float32), visible)
                    nbytes = live_bytes(q, k, lengths, t)
                    floor_us = None if bw is None else 1e6 * nbytes / bw
                    ref_us = None
                    for name in args.variants:
                        fn = variant_fn(name, interpret=args.interpret, phi=args.phi, block_s=args.block_s,
                                        num_splits=args.num_splits, tpu_block_s=args.tpu_block_s)
                        row = dict(model=model_name, B=b, T=t, S=s, H=model["h"], K=model["kh"], Dh=model["dh"],
                                   variant=name, dtype=args.dtype, mean_length=float(np.mean(np.asarray(lengths))))
                        measure = functools.partial(_measure_attention, row, fn, case, exact, dtype, args.reps)
                        ref_us = record_variant(rows, row, f"{model_name} B={b} T={t} S={s} {name}", measure,
                                                layers=args.layers, nbytes=nbytes, floor_us=floor_us, ref_us=ref_us)
                        if "error" in row:
                            continue
                        us = row["us_per_layer"]
                        print(f"{model_name} B={b} T={t} S={s} {name:15s} {us:9.1f} us/layer "
                              f"err={row['rel_err']:.1e}{'' if row['ok'] else ' WRONG'}", flush=True)
                    if on_case is not None:
                        on_case(rows, bw)
    return rows, bw


# --------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------


def projection_case(key, model: dict, op: str, r: int, layers: int, dtype):
    """(x [R, In], per-layer weights {name: [L, ...]}) of one fused step: the input, and for
    every layer the weight [In, Out], the norm [In] (norm ops), the bias [Out] (norm_qkv) and
    the residual [R, D] (residual ops, shared)."""
    d = model["d"]
    n_in, n_out = {"norm_qkv": (d, model["qkv"]), "wo_residual": (model["hd"], d),
                   "norm_gate_up": (d, 2 * model["f"]), "down_residual": (model["f"], d)}[op]
    kx, kw, kn, kb, kr = jax.random.split(key, 5)
    x = (2.0 * jax.random.normal(kx, (r, n_in), jnp.float32) + 0.5).astype(dtype)
    weights = {"w": (jax.random.normal(kw, (layers, n_in, n_out), jnp.float32) * n_in ** -0.5).astype(dtype)}
    if op.startswith("norm"):
        weights["norm"] = (1.0 + 0.2 * jax.random.normal(kn, (layers, n_in), jnp.float32)).astype(dtype)
    if op == "norm_qkv":
        weights["bias"] = jax.random.normal(kb, (layers, n_out), jnp.float32).astype(dtype)
    if op.endswith("residual"):
        weights["residual"] = jax.random.normal(kr, (r, n_out), jnp.float32).astype(dtype)
    return x, weights


def projection_fn(op: str, variant: str, *, interpret: bool, eps: float = 1e-6):
    """fn(x, weights, i) -> [R, Out] for layer i of the stacked weights {name: [L, ...]} (the
    residual [R, Out] is shared): the jnp path on slices (as the layer runs it), the kernel reading
    layer i in the stacks (`pallas`, as the unrolled model does) or on slices (`pallas_sliced`)."""
    if variant not in PROJECTION_VARIANTS:
        raise ValueError(f"unknown projection variant {variant!r}; expected one of {PROJECTION_VARIANTS}.")
    use = variant != "reference"
    proj = projection.Projections(kernel=use, interpret=use and interpret)

    def fn(x, weights, i):
        if variant == "pallas_sliced":
            weights, i = {k: v if k == "residual" else v[i] for k, v in weights.items()}, None
        if op == "norm_qkv":
            return proj.norm_matmul(x, weights["norm"], weights["w"], weights["bias"], eps=eps, layer=i)
        if op == "norm_gate_up":
            return proj.norm_gate_up(x, weights["norm"], weights["w"], eps=eps, layer=i)
        return proj.matmul_residual(x, weights["w"], weights["residual"], layer=i)

    return fn


def projection_layers(fn):
    """One jitted call running `fn` once per layer of the stacks (unrolled, as the model on GPUs)."""

    @jax.jit
    def run(x, weights):
        return [fn(x, weights, i) for i in range(weights["w"].shape[0])]

    return run


def hlo_copies(f, args) -> int:
    """Copy instructions in the compiled program (a weight slice materialised before a kernel shows here)."""
    text = f.lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if " copy(" in line or "copy-start(" in line)


def _measure_projection(row, op: str, variant: str, x, weights, exact, dtype, args) -> tuple[float, float]:
    fn = projection_fn(op, variant, interpret=args.interpret)
    check_accuracy(row, jax.jit(functools.partial(fn, i=0))(x, weights), exact, dtype)
    f = projection_layers(fn)
    call_args = (x, weights)
    timing = time_call(f, call_args, args.reps)
    row["hlo_copies"] = None if args.interpret else hlo_copies(f, call_args)
    return timing


def run_projections(args, on_case=None) -> tuple[list[dict], float | None]:
    """Every (model, R, op) case x variant; `on_case(rows, bw)` after each case."""
    dtype = jnp.dtype(args.dtype)
    rows = []
    bw = None if args.interpret else copy_bandwidth()
    key = jax.random.PRNGKey(args.seed)
    for model_name in args.models:
        model = PROJECTION_MODELS[model_name]
        for r in args.rows:
            for op in args.ops:
                key, sub = jax.random.split(key)
                x, weights = projection_case(sub, model, op, r, args.layers, dtype)
                with jax.default_matmul_precision("float32"):  # not tf32
                    exact = projection_fn(op, "reference", interpret=False)(
                        x.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in weights.items()}, 0)
                nbytes = sum(int(v[0].size) * v.dtype.itemsize for k, v in weights.items() if k != "residual")
                floor_us = None if bw is None else 1e6 * nbytes / (bw / 2)  # reading only: half the copy's bytes
                ref_us = None
                for name in args.projection_variants:
                    row = dict(model=model_name, op=op, R=r, In=int(x.shape[1]), Out=int(weights["w"].shape[2]),
                               variant=name, dtype=args.dtype, weight_bytes=nbytes)
                    measure = functools.partial(_measure_projection, row, op, name, x, weights, exact, dtype, args)
                    ref_us = record_variant(rows, row, f"{model_name} R={r} {op} {name}", measure, layers=args.layers,
                                            nbytes=nbytes, floor_us=floor_us, ref_us=ref_us)
                    if "error" in row:
                        continue
                    us = row["us_per_layer"]
                    print(f"{model_name} R={r} {op:14s} {name:16s} {us:9.1f} us/layer {row['gbps']:7.0f} GB/s "
                          f"err={row['rel_err']:.1e}{'' if row['ok'] else ' WRONG'}", flush=True)
                if on_case is not None:
                    on_case(rows, bw)
    return rows, bw


def projection_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Fused projections: Pallas kernels vs the jnp path",
        "",
        f"Device: {meta['environment'].get('device', {})}; dtype {meta['args']['dtype']}; "
        f"{meta['args']['layers']} layers' weights per call; median of {meta['args']['reps']} calls; "
        f"copy bandwidth {meta['copy_bandwidth_gbps'] or 'n/a'} GB/s (read + written); "
        f"interpret={meta['args']['interpret']}. GB/s: weight bytes read per layer over the time per layer; "
        "floor: those bytes at half the copy bandwidth (reads only).",
        "",
        *([] if meta.get("complete", True) else
          [f"Incomplete: {meta['cases_done']} of {meta['cases_total']} (model, R, op) cases measured "
           "(the run was stopped before the rest).", ""]),
        "| model | R | op | in x out | variant | us/layer | floor us | GB/s (weights) | x reference | rel err | "
        "copies | ok |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['R']} | {r['op']} | {r['In']} x {r['Out']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | | no |")
            continue
        floor = "" if r["floor_us"] is None else f"{r['floor_us']:.1f}"
        speed = "" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}"
        copies = "" if r.get("hlo_copies") is None else str(r["hlo_copies"])
        lines.append(f"{head} {r['us_per_layer']:.1f} | {floor} | {r['gbps']:.0f} | {speed} | {r['rel_err']:.1e} | "
                     f"{copies} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Decode/verification attention: Pallas kernels vs jnp reference",
        "",
        f"Device: {meta['environment'].get('device', {})}; dtype {meta['args']['dtype']}; "
        f"{meta['args']['layers']} layer buffers per call; median of {meta['args']['reps']} calls; "
        f"copy bandwidth {meta['copy_bandwidth_gbps'] or 'n/a'} GB/s; interpret={meta['args']['interpret']}.",
        "",
        *([] if meta.get("complete", True) else
          [f"Incomplete: {meta['cases_done']} of {meta['cases_total']} (model, B, T, S) cases measured "
           "(the run was stopped before the rest).", ""]),
        "| model | B | T | S | variant | us/layer | floor us | GB/s (live bytes) | x reference | rel err | ok |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['B']} | {r['T']} | {r['S']} | {r['variant']} | failed: "
                         f"{r['error']} | | | | | no |")
            continue
        floor = "" if r["floor_us"] is None else f"{r['floor_us']:.1f}"
        speed = "" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}"
        lines.append(f"| {r['model']} | {r['B']} | {r['T']} | {r['S']} | {r['variant']} | "
                     f"{r['us_per_layer']:.1f} | {floor} | {r['gbps']:.0f} | {speed} | {r['rel_err']:.1e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--kernel", choices=("attention", "projection"), default="attention",
                   help="attention: the decode/verification attention; projection: the fused projections")
    p.add_argument("--models", type=lambda s: s.split(","), default=None,
                   help="default: every model of the kernel's table")
    p.add_argument("--rows", type=ints, default=[1, 8], help="projection: R = B * T rows")
    p.add_argument("--ops", type=lambda s: s.split(","), default=list(PROJECTION_OPS), help="projection steps")
    p.add_argument("--projection-variants", type=lambda s: s.split(","), default=list(PROJECTION_VARIANTS))
    p.add_argument("--batch-sizes", type=ints, default=[1, 8])
    p.add_argument("--tokens", type=ints, default=[1, 5, 61])
    p.add_argument("--capacities", type=ints, default=[512, 2048])
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help="default: the Triton variants, or the TPU ones on a TPU backend")
    p.add_argument("--layers", type=int, default=8, help="distinct cache buffers per timed call")
    p.add_argument("--fill", type=float, default=1.0, help="committed fraction of the capacity")
    p.add_argument("--phi", type=float, default=0.0, help="unified max for pallas_unified")
    p.add_argument("--block-s", type=int, default=64)
    p.add_argument("--num-splits", type=int, default=None)
    p.add_argument("--tpu-block-s", type=int, default=512, help="slots per block of the TPU kernel")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpret", action="store_true", help="run the kernel in the Pallas interpreter (CPU)")
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke test")
    p.add_argument("--out", default="experiments/results/kernels", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = [m for m in PROJECTION_MODELS if m != "tiny"] if args.kernel == "projection" else list(MODELS)
    if args.variants is None:
        args.variants = list(TPU_VARIANTS if jax.default_backend() == "tpu" else VARIANTS)
    if args.tiny:
        args.batch_sizes, args.tokens, args.capacities = [2], [5], [70]
        args.layers, args.reps, args.block_s, args.tpu_block_s = 2, 2, 16, 128
        args.models = ["tiny"] if args.kernel == "projection" else args.models[:1]
        args.rows = [2]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment.describe()
    if args.kernel == "projection":
        total = len(args.models) * len(args.rows) * len(args.ops)
        case_of, bench, table_of = (lambda r: (r["model"], r["R"], r["op"])), run_projections, projection_markdown
    else:
        total = len(args.models) * len(args.batch_sizes) * len(args.tokens) * len(args.capacities)
        case_of, bench, table_of = (lambda r: (r["model"], r["B"], r["T"], r["S"])), run, markdown

    def save(rows: list[dict], bw: float | None) -> str:
        done = len({case_of(r) for r in rows})
        meta = dict(args=vars(args), environment=env, copy_bandwidth_gbps=None if bw is None else round(bw / 1e9, 1),
                    complete=done == total, cases_done=done, cases_total=total)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
        table = table_of(rows, meta)
        out.with_suffix(".md").write_text(table)
        return table

    bench(args, on_case=save)  # writes OUT.json and OUT.md after every case
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
