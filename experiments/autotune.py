"""Choose gamma (chain) or the tree's depth / top-k / size from a calibration run + the roofline.

    python -m experiments.autotune --method spec --gammas 1-8 --measure-top 2
    python -m experiments.autotune --method tree --depths 3-7 --top-ks 1,2,4,8 --nodes 16,32,48,64

Procedure:
  1. calibration: run the method once with a generous setting (the largest gamma; the
     deepest, widest, largest tree) on a few prompts, and read its acceptance statistics;
  2. prediction: for every candidate setting, the expected tokens per target call E from
     those statistics and the time of one round from the cost model
     (`experiments.roofline`), hence the predicted speedup E * t_target(1) / t_round;
  3. optionally measure the `measure_top` best-predicted candidates for real and choose the
     fastest measured one (else the best predicted one); report both.

The tuner is written against a callable `measure(settings) -> stats`, so any harness (or a
synthetic model in a test) can drive it. The stats dict holds:
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
    acceptance q[d][r] = f[d][r] / (rounds reaching depth d) is taken to
    depend on depth and rank only (as in Sequoia's positional acceptance), so the best tree
    of N nodes is built best-first by path probability, within the candidate's depth and
    top-k, and E = 1 + sum of its nodes' path probabilities;
  * "tokens_per_s": measured speed (for the measured comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import roofline

Measure = Callable[[dict], dict]


@dataclasses.dataclass
class Candidate:
    settings: dict
    expected_tokens: float
    round_s: float
    predicted_speedup: float
    measured_tokens_per_s: float | None = None
    measured_speedup: float | None = None


@dataclasses.dataclass
class TuneResult:
    kind: str
    calibration_settings: dict
    calibration: dict
    candidates: list
    choice: Candidate
    chosen_by: str
    baseline_tokens_per_s: float | None = None
    notes: list = dataclasses.field(default_factory=list)

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
               baseline: Callable[[], dict] | None = None) -> TuneResult:
    """Pick gamma for a chain drafter (draft: a ModelConfig, seconds per draft forward or None)."""
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
    return TuneResult("chain", cal_settings, stats, cands, choice, how, base, notes)


def tune_tree(measure: Measure, *, target, device: roofline.DeviceProfile, draft=None,
              depths: Iterable[int] = range(2, 8), top_ks: Iterable[int] = (1, 2, 4, 8),
              node_budgets: Iterable[int] = (8, 16, 32, 48, 64), calibration: dict | None = None,
              context: float | None = None, batch: int = 1, bytes_per_param: float = 2, measure_top: int = 0,
              baseline: Callable[[], dict] | None = None) -> TuneResult:
    """Pick (depth, top_k, nodes) for tree decoding."""
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
    return TuneResult("tree", cal, stats, cands, choice, how, base, notes)


# --------------------------------------------------------------------------------------------
# A measure() over real models, through the benchmark's method registry
# --------------------------------------------------------------------------------------------


def _aggregate(gens) -> dict:
    """Tokens/s, tau and acceptance statistics of several `Generation`s (weighted by calls)."""
    tokens = sum(sum(len(t) for t in g.tokens) for g in gens)
    run_s = sum(g.run_s for g in gens)
    calls = sum(g.target_forwards for g in gens)
    out = {"tokens_per_s": tokens / run_s if run_s > 0 else float("nan"),
           "tau": tokens / calls if calls else float("nan"), "new_tokens": tokens, "run_s": run_s}
    for key in ("accept_histogram", "acceptance_per_depth_rank"):  # round counts: they add up
        parts = [g.extra[key] for g in gens if g.extra.get(key)]
        if parts:
            out[key] = _add(parts)
    for key in ("rounds", "row_rounds"):
        if any(key in g.extra for g in gens):
            out[key] = sum(g.extra.get(key, 0) for g in gens)
    return out


def _add(arrays):
    """Elementwise sum of lists (or lists of lists) of counts, padding shorter ones."""
    width = max(len(a) for a in arrays)
    out = []
    for i in range(width):
        items = [a[i] for a in arrays if i < len(a)]
        out.append(_add(items) if isinstance(items[0], (list, tuple)) else sum(float(x) for x in items))
    return out


def harness_measure(env, method: str, prompts: Sequence[list[int]], seed: int = 0) -> Measure:
    """measure(settings) that runs `method` with `settings` as its options on `prompts`
    (each warmed up first), through `experiments.methods`."""
    from . import methods

    def measure(settings: dict) -> dict:
        item = ":".join([method, *(f"{k}={v}" for k, v in settings.items())])
        m = methods.parse(item).build(env)
        try:
            gens = []
            for p in prompts:
                m.warmup([p], seed)
                gens.append(m.generate([p], seed))
        finally:
            m.close()
        stats = _aggregate(gens)
        stats["context"] = sum(len(p) for p in prompts) / len(prompts) + stats["new_tokens"] / len(prompts) / 2
        return stats
    return measure


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from . import environment, questions, specbench

    p = argparse.ArgumentParser(prog="python -m experiments.autotune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="spec", help="spec, pld, layerskip (chain) or tree")
    p.add_argument("--target", default=specbench.DEFAULT_TARGET)
    p.add_argument("--draft", default=None, help="draft model ('none': no draft; default as in specbench)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=4, help="calibration prompts (spread over reference16)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-bucket", type=int, default=1024,
                   help="pad every prompt to this many tokens, so each setting compiles one program (0: per prompt)")
    p.add_argument("--gammas", default="1-8")
    p.add_argument("--depths", default="2-7")
    p.add_argument("--top-ks", default="1,2,4,8")
    p.add_argument("--nodes", default="8,16,32,48,64")
    p.add_argument("--measure-top", type=int, default=2, help="measure the N best-predicted settings for real")
    p.add_argument("--profile", default="auto", help="auto, measure or a known device profile name")
    p.add_argument("--questions", default=None)
    p.add_argument("--out", default=None, help="output directory (default: experiments/results/autotune/...)")
    args = p.parse_args(argv)

    cfg = specbench.BenchConfig(target=args.target, draft=specbench.draft_from_arg(args.target, args.draft),
                                dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                                prompt_bucket=args.prompt_bucket)
    env = specbench.BenchEnv(cfg)
    items = questions.select(questions.load_questions(args.questions), "reference16")
    chosen = (items[::2] + items[1::2])[: args.prompts]
    prompts = [specbench.build_prompt(env.tokenizer, it, []) for it in chosen]
    info = environment.describe()
    device = specbench.device_profile(args.profile, info["device"]["device_kind"]) or roofline.measure_profile()
    measure = harness_measure(env, args.method, prompts)
    baseline = harness_measure(env, "ar", prompts)
    target = env.target.config
    bpp = roofline.dtype_bytes(args.dtype)
    chain_drafts = {"spec": lambda: env.draft.config, "pld": lambda: None,
                    "layerskip": lambda: roofline.truncated(target, max(1, target.num_layers // 2))}
    if args.method != "tree" and args.method not in chain_drafts:
        p.error(f"--method must be spec, pld, layerskip or tree, got {args.method!r}")
    try:
        if args.method == "tree":
            result = tune_tree(measure, target=target, device=device, draft=env.draft.config,
                               depths=_int_list(args.depths), top_ks=_int_list(args.top_ks),
                               node_budgets=_int_list(args.nodes), bytes_per_param=bpp,
                               measure_top=args.measure_top, baseline=lambda: baseline({}))
        else:
            result = tune_chain(measure, target=target, device=device, draft=chain_drafts[args.method](),
                                gammas=_int_list(args.gammas), bytes_per_param=bpp, measure_top=args.measure_top,
                                baseline=lambda: baseline({}))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (questions.REPO_ROOT / "experiments" / "results" / "autotune"
                                           / f"{Path(args.target).stem}_{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    record = {"result": result.as_dict(), "device_profile": device.as_dict(), "environment": info,
              "config": {"method": args.method, "target": args.target, "draft": cfg.draft, "dtype": args.dtype,
                         "prompts": [f"{it.question_id}/turn1" for it in chosen],
                         "max_new_tokens": args.max_new_tokens, "prompt_bucket": args.prompt_bucket,
                         "sampling": "greedy"}}
    (out / "autotune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = (f"# Autotuning {args.method} on {args.target} ({info['device']['device_kind']})\n\n"
          f"Device profile: {device.name}; calibration: {result.calibration_settings}; prompts: "
          f"{', '.join(record['config']['prompts'])}; greedy, {args.max_new_tokens} new tokens.\n\n"
          + result.to_markdown())
    (out / "autotune.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
