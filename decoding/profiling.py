"""Where a speculative round's time goes: each phase compiled and timed on its own.

Inside `generate` a whole generation is one compiled loop, so the phases of a round cannot be
timed there without host round trips. `phase_times` instead builds the state that `generate`
would start from, compiles `propose`, `verify` and `accept + commit` as three separate programs
on that state, and times each (median of `repeats` runs, after a warm-up). Separately compiled
phases lose some fusion across phase boundaries, so the parts are estimates of the split, not
an exact decomposition of the loop's step time; `split_run_time` scales them to a measured run.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from .generation import prepare


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def phase_times(model, prompts, strategy, *, draft=None, sampling=None, max_new_tokens: int = 64,
                repeats: int = 20, **kwargs) -> dict:
    """Milliseconds of one round's phases for `strategy` (a `Speculative` or `TreeDecoding`).

    Returns {"propose_ms", "verify_ms", "accept_commit_ms", "round_ms"} where round_ms is one
    whole jitted `step` (all phases in one program) on the same state.
    """
    if not hasattr(strategy, "propose"):
        raise TypeError(f"{type(strategy).__name__} has no propose/verify phases to time; "
                        "use a decoding.Speculative or decoding.TreeDecoding strategy.")
    prep = prepare(model, prompts, strategy=strategy, sampling=sampling, max_new_tokens=max_new_tokens,
                   seed=0, eos_token_id=(), draft=draft, **kwargs)
    s, ctx, params = prep.strategy, prep.ctx, prep.params
    state = jax.jit(lambda p, pr, ln, k: s.init(ctx, p, pr, ln, k))(params, prep.prompt, prep.lengths, prep.key)
    key = jax.random.PRNGKey(1)

    propose = jax.jit(lambda p, st: s.propose(ctx, p, st, key))
    view, tree, dstate, cache, n_fwd = propose(params, state)
    verify = jax.jit(lambda p, c, t: s.verify(ctx, p, c, t))
    res = verify(params, cache, tree)

    def accept_commit(p, st, v, t, logits, c, d, n, h):
        acc = s.accept(ctx, t, logits, key)
        return s.commit(ctx, p, st, v, t, acc, c, d, n, hidden=h)

    ac = jax.jit(accept_commit)
    step = jax.jit(lambda p, st: s.step(ctx, p, st))
    out = {
        "propose_ms": _median_ms(propose, params, state, repeats=repeats),
        "verify_ms": _median_ms(verify, params, cache, tree, repeats=repeats),
        "accept_commit_ms": _median_ms(ac, params, state, view, tree, res.logits, res.cache, dstate, n_fwd,
                                       res.hidden, repeats=repeats),
        "round_ms": _median_ms(step, params, state, repeats=repeats),
    }
    return out


def split_run_time(phases: dict, run_s: float) -> dict:
    """Scale phase times to a measured run: seconds spent proposing, verifying, committing."""
    parts = ("propose_ms", "verify_ms", "accept_commit_ms")
    total = sum(phases[p] for p in parts)
    return {p.replace("_ms", "_s"): run_s * phases[p] / total for p in parts}
