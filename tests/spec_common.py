"""Shared pieces of the speculative, tree and drafting tests.

- Tiny random models, built once per session (`functools.cache`), so the three test modules
  share `decoding.generation`'s compile cache (same strategy + shapes = one compilation).
- `run_state`: exactly what `generate` does, but also returning the final decoding state
  (per-row target forwards, the target and draft KV caches, the context buffer).
- `exact_continuations`: the exact probability of every K-token continuation of a prompt under
  a sampling setting, by enumeration (one batched full-sequence forward, processed with
  `sampling.logprobs`, the definition of the distribution every strategy must reproduce).
- `chi_square`: Pearson's goodness-of-fit test; the chi-square survival function is computed
  exactly from its closed form for integer degrees of freedom (no scipy).

Legend: V vocab, K continuation length, N samples.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from decoding import KVCache, Model, ModelConfig, generation, init_params
from decoding.strategy import prefill
from decoding.model import forward

# ------------------------------------------------------------------------------------------
# Greedy suite: V = 64 target (3 layers) and drafts
# ------------------------------------------------------------------------------------------

TARGET_CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=256)
SMALL_DRAFT_CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, max_position_embeddings=256)

# Ragged batch: lengths 9 (a repetitive prompt: its greedy continuation is a long run of one
# token, which prompt lookup can copy), 1, 4 and 13.
PROMPTS = [[14] * 9, [7], [4, 5, 6, 7], [9, 30, 30, 30, 30, 30, 59, 63, 44, 61, 59, 3, 3]]
REPETITIVE_ROW = 0
MAX_NEW = 23  # prime: not a multiple of any gamma + 1 used here


@functools.cache
def target() -> Model:
    return Model(TARGET_CFG, init_params(TARGET_CFG, jax.random.PRNGKey(0), scale=0.5), source="tiny-target")


@functools.cache
def small_draft() -> Model:
    """A different, smaller random model: it almost never agrees with the target."""
    return Model(SMALL_DRAFT_CFG, init_params(SMALL_DRAFT_CFG, jax.random.PRNGKey(1), scale=0.5),
                 source="tiny-draft")


@functools.cache
def noisy_draft() -> Model:
    """The target's weights plus noise: it agrees with the target part of the time (the noise
    level is set so that chains of gamma = 4 see every acceptance length, including all and none;
    `test_noisy_draft_mixes_acceptance_and_rejection` checks it)."""
    params = target().params
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [w + 0.015 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)]
    return Model(TARGET_CFG, jax.tree_util.tree_unflatten(treedef, noisy), source="tiny-noisy")


DRAFTS = {"small": small_draft, "self": target, "noisy": noisy_draft}


@functools.cache
def greedy_reference() -> tuple[tuple[int, ...], ...]:
    """Greedy autoregressive output of PROMPTS (MAX_NEW tokens, no EOS)."""
    out = generation.generate(target(), PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=())
    return tuple(tuple(r) for r in out.tokens)


@functools.cache
def eos_id() -> int:
    """An EOS id taken from the reference output such that rows stop at different times.

    Requirements (asserted): two or more rows contain it at different first positions (>= 2),
    at least one row never produces it (runs to MAX_NEW), and the repetitive row only meets it
    late enough for prompt lookup to show its acceptance.
    """
    ref = greedy_reference()
    seen = sorted({t for row in ref for t in row}, key=lambda t: min(r.index(t) if t in r else 99 for r in ref))
    for tok in seen:
        firsts = [row.index(tok) if tok in row else None for row in ref]
        hit = [f for f in firsts if f is not None]
        rep = firsts[REPETITIVE_ROW]
        if (len(set(hit)) >= 2 and min(hit) >= 2 and None in firsts
                and (rep is None or rep >= 16)):
            return tok
    raise AssertionError(f"no token of the reference output {ref} works as a test EOS")


def reference_with_eos(eos: int) -> list[list[int]]:
    """What greedy decoding with `eos` must return: each reference row cut after its first eos."""
    out = []
    for row in greedy_reference():
        row = list(row)
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


# ------------------------------------------------------------------------------------------
# Sampled suite: V = 6 target whose short continuations can be enumerated
# ------------------------------------------------------------------------------------------

SMALL_V_TARGET_CFG = ModelConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=8, max_position_embeddings=128)
# Every token occurs in the prompt, so prompt lookup always finds a match to propose.
SMALL_V_PROMPT = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]


@functools.cache
def small_v_target() -> Model:
    return Model(SMALL_V_TARGET_CFG, init_params(SMALL_V_TARGET_CFG, jax.random.PRNGKey(10), scale=0.25),
                 source="tiny-v6-target")


@functools.cache
def small_v_draft() -> Model:
    """A different random model (the target's weights plus independent noise), so that draft
    tokens are accepted in some rounds and rejected in others (both paths are exercised)."""
    params = small_v_target().params
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(12), len(leaves))
    noisy = [w + 0.06 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)]
    return Model(SMALL_V_TARGET_CFG, jax.tree_util.tree_unflatten(treedef, noisy), source="tiny-v6-draft")


SAMPLE_K = 4  # generated tokens whose joint law is tested (V^K = 1296 cells)
SAMPLE_N = 4000  # samples: rows of one batch of identical prompts
SAMPLE_SEED = 3


def sample_run(strategy, uses_draft: bool, sampling, seed: int = SAMPLE_SEED):
    """(Result, state) of SAMPLE_N samples of SAMPLE_K tokens from the V = 6 target (no EOS)."""
    return run_state(small_v_target(), [SMALL_V_PROMPT] * SAMPLE_N, strategy,
                     draft=small_v_draft() if uses_draft else None, sampling=sampling,
                     max_new_tokens=SAMPLE_K, eos=(), seed=seed)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(config, params, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache.init(config, b, t, params["embed"].dtype)
    return forward(config, params, tokens, positions, cache).logits


def exact_continuations(model: Model, prompt: list[int], k: int, sampling) -> np.ndarray:
    """float64[V^k]: P(continuation) for every k-token continuation (row-major index).

    Each sequence prompt + continuation is forwarded in full (no cache reuse, no speculative
    machinery); the probability is the product of the processed next-token probabilities.
    """
    v = model.config.vocab_size
    conts = np.array(list(itertools.product(range(v), repeat=k)), np.int32)  # [V^k, k]
    seqs = np.concatenate([np.broadcast_to(np.array(prompt, np.int32), (len(conts), len(prompt))), conts], 1)
    logits = _full_logits(model.config, model.params, jnp.asarray(seqs))
    p = len(prompt)
    logp = np.asarray(sampling.logprobs(logits[:, p - 1 : p - 1 + k]), np.float64)  # [V^k, k, V]
    picked = np.take_along_axis(logp, conts[:, :, None], axis=2)[..., 0]
    return np.exp(picked.sum(axis=1))


def continuation_index(tokens: list[list[int]], v: int, k: int) -> np.ndarray:
    """Row-major cell index of each row's first k tokens (rows must have at least k tokens)."""
    arr = np.array([row[:k] for row in tokens], np.int64)
    assert arr.shape[1] == k, "every row must have k tokens"
    return arr @ (v ** np.arange(k - 1, -1, -1))


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df >= x), exactly, from the closed forms for integer df (no scipy needed):
    even df: exp(-x/2) sum_{i<df/2} (x/2)^i / i!;
    odd df:  erfc(sqrt(x/2)) + exp(-x/2) sum_{i=1}^{(df-1)/2} (x/2)^(i-1/2) / Gamma(i+1/2).
    Terms are summed in log space, so large x and df neither overflow nor lose the tail.
    """
    if x <= 0:
        return 1.0
    h = x / 2.0
    if df % 2 == 0:
        logs = [i * math.log(h) - math.lgamma(i + 1) for i in range(df // 2)]
        head = 0.0
    else:
        logs = [(i - 0.5) * math.log(h) - math.lgamma(i + 0.5) for i in range(1, (df - 1) // 2 + 1)]
        head = math.erfc(math.sqrt(h))
    if not logs:
        return head
    top = max(logs)
    tail = math.exp(top - h) * sum(math.exp(v - top) for v in logs) if top - h > -745 else 0.0
    return min(1.0, head + tail)


def chi_square(observed_cells: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> dict:
    """Pearson goodness of fit of sample cells `observed_cells: int[N]` to `probs: float[C]`.

    Cells with expected count < `min_expected` are pooled into one cell (the usual validity
    condition of the chi-square approximation); a sample in a zero-probability cell is reported
    separately (`impossible`), since it refutes the distribution outright.
    """
    n = len(observed_cells)
    counts = np.bincount(observed_cells, minlength=len(probs)).astype(np.float64)
    impossible = int(counts[probs <= 0].sum())
    expected = n * probs
    big = expected >= min_expected
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    obs, exp = np.array(obs), np.array(exp)
    if exp[-1] < min_expected:  # pooled cell still too small: merge it into the smallest big cell
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(np.sum((obs - exp) ** 2 / exp))
    df = len(obs) - 1
    tv = 0.5 * float(np.abs(counts / n - probs).sum())
    return {"stat": stat, "df": df, "p": chi2_sf(stat, df), "impossible": impossible, "tv": tv, "n": n}


# ------------------------------------------------------------------------------------------
# Running a strategy and keeping its final state
# ------------------------------------------------------------------------------------------


def run_state(model: Model, prompts, strategy=None, *, draft=None, sampling=None, max_new_tokens=MAX_NEW,
              eos=(), seed=0):
    """(Result, final state) of one generation, through `generate`'s own compiled program."""
    prep = generation.prepare(model, prompts, strategy=strategy, sampling=sampling,
                               max_new_tokens=max_new_tokens, seed=seed, stop=(), eos_token_id=eos, chat=False,
                               max_cache_len=None, draft=draft)
    exe, compile_s = generation.compiled(prep)
    state = exe(prep.params, prep.prompt, prep.lengths, prep.key)
    return generation.finish(prep, state, compile_s, 0.0), state


