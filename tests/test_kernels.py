"""decoding.kernels.attention: the Pallas kernel (interpret mode on CPU) against its reference.

Inputs are drawn fresh for every test (the seed is in each failure message). In interpret mode
Pallas fills outputs with NaN before the kernel runs, so an element the kernel failed to
write shows up as NaN and fails the finiteness checks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.kernels import (
    attention,
    attention_pallas,
    attention_pallas_prefix,
    attention_reference,
    prefix_visible,
)
from decoding.numerics import attention_mask
from drafting.shapes import ancestor_mask


def tree_mask(rng: np.random.Generator, t: int) -> np.ndarray:
    """Ancestor mask bool[T, T] of a random tree whose nodes are numbered parents first."""
    parents = np.array([[-1] + [int(rng.integers(0, i)) for i in range(1, t)]])
    return ancestor_mask(parents)[0]


# The package exports a function named like the module; the module itself:
attention_module = importlib.import_module("decoding.kernels.attention")


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # the interpreter's programs run in milliseconds


@functools.lru_cache(maxsize=None)
def _jitted(fn, static: tuple):
    return jax.jit(functools.partial(fn, **dict(static)), compiler_options=FAST_COMPILE)


def run(fn, *args, **static):
    """`fn(*args, **static)` under one jit per (function, static arguments), shared by tests:
    the interpreter compiles each kernel configuration once."""
    return _jitted(fn, tuple(sorted(static.items())))(*args)


def reference(q, k, v, visible):
    return run(attention_reference, q, k, v, visible)


def visible_of(lengths, block_mask, t, s):
    return run(prefix_visible, lengths, block_mask, t=t, capacity=s)


def fresh_seed() -> int:
    """A seed per test, fixed so that runs are reproducible; `DECODING_TEST_SEED=random` draws
    a new one each run (the failure message names it), any other value is used as given."""
    env = os.environ.get("DECODING_TEST_SEED")
    if env == "random":
        return secrets.randbits(31)
    if env:
        return int(env)
    name = os.environ.get("PYTEST_CURRENT_TEST", "")
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") >> 1


def make_inputs(seed, b, t, h, kh, s, dh, dtype=jnp.float32):
    """q: [B, T, H, Dh], k, v: [B, K, S, Dh], standard normal (drawn by NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape, np.float32) for shape in ((b, t, h, dh), (b, kh, s, dh), (b, kh, s, dh)))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# (B, T, H, K, S, Dh, block mask kind, splits): decode, a chain, a tree; G = H / K of 1, 2 and 6;
# S never a multiple of the 16-slot blocks; the tree's 16 x 6 = 96 query rows span two 64-row
# blocks whose programs write one output directly (one split); the others combine partials.
CASES = [
    (2, 1, 4, 4, 45, 32, "causal", 2),
    (2, 5, 4, 2, 77, 32, "causal", 3),
    (2, 16, 12, 2, 100, 64, "tree", 1),
]


