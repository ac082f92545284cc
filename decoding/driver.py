"""The drivers that run a strategy's `step`: one `lax.while_loop`, or a Python loop.

`run(step, state)` drives `step` inside one `jax.lax.while_loop` until every row is done
(`state.out.done`); the caller jits it with the state donated, so a whole generation is one
compiled program with no host round-trip (`decoding.generate`). `stream(step_jit, state)`
drives the same jitted `step` from Python, yielding the tokens each round committed (debugging,
streaming UIs; `decoding.stream`).

Legend: B batch.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


def run(step: Callable, state):
    """Run `step` until `state.out.done` holds for every row (call under jit, state donated)."""
    return jax.lax.while_loop(lambda s: ~jnp.all(s.out.done), step, state)


def stream(step_jit: Callable, state) -> Iterator[tuple[object, list[list[int]]]]:
    """Drive a jitted `step` from Python; yield (state, new tokens per row) after each round."""
    seen = np.asarray(state.out.count)
    while not bool(np.all(np.asarray(state.out.done))):
        state = step_jit(state)
        count = np.asarray(state.out.count)
        toks = np.asarray(state.out.tokens)
        yield state, [toks[b, seen[b] : count[b]].tolist() for b in range(len(count))]
        seen = count