def fresh_cache(model: Model, context: np.ndarray, lengths: np.ndarray) -> KVCache:
    """The KV cache of one prefill over `context[b, :lengths[b]]` (what AR decoding builds)."""
    b, c = context.shape
    width = int(max(lengths.max(), 1))
    width = (width + 15) // 16 * 16
    cache = KVCache.init(model.config, b, width, model.params["embed"].dtype)
    tokens = jnp.asarray(context[:, :width], jnp.int32)
    _, cache = _prefill_jit(model.config, model.params, tokens, jnp.asarray(np.maximum(lengths, 1), jnp.int32),
                            cache)
    return cache


_prefill_jit = jax.jit(prefill, static_argnums=0)


def committed_kv_error(cache: KVCache, ref: KVCache, lengths: np.ndarray) -> float:
    """Max of |cache - ref| / (1 + |ref|) over each row's slots [0, lengths[b]): an absolute
    error for entries below 1 in size, a relative one above (float32 rounding scales with them)."""
    worst = 0.0
    k, v, rk, rv = (np.asarray(a, np.float64) for a in (cache.k, cache.v, ref.k, ref.v))
    for b, n in enumerate(lengths):
        n = int(n)
        for a, r in ((k, rk), (v, rv)):
            diff = np.abs(a[:, b, :, :n] - r[:, b, :, :n]) / (1.0 + np.abs(r[:, b, :, :n]))
            worst = max(worst, float(diff.max(initial=0.0)))
    return worst
