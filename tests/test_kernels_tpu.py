"""decoding.kernels.attention_tpu: the Mosaic kernel in the Pallas interpreter (CPU) against the
jnp reference, the dispatcher's choice on TPUs, and its lowering for TPU on a CPU host.

No TPU is lent to this project: these tests run the kernel's program through the interpreter
and check that `jax.export` lowers it to a Mosaic custom call for the "tpu" platform; whether
Mosaic compiles it for a given chip, and how fast it runs there, is not tested.
In interpret mode outputs start as NaN, so an element the kernel failed to write fails the
finiteness checks.
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import FAST_COMPILE, fresh_seed, make_inputs, rel_err, tree_mask

from decoding.kernels import attention, attention_reference, attention_tpu, attention_tpu_prefix, prefix_visible
from decoding.kernels.attention_tpu import block_to_read, live_blocks

attention_module = importlib.import_module("decoding.kernels.attention")


@functools.lru_cache(maxsize=None)
def _jitted(fn, static: tuple):
    return jax.jit(functools.partial(fn, **dict(static)), compiler_options=FAST_COMPILE)


def run(fn, *args, **static):
    """`fn(*args, **static)` under one jit per (function, static arguments)."""
    return _jitted(fn, tuple(sorted(static.items())))(*args)


def reference(q, k, v, visible):
    return run(attention_reference, q, k, v, visible)


def visible_of(lengths, block_mask, t, s):
    return run(prefix_visible, lengths, block_mask, t=t, capacity=s)


# (B, T, H, K, S, Dh, kind): decode with G = 4, a chain with G = 2, a tree with G = 3 (36 query
# rows), multi-head attention (G = 1). S is never a multiple of the 128-slot blocks, so the last
# block is partial; lengths are ragged (0, mid, next to the capacity, whose new slots run past S).
CASES = [
    (3, 1, 8, 2, 300, 32, "causal"),
    (2, 5, 4, 2, 260, 32, "causal"),
    (2, 12, 6, 2, 200, 64, "tree"),
    (2, 3, 2, 2, 150, 32, "causal"),
]


def prefix_case(seed, b, t, h, kh, s, dh, kind, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh, dtype)
    lengths = rng.integers(0, s - t, size=b)
    lengths[0], lengths[-1] = 0, s - max(1, t // 2)
    lengths = jnp.asarray(lengths, jnp.int32)
    block_mask = None if kind == "causal" else jnp.asarray(np.stack([tree_mask(rng, t) for _ in range(b)]))
    return q, k, v, lengths, block_mask


@pytest.mark.parametrize("case", CASES, ids=lambda x: "B{}_T{}_H{}_K{}_S{}_Dh{}_{}".format(*x))
def test_tpu_kernel_matches_reference_float32(case):
    seed = fresh_seed()
    b, t, h, kh, s, dh, kind = case
    q, k, v, lengths, block_mask = prefix_case(seed, *case)
    visible = visible_of(lengths, block_mask, t, s)
    ref = reference(q, k, v, visible)
    out_prefix = run(attention_tpu_prefix, q, k, v, lengths, block_mask, interpret=True, block_s=128)
    out_mask = run(attention_tpu, q, k, v, visible, interpret=True, block_s=128)
    for out in (out_prefix, out_mask):
        assert out.shape == q.shape and out.dtype == q.dtype
        assert np.all(np.isfinite(out)), f"seed {seed}"
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")


def test_tpu_kernel_bfloat16_accumulates_in_float32():
    seed = fresh_seed()
    case = (2, 12, 6, 2, 290, 64, "tree")
    t, s = case[1], case[4]
    q, k, v, lengths, block_mask = prefix_case(seed, *case, dtype=jnp.bfloat16)
    visible = visible_of(lengths, block_mask, t, s)
    exact = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), visible)
    ref = reference(q, k, v, visible)
    for out in (run(attention_tpu_prefix, q, k, v, lengths, block_mask, interpret=True, block_s=128),
                run(attention_tpu, q, k, v, visible, interpret=True, block_s=128)):
        assert out.dtype == jnp.bfloat16
        assert rel_err(out, exact) < 1e-2, f"seed {seed}"
        assert rel_err(out, ref) < 1e-2, f"seed {seed}"


def test_tpu_mask_with_holes_and_queries_that_see_nothing():
    """A slot mask with holes whose span starts past the first block, a padding query, a row
    that sees nothing at all, and NaN in every slot no query sees: the kernel equals the
    reference on clean inputs, and unseeing queries return zeros."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, t, h, kh, s, dh = 3, 4, 4, 2, 400, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    visible = rng.random((b, t, s)) < 0.3
    visible[0, :, :150] = False  # the span read starts in the second 128-slot block
    visible[0, :, 260:] = False  # and ends in the third: the fourth is never read
    visible[0, 2] = False  # a padding query
    visible[2] = False  # a row with no visible slot at all
    ref = reference(q, k, v, jnp.asarray(visible))
    dead = ~visible.any(axis=1)[:, None, :, None]  # [B, 1, S, 1]: slots no query of the row sees
    spans = np.zeros_like(dead)
    spans[0, :, 150:260] = True
    spans[1] = True
    k_nan, v_nan = (jnp.where(jnp.asarray(dead & ~spans), jnp.nan, x) for x in (k, v))
    out = run(attention_tpu, q, k_nan, v_nan, jnp.asarray(visible), interpret=True, block_s=128)
    assert np.all(np.isfinite(out)), f"seed {seed}"
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)


