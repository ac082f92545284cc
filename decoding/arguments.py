"""Checks of the arguments of the public entry points (`decoding.generate`, `decoding.stream`,
`alignment.nudge`): each error says what was given and what the argument takes.

Prompts are normalised here too: `prompt_list` turns every accepted form (a string, a list of
strings, a list of token-id lists, a 1-D or 2-D integer array, a mix of strings and id lists)
into a list of strings and id lists, refusing empty lists and empty prompts.
"""

from __future__ import annotations

import numpy as np

from .model import Model
from .options import Options

PROMPTS_TAKE = ("a string, a list of strings, a list of token-id lists, or an integer numpy array "
                "(1-D: one prompt of ids, 2-D: a batch)")


def _kind(value) -> str:
    return type(value).__name__


def check_model(value, name: str = "model", *, optional: bool = False) -> None:
    """`value` is a `decoding.Model` (or None when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, Model):
        extra = " or None" if optional else ""
        raise TypeError(f"{name} must be a decoding.Model{extra} (from decoding.load(...) or "
                        f"decoding.Model(config, params)), got {_kind(value)}.")


def check_options(value) -> None:
    """`value` is a `decoding.Options` or None (the defaults)."""
    if value is not None and not isinstance(value, Options):
        raise TypeError(f"options must be a decoding.Options(...) or None, got {_kind(value)}: "
                        "e.g. options=decoding.Options(attention='pallas').")


def check_positive_int(value, name: str) -> None:
    """`value` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {_kind(value)} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def check_strategy(value) -> None:
    """`value` is None or a decoding strategy (callable `init` and `step`)."""
    if value is None:
        return
    if isinstance(value, type):
        raise TypeError(f"strategy must be a strategy object, got the class {value.__name__}: "
                        f"instantiate it, e.g. strategy={value.__name__}(...).")
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "step", None))):
        raise TypeError(f"strategy must be a decoding strategy (an object with init and step, e.g. "
                        f"decoding.Autoregressive() or decoding.Speculative(drafter, gamma=4)), got {_kind(value)}.")


def _id_list(p, i: int) -> list[int]:
    if isinstance(p, np.ndarray):
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise TypeError(f"prompt {i} is a {p.ndim}-D {p.dtype} array; a prompt of token ids is a 1-D "
                            "integer array.")
        return [int(t) for t in p]
    bad = [t for t in p if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    if bad:
        raise TypeError(f"prompt {i} holds {_kind(bad[0])} {bad[0]!r}; a prompt of token ids holds ints only.")
    return [int(t) for t in p]


def prompt_list(prompts) -> list:
    """The prompts as a non-empty list of strings and token-id lists (see the module doc)."""
    if hasattr(prompts, "__array__") and not isinstance(prompts, np.ndarray):
        prompts = np.asarray(prompts)  # a jax array
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2) or not np.issubdtype(prompts.dtype, np.integer):
            raise TypeError(f"prompts: got a {prompts.ndim}-D {prompts.dtype} array; prompts must be {PROMPTS_TAKE}.")
        prompts = [prompts] if prompts.ndim == 1 else list(prompts)
    elif isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
            prompts = [list(prompts)]  # one prompt of token ids
    else:
        raise TypeError(f"prompts must be {PROMPTS_TAKE}; got {_kind(prompts)}.")
    if not prompts:
        raise ValueError(f"no prompts given: prompts must be {PROMPTS_TAKE}, with at least one prompt.")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty (an empty string): give at least one character or token.")
            out.append(p)
        elif isinstance(p, (list, tuple, np.ndarray)) or hasattr(p, "__array__"):
            ids = _id_list(p if isinstance(p, (list, tuple)) else np.asarray(p), i)
            if not ids:
                raise ValueError(f"prompt {i} is empty (an empty list of token ids): give at least one token.")
            out.append(ids)
        else:
            raise TypeError(f"prompt {i} is a {_kind(p)}; each prompt is a string or a list of token ids "
                            f"(prompts must be {PROMPTS_TAKE}).")
    return out