def prefix_case(seed, b, t, h, kh, s, dh, kind, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh, dtype)
    # Row 0 has an empty prefix; the last row's new slots run past the capacity (dropped).
    lengths = rng.integers(0, s - t, size=b)
    lengths[0], lengths[-1] = 0, s - max(1, t // 2)
    lengths = jnp.asarray(lengths, jnp.int32)
    block_mask = None if kind == "causal" else jnp.asarray(np.stack([tree_mask(rng, t) for _ in range(b)]))
    return q, k, v, lengths, block_mask


def test_reference_is_the_model_attention():
    """One attention reference: the Llama and Gemma 3 layers run this very function, and it is
    grouped-query softmax attention (query head h reads kv head h // G) computed in numpy."""
    import decoding.gemma3
    import decoding.llama

    assert decoding.llama.attention_reference is attention_reference
    assert decoding.gemma3.attention_reference is attention_reference
    seed = fresh_seed()
    b, t, h, kh, s, dh = 2, 5, 6, 2, 33, 16
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = make_inputs(seed, b, t, h, kh, s, dh, dtype)
        lengths = jnp.array([0, 20], jnp.int32)
        positions = lengths[:, None] + jnp.arange(t)[None, :]
        visible = np.asarray(attention_mask(lengths, positions, s))
        qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
        want = np.zeros((b, t, h, dh))
        for row in range(b):
            for head in range(h):
                scores = qf[row, :, head] @ kf[row, head // (h // kh)].T * dh ** -0.5  # [T, S]
                scores = np.where(visible[row], scores, -np.inf)
                p = np.exp(scores - scores.max(-1, keepdims=True))
                want[row, :, head] = (p / p.sum(-1, keepdims=True)) @ vf[row, head // (h // kh)]
        got = np.asarray(attention_reference(q, k, v, jnp.asarray(visible)), np.float64)
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"seed {seed}")
        scaled = np.asarray(attention_reference(q, k, v, jnp.asarray(visible), scale=0.5 * dh ** -0.5))
        assert not np.allclose(scaled, got), "the scale argument must change the scores"


def test_prefix_visible_is_the_model_rule():
    rng = np.random.default_rng(fresh_seed())
    b, t, s = 3, 7, 40
    lengths = jnp.array([0, 12, 36], jnp.int32)
    positions = lengths[:, None] + jnp.arange(t)[None, :]
    tree = jnp.asarray(np.stack([tree_mask(rng, t) for _ in range(b)]))
    for mask in (None, tree):
        np.testing.assert_array_equal(visible_of(lengths, mask, t, s),
                                      attention_mask(lengths, positions, s, mask))


@pytest.mark.parametrize("case", CASES, ids=lambda x: "B{}_T{}_H{}_K{}_S{}_Dh{}_{}_splits{}".format(*x))
def test_pallas_matches_reference_float32(case):
    seed = fresh_seed()
    *shape, num_splits = case
    b, t, h, kh, s, dh, kind = shape
    q, k, v, lengths, block_mask = prefix_case(seed, *shape)
    visible = visible_of(lengths, block_mask, t, s)
    ref = reference(q, k, v, visible)
    kw = dict(interpret=True, block_s=16, num_splits=num_splits)
    out_prefix = run(attention_pallas_prefix, q, k, v, lengths, block_mask, **kw)
    out_mask = run(attention_pallas, q, k, v, visible, **kw)
    for out in (out_prefix, out_mask):
        assert out.shape == q.shape and out.dtype == q.dtype
        assert np.all(np.isfinite(out)), f"seed {seed}"
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")


def test_pallas_bfloat16_accumulates_in_float32():
    seed = fresh_seed()
    shape = (2, 16, 12, 2, 90, 64, "tree")  # two 64-row blocks, two splits
    t, s = shape[1], shape[4]
    q, k, v, lengths, block_mask = prefix_case(seed, *shape, dtype=jnp.bfloat16)
    visible = visible_of(lengths, block_mask, t, s)
    exact = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), visible)
    ref = reference(q, k, v, visible)
    for unified_max in (None, 0.0):
        out = run(attention_pallas_prefix, q, k, v, lengths, block_mask, interpret=True, block_s=32,
                  num_splits=2, unified_max=unified_max)
        assert out.dtype == jnp.bfloat16
        assert rel_err(out, exact) < 1e-2, f"seed {seed}"
        assert rel_err(out, ref) < 1e-2, f"seed {seed}"