def test_tpu_prefix_ignores_slots_past_the_live_span():
    """Slots at or past `lengths[b] + T` hold NaN (stale entries): the prefix form never lets
    them into the output, in whole blocks past the span or in the span's last block."""
    seed = fresh_seed()
    b, t, h, kh, s, dh = 2, 3, 4, 2, 512, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    lengths = jnp.array([40, 300], jnp.int32)
    stale = (np.arange(s)[None, :] >= np.asarray(lengths)[:, None] + t)[:, None, :, None]
    ref = reference(q, k, v, visible_of(lengths, None, t, s))
    k_nan, v_nan = (jnp.where(jnp.asarray(stale), jnp.nan, x) for x in (k, v))
    out = run(attention_tpu_prefix, q, k_nan, v_nan, lengths, interpret=True, block_s=128)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")


def test_tpu_grid_reads_each_live_block_once_and_nothing_else():
    """The kernel's block schedule (its key/value/mask index maps and its compute guard use
    these two functions): over the grid's slot steps, the distinct blocks read are exactly those
    that hold a live slot, in order, each fetched once (a repeated index issues no copy), and
    the steps that compute are exactly those blocks' own steps."""
    block_s, num_blocks = 128, 6
    for lo, hi in [(0, 1), (0, 128), (0, 129), (0, 768), (150, 260), (255, 257), (700, 768), (0, 0), (300, 300)]:
        want = [i for i in range(num_blocks) if lo < hi and i * block_s < hi and (i + 1) * block_s > lo]
        reads = [int(block_to_read(j, lo, hi, block_s)) for j in range(num_blocks)]
        fetched = [r for n, r in enumerate(reads) if n == 0 or r != reads[n - 1]]
        first, last, nonempty = live_blocks(jnp.int32(lo), jnp.int32(hi), block_s)
        computed = [j for j in range(num_blocks) if nonempty and first <= j <= last]
        assert computed == want, (lo, hi, computed)
        if want:
            assert fetched == want, (lo, hi, reads)
        else:
            assert len(fetched) == 1, (lo, hi, reads)  # an empty row fetches one block and uses none


