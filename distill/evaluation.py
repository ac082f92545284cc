"""What a drafter is trained for, measured end to end: acceptance and tau in speculative decoding.

`acceptance(target, draft, prompts)` runs our own
`decoding.generate(target, prompts, strategy=decoding.Speculative(drafting.DraftModel(), gamma),
draft=draft)` over held-out prompts and reports, summed over all batches:

  acceptance_rate            accepted draft tokens / drafted tokens (gamma per round)
  acceptance_per_position    P(draft token d accepted | tokens 1..d-1 accepted), d = 1..gamma
  tau                        tokens committed per target forward (prefill included, bonus
                             token counted), over all rows
  tokens_per_s               generation throughput (compilation excluded)

Prompts are padded to one bucket and batches filled by repeating the last prompt (repeated
rows do not count), so every call shares one compiled program.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def acceptance(target, draft, prompts: Sequence, *, gamma: int = 4, max_new_tokens: int = 64, batch_size: int = 8,
               sampling=None, lenience: float = 1.0, prompt_bucket: int | None = None, options=None,
               drafter=None) -> dict:
    """Speculative decoding of `prompts` (strings or token lists) with `draft` for `target`
    (drafter: the proposer reading `draft`; default `drafting.DraftModel()`, e.g.
    `drafting.Medusa()` for heads)."""
    import decoding
    import drafting
    from decoding import shapes

    if not prompts:
        raise ValueError("acceptance needs at least one held-out prompt.")
    strategy = decoding.Speculative(drafter or drafting.DraftModel(), gamma=gamma, lenience=lenience)
    prompts = list(prompts)
    if prompt_bucket is None and not isinstance(prompts[0], str):
        prompt_bucket = shapes.prompt_bucket(max(len(p) for p in prompts))
    hist = np.zeros(gamma + 1, np.int64)
    tokens = forwards = 0
    run_s = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)
        res = decoding.generate(target, chunk, strategy=strategy, draft=draft, sampling=sampling,
                                max_new_tokens=max_new_tokens, seed=start, prompt_bucket=prompt_bucket,
                                options=options)
        stats = res.stats
        if n == batch_size:
            hist += np.asarray(stats.extra["accept_histogram"], np.int64)
        tokens += sum(stats.tokens_per_row[:n])
        forwards += sum(stats.forwards_per_row[:n])
        run_s += stats.run_s
    reach = [int(hist[d:].sum()) for d in range(len(hist))]
    per_position = [reach[d] / reach[d - 1] if reach[d - 1] else float("nan") for d in range(1, len(hist))]
    rounds = int(hist.sum())
    accepted = float((hist * np.arange(len(hist))).sum())
    return {
        "gamma": gamma,
        "acceptance_rate": accepted / (rounds * gamma) if rounds else float("nan"),
        "acceptance_per_position": per_position,
        "tau": tokens / forwards if forwards else float("nan"),
        "tokens": int(tokens),
        "tokens_per_s": tokens / run_s if run_s else float("nan"),
    }