def test_arbitrary_mask_and_all_masked_queries_give_zeros():
    """A slot mask with holes, a query that sees nothing (a padding query) and a row that sees
    nothing at all: the kernel equals the reference, and unseeing queries return zeros."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, t, h, kh, s, dh = 3, 4, 4, 2, 50, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    visible = rng.random((b, t, s)) < 0.3
    visible[0, :, :10] = False  # the span read starts past slot 0
    visible[0, 2] = False  # a padding query
    visible[2] = False  # a row with no visible slot at all
    visible = jnp.asarray(visible)
    ref = reference(q, k, v, visible)
    np.testing.assert_array_equal(ref[0, 2], 0.0)  # the model's layers run this reference: no NaN rows
    out = run(attention_pallas, q, k, v, visible, interpret=True, block_s=16, num_splits=2)
    assert np.all(np.isfinite(out)), f"seed {seed}"
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)


def test_block_mask_with_masked_padding_queries():
    """Tree verification with padded queries whose block-mask rows are all False and an empty
    prefix: those queries see nothing and return zeros in both implementations."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, t, h, kh, s, dh = 2, 6, 4, 2, 40, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    mask = np.stack([tree_mask(rng, t) for _ in range(b)])
    mask[:, 4:] = False
    lengths = jnp.array([0, 17], jnp.int32)
    ref = reference(q, k, v, visible_of(lengths, jnp.asarray(mask), t, s))
    out = run(attention_pallas_prefix, q, k, v, lengths, jnp.asarray(mask), interpret=True, block_s=16,
              num_splits=2)
    assert np.all(np.isfinite(out)), f"seed {seed}"
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(out[0, 4:], 0.0)


def test_unified_max_equals_exact(monkeypatch):
    """Scores here are about N(0, 1): phi = 0 holds; phi = -100 would overflow exp and phi = 100
    underflow it, so only the fallback to the exact softmax keeps those right (shown by
    disabling the fallback, which then breaks them)."""
    seed = fresh_seed()
    shape = (2, 5, 4, 2, 77, 32, "causal")
    q, k, v, lengths, _ = prefix_case(seed, *shape)
    ref = reference(q, k, v, visible_of(lengths, None, shape[1], shape[4]))
    kw = dict(interpret=True, block_s=16, num_splits=3)
    for phi in (0.0, -100.0, 100.0):
        out = run(attention_pallas_prefix, q, k, v, lengths, unified_max=phi, **kw)
        assert np.all(np.isfinite(out)), f"phi {phi}, seed {seed}"
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6, err_msg=f"phi {phi}, seed {seed}")
    monkeypatch.setattr(attention_module, "UNIFIED_MAX_MARGIN", float("inf"))
    for phi in (-100.0, 100.0):  # traced afresh (not `run`), so the patched margin applies
        out = jax.jit(functools.partial(attention_pallas_prefix, unified_max=phi, **kw),
                      compiler_options=FAST_COMPILE)(q, k, v, lengths)
        assert not np.allclose(out, ref, rtol=1e-3, atol=1e-4), f"phi {phi}: the fallback was not needed"


def test_unified_max_mixed_fallback_across_splits():
    """Large keys in the first slots only: the split holding them falls back to the exact
    softmax, the others keep phi, and the combine mixes both."""
    seed = fresh_seed()
    b, t, h, kh, s, dh = 2, 1, 4, 2, 96, 32
    q, k, v = make_inputs(seed, b, t, h, kh, s, dh)
    k = k.at[:, :, :8].multiply(40.0)
    lengths = jnp.array([90, 95], jnp.int32)
    visible = visible_of(lengths, None, t, s)
    ref = reference(q, k, v, visible)
    out = run(attention_pallas_prefix, q, k, v, lengths, unified_max=0.0, interpret=True, num_splits=3,
              block_s=16)
    # Keys scaled by 40 make scores of order 100: float32 rounding of the scores alone moves
    # probabilities by about 1e-5 relative, so the tolerance follows that scale.
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-5, err_msg=f"seed {seed}")
    out = run(attention_pallas, q, k, v, visible, unified_max=0.0, interpret=True, num_splits=1, block_s=32)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-5, err_msg=f"seed {seed}")


