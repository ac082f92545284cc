"""Choose gamma (chain) or a tree's depth / top-k / size from a calibration run + the cost model.

    import decoding, drafting
    from decoding import autotune, roofline

    measure = autotune.GenerateMeasure(target, tuning_prompts, draft=draft,
        strategy=lambda s: decoding.Speculative(drafting.DraftModel(), gamma=s["gamma"]))
    baseline = autotune.GenerateMeasure(target, tuning_prompts, strategy=lambda s: decoding.Autoregressive())
    result = autotune.tune_chain(measure, target=target.config, draft=draft.config,
                                 device=roofline.profile("h100-sxm"), measure_top=2, baseline=lambda: baseline({}))
    result.choice.settings  # {"gamma": ...}

Procedure:
  1. calibration: run the method once with a generous setting (the largest gamma; the
     deepest, widest, largest tree) on the tuning prompts, and read its acceptance statistics;
  2. prediction: for every candidate setting, the expected tokens per target call E from
     those statistics and the time of one round from the cost model (`decoding.roofline`),
     hence the predicted speedup E * t_target(1) / t_round;
  3. optionally measure the `measure_top` best-predicted candidates for real and choose the
     fastest measured one (else the best predicted one); report both.

Tuning and reporting sets are kept apart: the result records how many prompts it was tuned on
and a hash of their token ids (`TuneResult.prompts`), so a report can show that its prompts are
not those.

The tuner is written against a callable `measure(settings) -> stats` (`GenerateMeasure` runs
`decoding.generate`; a synthetic model in a test works as well). The stats dict holds:
  * "tau": tokens per target call (bonus token included);
  * chain acceptance, one of (as `decoding.Speculative` reports them):
    "accept_histogram": h[d], the number of rounds that accepted exactly d draft tokens, or
    "acceptance_per_position": c_i = P(at least i accepted | at least i-1 accepted).
    Either gives r_i, the probability that a round accepts at least i draft tokens, and
    E(g) = 1 + sum_{i<=g} r_i for g up to the calibration gamma (drafts do not depend on gamma,
    so r_i carries over); beyond it r_i is extrapolated with the last conditional rate.
    Without either, a single acceptance rate a is fitted to tau: E(g) = (1 - a^(g+1)) / (1 - a);
  * "acceptance_per_depth_rank" (tree, required): f[d][r], the number of rounds (out of
    "rounds"; without it f holds fractions of rounds) whose accepted path went through the
    rank-r child (siblings ranked by draft probability) at depth d+1. The conditional
    acceptance q[d][r] = f[d][r] / (rounds reaching depth d) is taken to depend on depth and
    rank only (as in Sequoia's positional acceptance), so the best tree of N nodes is built
    best-first by path probability, within the candidate's depth and top-k, and
    E = 1 + sum of its nodes' path probabilities;
  * "tokens_per_s": measured speed (for the measured comparison);
  * "context": mean tokens in the cache during decoding (optional; 512 otherwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from . import roofline
from .generation import generate

Measure = Callable[[dict], dict]


@dataclasses.dataclass
class Candidate:
    """One setting with its expected tokens per call, roofline round time and speedups."""

    settings: dict
    expected_tokens: float
    round_s: float
    predicted_speedup: float
    measured_tokens_per_s: float | None = None
    measured_speedup: float | None = None


@dataclasses.dataclass
class TuneResult:
    """The candidates (best predicted first), the choice and how it was made, and the calibration."""

    kind: str
    calibration_settings: dict
    calibration: dict
    candidates: list
    choice: Candidate
    chosen_by: str
    baseline_tokens_per_s: float | None = None
    notes: list = dataclasses.field(default_factory=list)
    #: the tuning prompts: {"count": n, "sha256": hash of their token ids} (see `fingerprint`)
    prompts: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        lines = [f"Chosen ({self.chosen_by}): {self.choice.settings}, predicted speedup "
                 f"{self.choice.predicted_speedup:.2f}x"
                 + (f", measured {self.choice.measured_speedup:.2f}x" if self.choice.measured_speedup else ""), "",
                 "| settings | E (tokens/call) | round (roofline) | predicted speedup | measured tokens/s "
                 "| measured speedup |",
                 "|---|---|---|---|---|---|"]
        for c in self.candidates:
            mt = f"{c.measured_tokens_per_s:.1f}" if c.measured_tokens_per_s else ""
            ms = f"{c.measured_speedup:.2f}x" if c.measured_speedup else ""
            s = ", ".join(f"{k}={v}" for k, v in c.settings.items())
            lines.append(f"| {s} | {c.expected_tokens:.2f} | {c.round_s * 1e3:.3f} ms | "
                         f"{c.predicted_speedup:.2f}x | {mt} | {ms} |")
        if self.prompts:
            lines += ["", f"Tuned on {self.prompts['count']} prompts (token ids sha256 "
                          f"{self.prompts['sha256'][:12]}); report on other prompts."]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Expected tokens from calibration statistics
# --------------------------------------------------------------------------------------------


def chain_reach(stats: dict, calibration_gamma: int) -> list[float]:
    """r_1..r_gamma, the probability that a round accepts at least i draft tokens."""
    hist = stats.get("accept_histogram")
    if hist:
        hist = [float(h) for h in hist]
        total = sum(hist)
        if total <= 0 or any(h < 0 for h in hist):
            raise ValueError(f"accept_histogram {hist} must hold non-negative round counts, not all zero.")
        return [sum(hist[i:]) / total for i in range(1, len(hist))][:calibration_gamma]
    cond = stats.get("acceptance_per_position")
    if cond:
        cond = [0.0 if c is None or not math.isfinite(float(c)) else float(c) for c in cond][:calibration_gamma]
        if not all(0.0 <= c <= 1.0 for c in cond):
            raise ValueError(f"acceptance_per_position {cond} must hold probabilities (the rate of accepting "
                             "position i given that position i-1 was accepted).")
        return roofline.reach_from_conditional(cond)
    tau = stats.get("tau")
    if tau is None:
        raise ValueError("the calibration stats need 'acceptance_per_position' or 'tau'.")
    alpha = roofline.alpha_from_expected_tokens(min(max(float(tau), 1.0), calibration_gamma + 1.0), calibration_gamma)
    return [alpha**i for i in range(1, calibration_gamma + 1)]


def chain_expected_tokens(reach: Sequence[float], gamma: int) -> float:
    """E(gamma) from measured reach probabilities, extrapolating past the calibrated length."""
    reach = list(reach)
    if gamma <= len(reach):
        return roofline.expected_tokens_from_reach(reach[:gamma])
    if not reach:
        return 1.0
    rate = reach[-1] / reach[-2] if len(reach) >= 2 and reach[-2] > 0 else reach[-1]
    extra = [reach[-1] * rate**k for k in range(1, gamma - len(reach) + 1)]
    return roofline.expected_tokens_from_reach(reach + extra)


def rank_acceptance(stats: dict) -> list[list[float]]:
    """q[d][r]: P(the rank-r child is accepted at depth d+1 | depth d reached)."""
    f = stats.get("acceptance_per_depth_rank")
    if not f:
        raise ValueError(
            "tree tuning needs 'acceptance_per_depth_rank' in the calibration stats: for each depth, the number "
            "of rounds (out of 'rounds') whose accepted path went through the rank-r child (siblings ranked by "
            "draft probability). Per-depth figures alone ('accept_histogram', 'acceptance_per_position') cannot "
            "tell how acceptance splits between siblings, so they cannot rank trees of other widths.")
    total = float(stats.get("row_rounds", stats.get("rounds", 1.0)))  # rank counts are per row-round
    if total <= 0:
        raise ValueError(f"the calibration ran no rounds (rounds={total}).")
    q, reach_prev = [], 1.0
    for d, row in enumerate(f):
        row = [float(x) / total for x in row]
        reached = sum(row)
        if reached > reach_prev + 1e-6:
            raise ValueError(f"acceptance_per_depth_rank: depth {d + 1} is reached in {reached:.3f} of rounds, more "
                             f"than depth {d} ({reach_prev:.3f}).")
        q.append([x / reach_prev if reach_prev > 0 else 0.0 for x in row])
        reach_prev = reached
    return q


def best_tree(q: Sequence[Sequence[float]], *, depth: int, top_k: int, nodes: int) -> tuple[list[int], list[float]]:
    """The N-node tree (parents, per-node conditional acceptance) maximising E, best-first.

    A child's path probability never exceeds its parent's, so taking nodes in decreasing
    path probability always yields a valid tree (ancestors come first).
    """
    parents: list[int] = []
    accept: list[float] = []
    reach: list[float] = []
    heap: list = []  # (-path probability, tie-break, parent index, depth (0-based), rank)
    counter = 0

    def push_children(parent: int, d: int, parent_reach: float):
        nonlocal counter
        if d >= min(depth, len(q)):
            return
        for r in range(min(top_k, len(q[d]))):
            heapq.heappush(heap, (-parent_reach * q[d][r], counter, parent, d, r))
            counter += 1

    push_children(-1, 0, 1.0)
    while heap and len(parents) < nodes:
        neg, _, parent, d, r = heapq.heappop(heap)
        parents.append(parent)
        accept.append(q[d][r])
        reach.append(-neg)
        push_children(len(parents) - 1, d + 1, -neg)
    return parents, accept


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------


def fingerprint(prompts: Sequence[Sequence[int]]) -> dict:
    """{"count": n, "sha256": hash of the token ids}: which prompts a tuning run saw."""
    ids = [[int(t) for t in p] for p in prompts]
    return {"count": len(ids), "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


def _tuning_prompts(measure, prompts, where: str) -> list:
    prompts = prompts if prompts is not None else getattr(measure, "prompts", None)
    if prompts is None or len(prompts) == 0:
        raise ValueError(f"{where}: give the tuning prompts (prompts=[token ids, ...], the ones `measure` runs on) or a "
                         "measure with a .prompts field (GenerateMeasure): the result records which prompts it was "
                         "tuned on, so that a report can use others.")
    if any(isinstance(p, str) for p in prompts):
        raise ValueError(f"{where}: prompts are token-id lists (tokenize them first), got a string.")
    return list(prompts)


def _measure_top(cands: list, measure: Measure, measure_top: int, baseline: Callable[[], dict] | None):
    base_tps = None
    if measure_top > 0 and baseline is not None:
        base_tps = float(baseline()["tokens_per_s"])
    for c in cands[:measure_top]:
        stats = measure(dict(c.settings))
        c.measured_tokens_per_s = float(stats["tokens_per_s"])
        if base_tps:
            c.measured_speedup = c.measured_tokens_per_s / base_tps
    measured = [c for c in cands if c.measured_tokens_per_s is not None]
    if measured:
        return max(measured, key=lambda c: c.measured_tokens_per_s), "measured tokens/s", base_tps
    return cands[0], "predicted speedup", base_tps


def tune_chain(measure: Measure, *, target, device: roofline.DeviceProfile, draft=None,
               gammas: Iterable[int] = range(1, 9), calibration_gamma: int | None = None,
               context: float | None = None, batch: int = 1, bytes_per_param: float = 2, measure_top: int = 0,
               baseline: Callable[[], dict] | None = None, prompts: Sequence | None = None) -> TuneResult:
    """Pick gamma for a chain drafter (draft: a ModelConfig, seconds per draft forward or None).

    prompts: the token-id prompts `measure` runs on (default: `measure.prompts`), recorded in
    the result as a count and a hash; report the choice on other prompts.
    """
    tuned_on = fingerprint(_tuning_prompts(measure, prompts, "tune_chain"))
    gammas = sorted(set(int(g) for g in gammas))
    if not gammas or gammas[0] < 1:
        raise ValueError(f"gammas must be >= 1, got {gammas}.")
    cal_gamma = calibration_gamma or max(gammas)
    cal_settings = {"gamma": cal_gamma}
    stats = measure(dict(cal_settings))
    reach = chain_reach(stats, cal_gamma)
    ctx = float(stats.get("context", 512.0) if context is None else context)
    notes = []
    if max(gammas) > len(reach):
        notes.append(f"acceptance beyond position {len(reach)} is extrapolated from the calibration run.")
    cands = []
    for g in gammas:
        e = chain_expected_tokens(reach, g)
        p = roofline.chain_prediction(target, device, gamma=g, expected_tokens=e, draft=draft, context=ctx,
                                      batch=batch, bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_param)
        cands.append(Candidate({"gamma": g}, e, p.round_s, p.speedup))
    cands.sort(key=lambda c: -c.predicted_speedup)
    choice, how, base = _measure_top(cands, measure, measure_top, baseline)
    return TuneResult("chain", cal_settings, stats, cands, choice, how, base, notes, tuned_on)


def tune_tree(measure: Measure, *, target, device: roofline.DeviceProfile, draft=None,
              depths: Iterable[int] = range(2, 8), top_ks: Iterable[int] = (1, 2, 4, 8),
              node_budgets: Iterable[int] = (8, 16, 32, 48, 64), calibration: dict | None = None,
              context: float | None = None, batch: int = 1, bytes_per_param: float = 2, measure_top: int = 0,
              baseline: Callable[[], dict] | None = None, prompts: Sequence | None = None) -> TuneResult:
    """Pick (depth, top_k, nodes) for tree decoding (draft and prompts as in `tune_chain`)."""
    tuned_on = fingerprint(_tuning_prompts(measure, prompts, "tune_tree"))
    depths, top_ks, budgets = sorted(set(depths)), sorted(set(top_ks)), sorted(set(node_budgets))
    cal = dict(calibration or {"depth": max(depths), "top_k": max(top_ks), "nodes": max(budgets)})
    stats = measure(dict(cal))
    q = rank_acceptance(stats)
    ctx = float(stats.get("context", 512.0) if context is None else context)
    notes = []
    if max(depths) > len(q) or max(top_ks) > max(len(r) for r in q):
        notes.append(f"candidates deeper than {len(q)} or wider than the calibration's top-k are predicted "
                     "with no acceptance there (the calibration saw none).")
    cands = []
    for d in depths:
        for k in top_ks:
            for n in budgets:
                if n < d:  # a tree of n nodes cannot be d deep
                    continue
                parents, accept = best_tree(q, depth=d, top_k=k, nodes=n)
                e = roofline.tree_expected_tokens(parents, accept)
                p = roofline.tree_prediction(target, device, nodes=n, depth=d, expected_tokens=e, draft=draft,
                                             draft_tokens_per_step=k, context=ctx, batch=batch,
                                             bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_param)
                cands.append(Candidate({"depth": d, "top_k": k, "nodes": n}, e, p.round_s, p.speedup))
    if not cands:
        raise ValueError("no tree candidate: every node budget is smaller than every depth.")
    cands.sort(key=lambda c: -c.predicted_speedup)
    choice, how, base = _measure_top(cands, measure, measure_top, baseline)
    return TuneResult("tree", cal, stats, cands, choice, how, base, notes, tuned_on)


# --------------------------------------------------------------------------------------------
# A measure() over a real model, through decoding.generate
# --------------------------------------------------------------------------------------------


def add_counts(arrays):
    """Elementwise sum of lists (or lists of lists) of counts, padding shorter ones."""
    width = max(len(a) for a in arrays)
    out = []
    for i in range(width):
        items = [a[i] for a in arrays if i < len(a)]
        out.append(add_counts(items) if isinstance(items[0], (list, tuple)) else sum(float(x) for x in items))
    return out


def aggregate(runs: Sequence[dict]) -> dict:
    """Tokens/s, tau and acceptance statistics of several runs, weighted by their calls.

    Each run: {"new_tokens": int, "run_s": float, "target_forwards": int, "extra": dict} (a
    `decoding.Stats`' figures); round counts (accept_histogram, acceptance_per_depth_rank,
    rounds, row_rounds) add up over runs.
    """
    tokens = sum(r["new_tokens"] for r in runs)
    run_s = sum(r["run_s"] for r in runs)
    calls = sum(r["target_forwards"] for r in runs)
    out = {"tokens_per_s": tokens / run_s if run_s > 0 else float("nan"),
           "tau": tokens / calls if calls else float("nan"), "new_tokens": tokens, "run_s": run_s}
    for key in ("accept_histogram", "acceptance_per_depth_rank"):
        parts = [r["extra"][key] for r in runs if r["extra"].get(key) is not None and len(r["extra"][key])]
        if parts:
            out[key] = add_counts(parts)
    for key in ("rounds", "row_rounds"):
        if any(key in r["extra"] for r in runs):
            out[key] = sum(float(r["extra"].get(key, 0)) for r in runs)
    return out


def _host(value):
    """Arrays in a Stats.extra -> Python lists and numbers."""
    return np.asarray(value).tolist() if hasattr(value, "shape") else value


@dataclasses.dataclass(frozen=True)
class GenerateMeasure:
    """`measure(settings) -> stats`: `decoding.generate(model, [prompt], strategy(settings), ...)`
    on each prompt alone (batch 1), a second time when the first call compiled, stats summed.

    model: the target `decoding.Model`; prompts: token-id lists; strategy: settings -> a
    strategy object (e.g. `lambda s: decoding.Speculative(drafter, gamma=s["gamma"])`); draft:
    the draft `Model` its drafter needs; the rest as `decoding.generate` takes them. Pass a
    `prompt_bucket` so that every prompt of a setting shares one compiled program.
    """

    model: object
    prompts: tuple
    strategy: Callable[[dict], object]
    draft: object = None
    sampling: object = None
    max_new_tokens: int = 128
    prompt_bucket: int | None = None
    options: object = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(tuple(int(t) for t in p) for p in _tuning_prompts(
            None, self.prompts, "GenerateMeasure")))

    def __call__(self, settings: dict) -> dict:
        runs = []
        for prompt in self.prompts:
            kw = dict(strategy=self.strategy(dict(settings)), max_new_tokens=self.max_new_tokens, seed=self.seed,
                      draft=self.draft, prompt_bucket=self.prompt_bucket, options=self.options)
            if self.sampling is not None:
                kw["sampling"] = self.sampling
            st = generate(self.model, [list(prompt)], **kw).stats
            if st.compile_s > 0:  # time a run that compiled nothing
                st = generate(self.model, [list(prompt)], **kw).stats
            runs.append({"new_tokens": st.new_tokens, "run_s": st.run_s, "target_forwards": st.target_forwards,
                         "extra": {k: _host(v) for k, v in st.extra.items()}})
        stats = aggregate(runs)
        n = len(self.prompts)
        stats["context"] = sum(len(p) for p in self.prompts) / n + stats["new_tokens"] / n / 2
        return stats
