"""decoding.kernels.projection: the fused projection kernels (interpret mode on CPU) against their
jnp references, their lowering to Triton at Qwen2.5 shapes, and the model with them switched on.

In interpret mode Pallas fills outputs with NaN before the kernel runs, so an element the kernel
failed to write shows up as NaN and fails the comparisons.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import Options, kernels
from decoding.kernels import projection as projection_module
from test_kernels import FAST_COMPILE, fresh_seed, rel_err

EPS = 1e-6


@functools.lru_cache(maxsize=None)
def _jitted(fn, static: tuple):
    return jax.jit(functools.partial(fn, **dict(static)), compiler_options=FAST_COMPILE)


def run(fn, *args, **static):
    """`fn(*args, **static)` under one jit per (function, static arguments)."""
    return _jitted(fn, tuple(sorted(static.items())))(*args)


def inputs(seed, r, d, n, dtype=jnp.float32):
    """x: [R, D], norm_w: [D] (about 1), w: [D, 2N], bias: [2N], residual: [R, N], drawn by NumPy.
    x is far from zero mean and unit scale, so a missing or misplaced norm shows."""
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal((r, d)) + 1.0
    norm_w = 1.0 + 0.3 * rng.standard_normal(d)
    w = rng.standard_normal((d, 2 * n)) / np.sqrt(d)
    bias = rng.standard_normal(2 * n)
    residual = rng.standard_normal((r, n))
    return tuple(jnp.asarray(a, dtype) for a in (x, norm_w, w, bias, residual))


def check(out, ref, seed, rtol=2e-5, atol=2e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert np.all(np.isfinite(np.asarray(out, np.float32))), f"seed {seed}: unwritten (NaN) outputs"
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=rtol, atol=atol,
                               err_msg=f"seed {seed}")


# (R, D, N, block_n, block_k): D and N not multiples of their tiles (masked edges), then tiles
# that divide them (unmasked loads); R of a decode row, an odd chain, a batch of 8.
SHAPES = [(1, 48, 40, 32, 32), (5, 48, 40, 16, 32), (8, 64, 64, 32, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_D{}_N{}_bn{}_bk{}".format(*s))
def test_norm_matmul_matches_reference_float32(shape):
    r, d, n, bn, bk = shape
    seed = fresh_seed()
    x, norm_w, w, bias, _ = inputs(seed, r, d, n)
    tiles = dict(block_n=bn, block_k=bk, interpret=True, eps=EPS)
    check(run(kernels.norm_matmul, x, norm_w, w, bias, **tiles),
          kernels.norm_matmul_reference(x, norm_w, w, bias, eps=EPS), seed)
    check(run(kernels.norm_matmul, x, norm_w, w, **tiles), kernels.norm_matmul_reference(x, norm_w, w, eps=EPS), seed)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_D{}_N{}_bn{}_bk{}".format(*s))
def test_norm_gate_up_matches_reference_float32(shape):
    """The gate and up halves are read at matching columns: swapping the halves of the weight
    changes the result (the activation makes the product asymmetric)."""
    r, d, f, bn, bk = shape
    seed = fresh_seed()
    x, norm_w, w, _, _ = inputs(seed, r, d, f)
    out = run(kernels.norm_gate_up, x, norm_w, w, block_n=bn, block_k=bk, interpret=True, eps=EPS)
    check(out, kernels.norm_gate_up_reference(x, norm_w, w, eps=EPS), seed)
    swapped = kernels.norm_gate_up_reference(x, norm_w, jnp.concatenate([w[:, f:], w[:, :f]], axis=1), eps=EPS)
    assert not np.allclose(out, swapped, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_K{}_N{}_bn{}_bk{}".format(*s))
def test_matmul_residual_matches_reference_float32(shape):
    r, k, n, bn, bk = shape
    seed = fresh_seed()
    x, _, w, _, residual = inputs(seed, r, k, n)
    w = w[:, :n]
    check(run(kernels.matmul_residual, x, w, residual, block_n=bn, block_k=bk, interpret=True),
          kernels.matmul_residual_reference(x, w, residual), seed)


def test_layer_of_stacked_weights_is_read_in_place():
    """`layer=i` on [L, ...] stacks equals the kernel on the slices (and the reference); a layer
    index outside the stack, or unstacked norms, are refused."""
    seed = fresh_seed()
    r, d, n, layers = 3, 48, 40, 3
    stacks = [inputs(seed + i, r, d, n) for i in range(layers)]
    x, residual = stacks[0][0], stacks[0][4]
    norm_w, w, bias = (jnp.stack([s[j] for s in stacks]) for j in (1, 2, 3))
    kw = dict(block_n=16, block_k=32, interpret=True)
    check(run(kernels.norm_matmul, x, norm_w, w, bias, eps=EPS, layer=1, **kw),
          kernels.norm_matmul_reference(x, norm_w[1], w[1], bias[1], eps=EPS), seed)
    check(run(kernels.norm_gate_up, x, norm_w, w, eps=EPS, layer=2, **kw),
          kernels.norm_gate_up_reference(x, norm_w[2], w[2], eps=EPS), seed)
    check(run(kernels.matmul_residual, x, w[:, :, :n], residual, layer=1, **kw),
          kernels.matmul_residual_reference(x, w[1, :, :n], residual), seed)
    with pytest.raises(ValueError, match="layer=3"):
        kernels.norm_matmul(x, norm_w, w, bias, eps=EPS, layer=3, interpret=True)
    with pytest.raises(ValueError, match="stacked too"):
        kernels.norm_matmul(x, norm_w[0], w, bias, eps=EPS, layer=0, interpret=True)


def test_bfloat16_rounds_once_and_accumulates_in_float32():
    """bf16 inputs: each kernel is within bf16 rounding of the bf16 reference and of the float32
    computation on the same (bf16) values; a leading [B, T] shape is kept; a custom activation
    (GELU) is applied inside the kernel."""
    seed = fresh_seed()
    r, d, n = 6, 96, 80
    x, norm_w, w, bias, residual = inputs(seed, r, d, n, jnp.bfloat16)
    f32 = [a.astype(jnp.float32) for a in (x, norm_w, w, bias, residual)]
    x3, res3 = x.reshape(2, 3, d), residual.reshape(2, 3, n)
    kw = dict(block_n=32, block_k=32, interpret=True)
    cases = [
        (run(kernels.norm_matmul, x3, norm_w, w, bias, eps=EPS, **kw),
         kernels.norm_matmul_reference(x3, norm_w, w, bias, eps=EPS),
         kernels.norm_matmul_reference(*f32[:4], eps=EPS)),
        (run(kernels.norm_gate_up, x3, norm_w, w, eps=EPS, activation=jax.nn.gelu, **kw),
         kernels.norm_gate_up_reference(x3, norm_w, w, eps=EPS, activation=jax.nn.gelu),
         kernels.norm_gate_up_reference(*f32[:3], eps=EPS, activation=jax.nn.gelu)),
        (run(kernels.matmul_residual, x3[..., :n], w[:n, :n], res3, **kw),
         kernels.matmul_residual_reference(x3[..., :n], w[:n, :n], res3),
         kernels.matmul_residual_reference(f32[0][:, :n], f32[2][:n, :n], f32[4])),
    ]
    for out, ref, exact in cases:
        assert out.dtype == jnp.bfloat16 and out.shape == ref.shape and out.shape[:2] == (2, 3)
        assert rel_err(out, ref) < 1e-2, f"seed {seed}"
        assert rel_err(out.reshape(exact.shape), exact) < 1e-2, f"seed {seed}"
    gelu, silu = cases[1][0], kernels.norm_gate_up_reference(x3, norm_w, w, eps=EPS)
    assert rel_err(gelu, silu) > 3e-2, "the activation argument must reach the kernel"


def test_bad_arguments_name_what_is_wrong():
    x, norm_w, w, bias, residual = inputs(0, 4, 32, 32)
    with pytest.raises(ValueError, match="bias"):
        kernels.norm_matmul(x, norm_w, w, bias[:5], eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="rows"):
        kernels.norm_matmul(jnp.zeros((65, 32)), norm_w, w, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        kernels.matmul_residual(x, w[:, :32], residual, block_n=24, interpret=True)
    with pytest.raises(ValueError, match="residual"):
        kernels.matmul_residual(x, w[:, :32], residual[:3], interpret=True)
    with pytest.raises(ValueError, match=r"w_gate_up must be \[D, 2F\]"):
        kernels.norm_gate_up(x, norm_w, w[:, :31], eps=EPS, interpret=True)


def test_the_layer_switch():
    """Kernels for few rows on one device, interpreted on this (CPU) host; the references for
    "xla", for more than MAX_ROWS rows (prefill) and on a mesh."""
    interpret = jax.default_backend() != "gpu"
    assert kernels.Projections.choose("pallas", 1) == kernels.Projections(kernel=True, interpret=interpret)
    assert kernels.Projections.choose("pallas", projection_module.MAX_ROWS).kernel
    assert not kernels.Projections.choose("pallas", projection_module.MAX_ROWS + 1).kernel
    assert not kernels.Projections.choose("pallas", 1, sharded=True).kernel
    assert not kernels.Projections.choose("xla", 1).kernel


def test_bad_option_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"projections must be one of \('xla', 'pallas'\)"):
        Options(projections="triton")
    with pytest.raises(ValueError, match="projections must be one of"):
        Options.from_env({"DECODING_PROJECTIONS": "cuda"})
    assert Options.from_env({"DECODING_PROJECTIONS": "pallas"}) == Options(projections="pallas")
    assert Options(projections="pallas") != Options()


@pytest.mark.parametrize("strategy,unroll", [("autoregressive", True),
                                             pytest.param("speculative", False, marks=pytest.mark.slow)])
def test_model_with_the_kernels_generates_the_same_tokens(monkeypatch, strategy, unroll):
    """`Options(projections="pallas")` (interpreted off GPUs) on a model with q/k/v biases: float32
    greedy generation equals the jnp projections' token for token, autoregressive and speculative
    (prompt-lookup chains of 3, verified as 2 x 4 rows), with unrolled layers (the kernels read
    each layer's weights in the stacks, `layer=i`) and under scan (slices), and all three
    kernels are in the traced programs."""
    from decoding import Autoregressive, Speculative, generate
    from drafting import PromptLookup
    from tiny import tiny_model

    target = tiny_model(seed=5, qkv_bias=True)
    prompts = [[3, 9, 4, 3, 9, 4, 3], [5, 2, 5, 2]]
    make = {"autoregressive": Autoregressive, "speculative": lambda: Speculative(PromptLookup(), gamma=3)}[strategy]
    traced = []
    for name in ("norm_matmul", "norm_gate_up", "matmul_residual"):
        real = getattr(projection_module, name)
        monkeypatch.setattr(projection_module, name,
                            lambda *a, _real=real, _name=name, **k: traced.append(_name) or _real(*a, **k))
    layers = []  # the layer index each traced norm + QKV kernel was given
    real_qkv = projection_module.norm_matmul
    monkeypatch.setattr(projection_module, "norm_matmul",
                        lambda *a, **k: layers.append(k["layer"]) or real_qkv(*a, **k))
    out = {}
    for impl in ("xla", "pallas"):
        before = len(traced)
        res = generate(target, prompts, strategy=make(), max_new_tokens=8, eos_token_id=(),
                       options=Options(projections=impl, unroll_layers=unroll))
        out[impl] = (res.tokens, traced[before:])
    assert out["pallas"][0] == out["xla"][0]
    assert out["xla"][1] == []
    assert {"norm_matmul", "norm_gate_up", "matmul_residual"} <= set(out["pallas"][1]), out["pallas"][1]
    if unroll:
        assert layers == [0, 1] * (len(layers) // 2) and layers, layers


@pytest.mark.parametrize("model", ["qwen2.5-1.5b", "qwen2.5-0.5b"])
def test_kernels_lower_for_cuda_without_a_gpu(model):
    """The Pallas -> Triton lowering runs on any host, at Qwen2.5-1.5B (D 1536, QKV 2048, F 8960,
    H * Dh 1536) and -0.5B (D 896, QKV 1152, F 4864, H * Dh 896) shapes, bf16, for 1, 8 and 16 rows.
    (Compiling the Triton program needs the GPU: `test_compiled_kernels_on_gpu`.)"""
    d, nq, f, hd = {"qwen2.5-1.5b": (1536, 2048, 8960, 1536), "qwen2.5-0.5b": (896, 1152, 4864, 896)}[model]
    s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    for r in (1, 8, 16):
        cases = {
            "norm_matmul": (lambda x, nw, w, b: kernels.norm_matmul(x, nw, w, b, eps=EPS),
                            (s((r, d), bf), s((d,), bf), s((d, nq), bf), s((nq,), bf))),
            "norm_gate_up": (lambda x, nw, w: kernels.norm_gate_up(x, nw, w, eps=EPS),
                             (s((r, d), bf), s((d,), bf), s((d, 2 * f), bf))),
            "matmul_residual": (kernels.matmul_residual, (s((r, hd), bf), s((hd, d), bf), s((r, d), bf))),
            "down_residual": (kernels.matmul_residual, (s((r, f), bf), s((f, d), bf), s((r, d), bf))),
            "stacked_gate_up": (lambda x, nw, w: kernels.norm_gate_up(x, nw, w, eps=EPS, layer=2),
                                (s((r, d), bf), s((3, d), bf), s((3, d, 2 * f), bf))),
        }
        for name, (fn, args) in cases.items():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1, (name, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_on_gpu(dtype):
    """The compiled Triton kernels (not the interpreter) at Qwen2.5-1.5B and -0.5B shapes against
    float32 products of the same values."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    seed = fresh_seed()
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    for d, nq, f in ((1536, 2048, 8960), (896, 1152, 4864)):
        for r in (1, 5, 8, 16):
            x, norm_w, w_qkv, bias, residual = inputs(seed, r, d, nq // 2, dtype)
            _, _, w_gu, _, _ = inputs(seed + 1, r, d, f, dtype)
            _, _, w_down, _, _ = inputs(seed + 2, r, f, d // 2, dtype)
            w_down = w_down[:, :d]
            h = jax.random.normal(jax.random.PRNGKey(seed), (r, f), jnp.float32).astype(dtype)
            res = jnp.asarray(x * 0.5, dtype)
            up = lambda a: a.astype(jnp.float32)  # noqa: E731
            with jax.default_matmul_precision("float32"):  # not tf32
                exact = [kernels.norm_matmul_reference(up(x), up(norm_w), up(w_qkv), up(bias), eps=EPS),
                         kernels.norm_gate_up_reference(up(x), up(norm_w), up(w_gu), eps=EPS),
                         kernels.matmul_residual_reference(up(h), up(w_down), up(res))]
            outs = [kernels.norm_matmul(x, norm_w, w_qkv, bias, eps=EPS),
                    kernels.norm_gate_up(x, norm_w, w_gu, eps=EPS),
                    kernels.matmul_residual(h, w_down, res)]
            for name, out, ref in zip(("norm_matmul", "norm_gate_up", "matmul_residual"), outs, exact):
                assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32))), (name, r, seed)
                assert rel_err(out, ref) < tol, (name, d, r, rel_err(out, ref), seed)