def test_dispatcher():
    seed = fresh_seed()
    shape = (2, 3, 4, 2, 30, 16, "causal")
    t, s = shape[1], shape[4]
    q, k, v, lengths, _ = prefix_case(seed, *shape)
    visible = visible_of(lengths, None, t, s)
    ref = reference(q, k, v, visible)
    np.testing.assert_array_equal(attention(q, k, v, visible, impl="reference"), ref)
    np.testing.assert_array_equal(attention(q, k, v, lengths=lengths, impl="reference"), ref)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(attention(q, k, v, visible), ref)  # auto: the reference off GPUs
    # `layer`: the stacked [L, B, K, S, Dh] cache is read in place.
    k_all, v_all = jnp.stack([jnp.flip(k, 2), k, -k]), jnp.stack([v, 2 * v, v])
    np.testing.assert_array_equal(attention(q, k_all, v_all, visible, layer=1, impl="reference"),
                                  attention_reference(q, k, 2 * v, visible))
    out = jax.jit(functools.partial(attention, impl="pallas", layer=1, interpret=True),
                  compiler_options=FAST_COMPILE)(q, k_all, v_all, lengths=lengths)
    np.testing.assert_allclose(out, 2 * ref, rtol=2e-5, atol=4e-6, err_msg=f"seed {seed}")
    with pytest.raises(ValueError, match="exactly one"):
        attention(q, k, v, visible, lengths=lengths)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, visible, impl="triton")
    with pytest.raises(ValueError, match="power-of-two head dim"):
        attention_pallas_prefix(q[..., :12], k[..., :12], v[..., :12], lengths, interpret=True)