def test_tpu_block_mask_with_padding_queries():
    """Tree verification with padded queries whose block-mask rows are all False, one row with
    an empty prefix: those queries see nothing and return zeros."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, t, h, kh, s, dh = 2, 6, 4, 2, 140, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    mask = np.stack([tree_mask(rng, t) for _ in range(b)])
    mask[:, 4:] = False
    lengths = jnp.array([0, 125], jnp.int32)  # row 1's new slots straddle two blocks
    ref = reference(q, k, v, visible_of(lengths, jnp.asarray(mask), t, s))
    out = run(attention_tpu_prefix, q, k, v, lengths, jnp.asarray(mask), interpret=True, block_s=128)
    assert np.all(np.isfinite(out)), f"seed {seed}"
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(out[0, 4:], 0.0)


def test_tpu_stacked_cache_read_in_place_and_no_recompilation():
    seed = fresh_seed()
    b, t, h, kh, s, dh = 2, 2, 4, 2, 200, 32
    q, k, v, lengths, _ = prefix_case(seed, b, t, h, kh, s, dh, "causal")
    ref = reference(q, k, 2 * v, visible_of(lengths, None, t, s))
    k_all, v_all = jnp.stack([jnp.flip(k, 2), k, -k]), jnp.stack([v, 2 * v, v])
    f = jax.jit(functools.partial(attention_tpu_prefix, layer=1, interpret=True, block_s=128),
                compiler_options=FAST_COMPILE)
    np.testing.assert_allclose(f(q, k_all, v_all, lengths), ref, rtol=2e-5, atol=4e-6, err_msg=f"seed {seed}")
    f(q, k_all, v_all, jnp.minimum(lengths + 7, s - t))
    assert f._cache_size() == 1, "new lengths must not compile a new program"
    kv = jnp.stack([k, 2 * v])  # one layer's kv buffer [2, B, K, S, Dh], read with (0, 1)
    out = run(attention_tpu_prefix, q, kv, kv, lengths, layer=(0, 1), interpret=True, block_s=128)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=4e-6, err_msg=f"seed {seed}")
    with pytest.raises(ValueError, match="multiple of 128"):
        attention_tpu_prefix(q, k, v, lengths, block_s=64, interpret=True)
    with pytest.raises(ValueError, match="block_mask"):
        attention_tpu_prefix(q, k, v, lengths, jnp.ones((b, t + 1, t + 1), bool), interpret=True)


def test_dispatcher_picks_the_tpu_kernel_on_tpu(monkeypatch):
    """On a TPU backend `attention` (auto and "pallas") runs the Mosaic kernel, for both
    visibility forms; "pallas_tpu" runs it anywhere; on this CPU host auto stays the reference."""
    seed = fresh_seed()
    b, t, h, kh, s, dh = 2, 3, 4, 2, 130, 64
    q, k, v, lengths, _ = prefix_case(seed, b, t, h, kh, s, dh, "causal")
    visible = visible_of(lengths, None, t, s)
    ref = reference(q, k, v, visible)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(attention(q, k, v, visible), ref)
    out = attention(q, k, v, lengths=lengths, impl="pallas_tpu", interpret=True)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")

    calls = []

    def spy(name):
        real = getattr(attention_module, name)
        return lambda *a, **kw: calls.append(name) or real(*a, **kw)

    for name in ("attention_tpu", "attention_tpu_prefix", "attention_pallas", "attention_pallas_prefix"):
        monkeypatch.setattr(attention_module, name, spy(name))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for impl in ("auto", "pallas"):
        out = attention(q, k, v, lengths=lengths, impl=impl, interpret=True)
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
        out = attention(q, k, v, visible, impl=impl, interpret=True)
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
    assert calls == ["attention_tpu_prefix", "attention_tpu"] * 2
    calls.clear()
    attention(q[..., :48], k[..., :48], v[..., :48], visible)  # auto: Dh = 48 is no multiple of 64
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention(q, k, v, lengths=lengths, impl="pallas", interpret=True)
    assert calls == ["attention_pallas_prefix"]


@pytest.mark.parametrize("h,kh,dh", [(12, 2, 128), (14, 2, 64)])
def test_tpu_kernel_lowers_for_tpu_without_a_tpu(h, kh, dh):
    """Cross-platform export for the "tpu" platform on this CPU host: shapes of Qwen2.5-1.5B and
    -0.5B in bfloat16, a decode step, a five-token chain and a 33-node tree, both visibility
    forms, one layer's kv buffer read in place. Each is one Mosaic custom call (one launch).
    (Mosaic compiles the kernel body for a chip only on a TPU; that step is not run here.)"""
    b, s = 1, 1408
    for t in (1, 5, 33):
        q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2, b, kh, s, dh), jnp.bfloat16)
        forms = {
            "mask": (lambda q, k, v, m: attention_tpu(q, k, v, m, layer=(0, 1)),
                     jax.ShapeDtypeStruct((b, t, s), jnp.bool_)),
            "prefix": (lambda q, k, v, n: attention_tpu_prefix(q, k, v, n, layer=(0, 1)),
                       jax.ShapeDtypeStruct((b,), jnp.int32)),
        }
        for name, (fn, extra) in forms.items():
            exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, kv, kv, extra)
            assert exported.platforms == ("tpu",)
            text = exported.mlir_module()
            assert text.count("stablehlo.custom_call @tpu_custom_call") == 1, (name, t)
            (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line]
            assert f'kernel_name = "decode_attention_tpu_{name}"' in call, (name, t)
            operands = call.rsplit(" : (", 1)[1].split(") -> ")[0]
            # three int32[B] scalar-prefetch operands (lo, hi, lengths) lead; the kv buffer is
            # passed whole as k and as v (read in place, nothing sliced out first)
            assert operands.startswith(f"tensor<{b}xi32>, " * 3), operands
            assert operands.count(f"tensor<2x{b}x{kh}x{s}x{dh}xbf16>") == 2, operands
            out = exported.out_avals[0]
            assert out.shape == (b, t, h, dh) and out.dtype == jnp.bfloat16


def test_model_forward_lowers_for_tpu_with_the_mosaic_kernel(monkeypatch):
    """`Options(attention="pallas")` on a TPU backend: the Llama layers call the Mosaic kernel
    (one custom call per layer in the forward exported for TPU), and the XLA attention has
    none. The backend is reported as "tpu" while tracing; the export runs on this CPU host."""
    from tiny import tiny_model

    from decoding import Options, forward

    target = tiny_model(seed=5, head_dim=16, num_heads=4, num_kv_heads=2)
    cache = target.init_cache(2, 160).truncate(jnp.array([5, 2], jnp.int32))
    toks, pos = jnp.array([[3, 4], [1, 2]], jnp.int32), jnp.array([[5, 6], [2, 3]], jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    counts = {}
    for impl in ("xla", "pallas"):
        opts = Options(attention=impl, unroll_layers=True)
        fn = jax.jit(lambda p, c, opts=opts: forward(target.config, p, toks, pos, c, options=opts).logits)
        text = jax.export.export(fn, platforms=["tpu"])(target.params, cache).mlir_module()
        counts[impl] = (text.count("stablehlo.custom_call @tpu_custom_call"), text.count("__gpu$xla.gpu.triton"))
    assert counts == {"xla": (0, 0), "pallas": (target.config.num_layers, 0)}, counts


def _interpreted_tpu_layers(monkeypatch) -> list:
    """Report the backend as "tpu" and run the Llama layers' Mosaic kernels in the interpreter
    (128-slot blocks); returns the list each layer's kernel call appends its form's name to."""
    llama = importlib.import_module("decoding.llama")
    calls = []
    for name in ("attention_tpu", "attention_tpu_prefix"):
        real = getattr(llama, name)

        def spy(*a, real=real, name=name, **kw):
            calls.append(name)
            return real(*a, interpret=True, block_s=128, **kw)

        monkeypatch.setattr(llama, name, spy)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    return calls


def test_model_forward_on_tpu_takes_the_prefix_form_where_the_mask_is_the_prefix_rule(monkeypatch):
    """The Llama layers on a TPU backend (the Mosaic kernel interpreted): a decode step and a
    chain (no block mask) call the prefix form from the cache lengths, a tree mask and a sliding
    window the mask form; every case gives the logits of the jnp attention. Ragged lengths put
    one row's new slots across the boundary of two 128-slot blocks."""
    from tiny import tiny_model

    from decoding import Options, forward

    calls = _interpreted_tpu_layers(monkeypatch)
    plain = tiny_model(seed=5, head_dim=16, num_heads=4, num_kv_heads=2, num_layers=1)
    windowed = tiny_model(seed=5, head_dim=16, num_heads=4, num_kv_heads=2, num_layers=1, sliding_window=64)
    lengths = jnp.array([5, 126], jnp.int32)
    tree = jnp.asarray(np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool))[None].repeat(2, 0)  # two siblings
    cases = {  # name: (model, T, block mask, the form the layers must take)
        "decode": (plain, 1, None, "attention_tpu_prefix"),
        "chain": (plain, 3, None, "attention_tpu_prefix"),
        "tree": (plain, 3, tree, "attention_tpu"),
        "window": (windowed, 3, None, "attention_tpu"),
    }
    for name, (model, t, mask, form) in cases.items():
        cache = model.init_cache(2, 200).truncate(lengths)
        toks = jnp.asarray(np.random.default_rng(t).integers(0, 96, (2, t)), jnp.int32)
        pos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
        logits = {}
        for impl in ("xla", "pallas"):
            opts = Options(attention=impl, unroll_layers=True)
            del calls[:]
            fn = jax.jit(lambda p, c, m, opts=opts, model=model: forward(model.config, p, toks, pos, c, mask=m,
                                                                          options=opts).logits,
                         compiler_options=FAST_COMPILE)
            logits[impl] = np.asarray(fn(model.params, cache, mask))
            assert calls == ([form] * model.config.num_layers if impl == "pallas" else []), (name, calls)
        assert np.all(np.isfinite(logits["pallas"])), name
        np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5, err_msg=name)


def _tpu_kernel_calls(model, t: int, mask) -> list[tuple[str, str]]:
    """(kernel name, operand types) of every Mosaic call in `model`'s forward of T tokens on a
    batch of one, exported for TPU with `Options(attention="pallas")` (`jax.default_backend`
    must report "tpu")."""
    from decoding import Options, forward

    cache = model.init_cache(1, 1408).truncate(jnp.array([700], jnp.int32))
    toks = jnp.zeros((1, t), jnp.int32)
    pos = 700 + jnp.arange(t, dtype=jnp.int32)[None]
    opts = Options(attention="pallas", unroll_layers=True)
    fn = jax.jit(lambda p, c: forward(model.config, p, toks, pos, c, mask=mask, options=opts).logits)
    text = jax.export.export(fn, platforms=["tpu"])(model.params, cache).mlir_module()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line]
    return [(call.split('kernel_name = "', 1)[1].split('"', 1)[0], call.rsplit(" : (", 1)[1].split(") -> ")[0])
            for call in calls]


def test_decode_step_exported_for_tpu_reads_no_mask(monkeypatch):
    """A whole-model decode step exported for TPU on this CPU host: every layer's Mosaic call is
    the prefix form, whose operands are the three int32[B] scalar-prefetch vectors, q, the layer's
    kv buffer (twice) and the [B, Mp, Tp] block-mask rows; no operand spans the S = 1408 slots
    except the kv buffer. The same step given an explicit (causal) block mask takes the mask
    form, whose [B, Mp, S] visibility rows are exactly what the prefix form avoids."""
    from tiny import tiny_model

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    model = tiny_model(seed=5, head_dim=64, num_heads=4, num_kv_heads=2)
    s, kv = 1408, "tensor<2x1x2x1408x64xf32>"
    for t in (1, 4):
        calls = _tpu_kernel_calls(model, t, None)
        assert len(calls) == model.config.num_layers, (t, calls)
        for name, operands in calls:
            assert name == "decode_attention_tpu_prefix", (t, name)
            assert operands.startswith("tensor<1xi32>, " * 3), operands
            assert operands.count(kv) == 2, operands
            dims = [ty.split("x")[:-1] for ty in re.findall(r"tensor<([^>]*)>", operands.replace(kv, ""))]
            assert dims and not [d for d in dims if str(s) in d], operands  # nothing else spans the slots
    causal = jnp.ones((1, 1, 1), bool)
    for name, operands in _tpu_kernel_calls(model, 1, causal):
        assert name == "decode_attention_tpu_mask", name
        assert f"tensor<1x16x{s}xbf16>" in operands, operands