def test_no_recompilation_across_lengths():
    seed = fresh_seed()
    shape = (2, 2, 4, 2, 40, 16, "causal")
    q, k, v, lengths, _ = prefix_case(seed, *shape)
    f = jax.jit(functools.partial(attention_pallas_prefix, interpret=True, block_s=16, num_splits=2),
                compiler_options=FAST_COMPILE)
    f(q, k, v, lengths)
    f(q, k, v, jnp.minimum(lengths + 3, 38))
    assert f._cache_size() == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_gpu(dtype):
    """The compiled Triton kernel (not the interpreter) on Qwen2.5-like shapes."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    seed = fresh_seed()
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    for shape in [(1, 1, 12, 2, 300, 128, "causal"), (3, 5, 14, 2, 515, 64, "causal"),
                  (2, 61, 12, 2, 1000, 128, "tree")]:
        b, t, h, kh, s, dh, _ = shape
        q, k, v, lengths, block_mask = prefix_case(seed, *shape, dtype=dtype)
        visible = visible_of(lengths, block_mask, t, s)
        with jax.default_matmul_precision("float32"):  # not tf32
            exact = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        visible)
        for num_splits in (1, None):
            for unified_max in (None, 0.0, -100.0):
                out = attention_pallas_prefix(q, k, v, lengths, block_mask, num_splits=num_splits,
                                              unified_max=unified_max)
                assert rel_err(out, exact) < tol, (shape, num_splits, unified_max, seed)
            out = attention_pallas(q, k, v, visible, num_splits=num_splits)
            assert rel_err(out, exact) < tol, (shape, num_splits, "mask", seed)


def test_model_with_the_kernel_matches_the_xla_attention(monkeypatch):
    """`decoding.Options(attention="pallas")` (interpreted off GPUs) in the unrolled layers:
    the same logits as the jnp attention, the same greedy generation (autoregressive and a
    dynamic tree, whose verification uses a tree mask), and its own compiled programs. A call
    without a block mask (prefill, decode, the forward below) takes the kernel's prefix form
    from the cache lengths; only calls with a block or slot mask (the tree) take the mask form."""
    from decoding import Options, TreeDecoding, forward, generate
    from decoding import generation as gen
    from drafting import DraftModel, DynamicTree
    from tiny import tiny_model

    target = tiny_model(seed=5, head_dim=16, num_heads=4, num_kv_heads=2)
    draft = tiny_model(seed=6, head_dim=16, num_heads=4, num_kv_heads=2, num_layers=1)
    prompts = [[3, 9, 4, 1, 7], [5, 2]]
    cache = target.init_cache(2, 32).truncate(jnp.array([5, 2], jnp.int32))
    toks, pos = jnp.array([[3, 4], [1, 2]], jnp.int32), jnp.array([[5, 6], [2, 3]], jnp.int32)
    kernel_mod = importlib.import_module("decoding.llama")  # the Llama layer's handle on the kernel

    traced = []

    def spy(name):
        real = getattr(kernel_mod, name)
        return lambda *a, **k: traced.append((name, k["layer"])) or real(*a, **k)

    for name in ("attention_pallas", "attention_pallas_prefix"):
        monkeypatch.setattr(kernel_mod, name, spy(name))
    runs, forms = {}, {}
    for impl in ("xla", "pallas"):
        opts = Options(attention=impl, unroll_layers=True)
        before, traced_before = gen.compile_count(), len(traced)
        logits = jax.jit(lambda p, c: forward(target.config, p, toks, pos, c, options=opts).logits)(target.params, cache)
        forms[impl, "forward"] = traced[traced_before:]
        ar = generate(target, prompts, max_new_tokens=6, eos_token_id=(), options=opts)
        forms[impl, "ar"] = traced[traced_before + len(forms[impl, "forward"]):]
        tree = generate(target, prompts, strategy=TreeDecoding(DraftModel(), tree=DynamicTree(depth=2, top_k=2, total_tokens=4)),
                        draft=draft, max_new_tokens=6, eos_token_id=(), options=opts)
        runs[impl] = (np.asarray(logits), ar.tokens, tree.tokens, gen.compile_count() - before,
                      len(traced) - traced_before)
    np.testing.assert_allclose(runs["pallas"][0], runs["xla"][0], rtol=1e-5, atol=1e-5)
    assert runs["pallas"][1] == runs["xla"][1] and runs["pallas"][2] == runs["xla"][2] == runs["xla"][1]
    assert runs["pallas"][3] == 2, "switching the attention implementation must compile new programs"
    assert runs["xla"][4] == 0
    # forward: 2 layers; generate (AR prefill + step, tree init + step): the kernel is in every program
    assert runs["pallas"][4] >= 2 + 4 * target.config.num_layers, "the generate programs did not use the kernel"
    layers = [(0, 1)] * target.config.num_layers
    assert forms["pallas", "forward"] == [("attention_pallas_prefix", la) for la in layers]
    assert {name for name, _ in forms["pallas", "ar"]} == {"attention_pallas_prefix"}
    assert "attention_pallas" in {name for name, _ in traced}, "tree verification must keep the mask form"
    with pytest.raises(ValueError, match="attention must be one of"):
        generate(target, prompts, max_new_tokens=2, options=Options(attention="cuda"))


@pytest.mark.parametrize("h,kh,dh", [(12, 2, 128), (14, 2, 64)])
def test_kernel_lowers_for_cuda_without_a_gpu(h, kh, dh):
    """The Pallas -> Triton lowering runs on any host: shapes of Qwen2.5-1.5B and -0.5B, for a
    decode step, a five-token chain and a 33-node tree, both visibility forms, a stacked cache
    read in place. (Compiling the Triton program itself needs the GPU: `test_compiled_kernel_on_gpu`.)"""
    from decoding.kernels.attention import attention_pallas, attention_pallas_prefix

    b, s, layers = 1, 1408, 3
    for t in (1, 5, 33):
        q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((layers, b, kh, s, dh), jnp.bfloat16)
        forms = {
            "mask": (lambda q, k, v, m: attention_pallas(q, k, v, m, layer=1),
                     jax.ShapeDtypeStruct((b, t, s), jnp.bool_)),
            "prefix": (lambda q, k, v, n: attention_pallas_prefix(q, k, v, n, layer=1),
                       jax.ShapeDtypeStruct((b,), jnp.int32)),
        }
        for name, (fn, extra) in forms.items():
            text = jax.jit(fn).trace(q, kv, kv, extra).lower(lowering_platforms=("cuda",)).as_text()
            assert "stablehlo.custom_call @__gpu$xla.gpu.triton" in text, (name, t)  # the Triton program
