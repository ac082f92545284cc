"""Entropy-adaptive decoding (EAD): switch between a small and a large model token by token.

Paper: Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient
Inference" (arXiv 2502.06833). Two models that share a tokenizer take turns generating one
sequence. The model generating the current token measures its uncertainty, the Shannon entropy
(bits) of softmax(logits) *before* temperature, top-k or top-p; the mean over the last
`window` generated tokens decides who generates the next tokens: the large model while the
mean exceeds `threshold`, the small one otherwise.

EAD is lossy by design: the output is neither the small model's nor the large model's own
generation (except at the end points `threshold=+inf`, small only, and `threshold=-inf`,
large only, which reproduce each model's decoding token for token), and it is not
distributed as either model's sampling distribution. Nothing is verified; the trade-off is
accuracy against the fraction of tokens the large model generates.

Use: `generate(large, prompts, strategy=EntropyAdaptive(threshold=2.0), draft=small)`. The
large model is the "target", the small one the "draft"; `generate` refuses models whose
tokenizers differ.

One step, for every batch row at once (each row has its own active model):
  catch_up  the active model's cache is brought up to date with the context (every token the
            other model generated since this one last ran, plus the last committed token) and
            returns the next-token logits. In a lockstep batch both models may run in the same
            step for different rows; a model runs only when some running row needs it (a
            `lax.switch`), with a 1-token forward when no row lags, else a right-padded block
            of `catchup_width` tokens with per-row counts, preceded, only when a row lags by
            more than that, by whole blocks (a `while_loop`). Shapes are static; rows that do
            not need the model keep their cache cursor (the slots it wrote are stale).
  select    each row takes its active model's logits;
  sample    the token is drawn from the processed distribution of those logits
            (`Greedy` / `Sampling`), its entropy from the raw ones;
  commit    `decoding.tokens.commit` (EOS, length, stop sequences) and the context buffer;
  switch    the entropy joins the row's rolling window; if the window mean says the other
            model, and the current one has generated at least `min_dwell` tokens since it
            became active, the row switches for its next token (a row that this token
            finished has no next token and does not switch).

Choices (the paper is the authority where it is explicit; items marked *open* are not fixed
by it and are choices of this implementation):
  * window w = 5 (the paper's experimental setting); strict comparison `mean > threshold`.
  * The window is the last w generated tokens whichever model produced each, each entry the
    entropy of the distribution that token was sampled from (token 0: see the next item); it
    is not reset on a switch. Before w tokens exist the mean is over those that do (*open*).
  * Start with the small model. Both models prefill the prompt at the start (one batched
    forward each), so the first token's distribution of each is at hand: the small model's
    entropy there is the first window entry and decides, by the same rule, which model
    samples the first token (*open*; it makes `threshold=-inf` exactly the large model's own
    decoding). Prompt prefill is not part of the paper's cost, nor of the costs below.
  * `min_dwell`: the paper's switching rule has a stability condition besides the
    threshold; its exact form and value could not be checked here, so this one is *open*:
    after switching, a row stays with the new model for at least `min_dwell` tokens.
    The default, 5 = w, lets a row switch back only once the window holds entropies of the
    current model alone. `min_dwell=1` is no constraint beyond the window. The starting model
    is not bound by it (the start is not a switch).
  * Catch-up (*open*: the paper does not discuss caches): a model that becomes active
    prefills, in one block forward, the tokens generated since it last ran (`catchup_width`,
    default 16; longer backlogs take several blocks). One of those tokens, the last
    committed one, is what the model would have processed anyway to produce the next token;
    the others are the catch-up tokens, counted apart.

Cost (the paper's definition, P = parameter count, `ModelConfig.param_count`, N tokens
generated, N = N_small + N_large):
  cost = (N_small * P_small + N_large * P_large) / (N * P_large)
and two views of what catching up adds (C = catch-up tokens a model processed, F = forward
calls that carried a row's tokens, the first token's prefill counted for its model):
  cost_with_catchup = ((N_small + C_small) * P_small + (N_large + C_large) * P_large) / (N * P_large)
      the arithmetic (compute-bound) view. The large model must read every token the small one
      wrote before it can take over, so N_large + C_large is every token up to the row's last
      stay on the small model, and this cost is near 1 + N_small P_small / (N P_large) when
      the large model still runs late in a sequence: in FLOPs, EAD saves little over the
      large model alone; its savings are in sequential large-model calls (the next view).
  cost_calls = (F_small * P_small + F_large * P_large) / (N * P_large)
      the weight-read (memory-bound decoding) view, where a forward costs one read of the
      weights whatever its width: a catch-up rides in the step's forward, so this equals the
      paper's cost plus the extra blocks of backlogs longer than `catchup_width`.
All count per row, as if each row ran alone; in a lockstep batch a model's forward runs over
the whole batch when any row needs it, so wall time (`generate`'s `Stats.run_s`) is the
measured cost. `small_forwards` / `large_forwards` count those batched calls.

Legend: B batch, P padded prompt length, C context slots, W catch-up width, w window, V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import tokens
from .strategy import Context, prefill, round_keys
from .cache import KVCache
from .model import forward
from .sampling import entropy_bits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """Decoding state of entropy-adaptive decoding (all per-row arrays are [B]).

    small, large: each model's cache; `lengths` = how many context tokens it holds (it lags
      the context while the other model generates).
    context: int32[B, C] prompt + generated tokens; context_len: int32[B].
    use_large: bool[B] which model generates the row's next token.
    entropy: float32[B, w] ring buffer of the last w entropies (bits); token k sits at k % w.
    since_switch: int32[B] tokens generated by the active model since it became active.
    small_tokens, large_tokens: int32[B] committed tokens each model generated.
    small_catchup, large_catchup: int32[B] catch-up tokens each model processed.
    switches: int32[B]; small_calls, large_calls: int32[B] forward calls that carried the row's
      tokens (the first token's prefill counts for the model that sampled it);
      small_forwards, large_forwards: int32[] batched forward calls (prefill included).
    small_params, large_params: int32[2] parameter counts as (count // 2**20, count % 2**20),
      exact in int32 (for the cost).
    """

    out: tokens.Tokens
    small: KVCache
    large: KVCache
    context: jax.Array
    context_len: jax.Array
    use_large: jax.Array
    entropy: jax.Array
    since_switch: jax.Array
    key: jax.Array
    small_tokens: jax.Array
    large_tokens: jax.Array
    small_catchup: jax.Array
    large_catchup: jax.Array
    switches: jax.Array
    small_calls: jax.Array
    large_calls: jax.Array
    small_forwards: jax.Array
    large_forwards: jax.Array
    small_params: jax.Array
    large_params: jax.Array


# ----------------------------------------------------------------------------------------------
# catch_up: bring one model's cache up to the context and read its next-token logits
# ----------------------------------------------------------------------------------------------


def catch_up(config, params, cache: KVCache, context: jax.Array, context_len: jax.Array, need: jax.Array,
             width: int, options=None):
    """Feed each row of `need: bool[B]` the context tokens its cache lacks; next-token logits.

    cache.lengths[b] tokens of `context: int32[B, C]` are in the cache; rows in `need` must
    lag (`context_len - cache.lengths >= 1`). One of four static-shape branches runs (a
    `lax.switch` on the largest lag of a needed row): nothing (no row needs this model); one
    1-token forward (no row lags by more than one: plain decoding); one `width`-wide forward,
    right-padded, with per-row counts (every lag <= width); or whole `width` blocks in a
    `while_loop` until every lag is <= width, then that forward. Positions are slot indices.
    Rows not in `need` keep their cursor (the slots written past it are stale).

    Returns (logits: float32[B, V] at each needed row's last context token (zeros elsewhere),
    cache with lengths = context_len on needed rows, tokens fed: int32[B], forward calls that
    carried each row's tokens: int32[B]; their max is the number of batched calls made).
    """
    b, c = context.shape
    start = cache.lengths
    goal = jnp.where(need, context_len, start)
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    no_calls = jnp.zeros((b,), jnp.int32)

    def tokens_at(cur, w):
        return jnp.take_along_axis(context, jnp.minimum(cur[:, None] + j[:, :w], c - 1), axis=1)

    def skip(cache):
        return jnp.zeros((b, config.vocab_size), jnp.float32), cache, no_calls

    def one(cache):
        cur = cache.lengths
        out = forward(config, params, tokens_at(cur, 1), cur[:, None], cache, options=options)
        return out.logits[:, 0], out.cache.truncate(goal), need.astype(jnp.int32)

    def block(cache):
        cur = cache.lengths
        out = forward(config, params, tokens_at(cur, width), cur[:, None] + j, cache,
                      logit_indices=jnp.maximum(goal - cur - 1, 0)[:, None], options=options)
        return out.logits[:, 0], out.cache.truncate(goal), need.astype(jnp.int32)

    def whole_blocks(carry):
        cache, calls = carry
        cur = cache.lengths
        out = forward(config, params, tokens_at(cur, width), cur[:, None] + j, cache, compute_logits=False,
                      options=options)
        full = goal - cur > width
        return out.cache.truncate(jnp.where(full, cur + width, cur)), calls + full

    def long(cache):
        cache, calls = jax.lax.while_loop(lambda carry: jnp.any(goal - carry[0].lengths > width), whole_blocks,
                                          (cache, no_calls))
        logits, cache, last = block(cache)
        return logits, cache, calls + last

    lag = jnp.max(goal - start)
    branch = jnp.where(~jnp.any(need), 0, jnp.where(lag <= 1, 1, jnp.where(lag <= width, 2, 3)))
    logits, cache, calls = jax.lax.switch(branch, (skip, one, block, long), cache)
    return logits, cache, goal - start, calls


# ----------------------------------------------------------------------------------------------
# switch: the rolling-entropy rule with a minimum dwell
# ----------------------------------------------------------------------------------------------


def rolling_mean(entropy: jax.Array, count: jax.Array) -> jax.Array:
    """Mean of the last min(count, w) entries of the ring buffer `entropy: float32[B, w]`."""
    w = entropy.shape[1]
    filled = jnp.arange(w)[None, :] < jnp.minimum(count, w)[:, None]
    return jnp.sum(jnp.where(filled, entropy, 0.0), axis=1) / jnp.maximum(jnp.minimum(count, w), 1)


def switch(mean: jax.Array, use_large: jax.Array, since_switch: jax.Array, threshold, min_dwell: int):
    """-> (use_large, since_switch, switched), all [B]: the model for each row's next token."""
    want = mean > threshold
    switched = (want != use_large) & (since_switch >= min_dwell)
    return jnp.where(switched, want, use_large), jnp.where(switched, 0, since_switch), switched


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntropyAdaptive:
    """Entropy-adaptive decoding (see the module doc): the large model generates while the
    rolling mean entropy (bits) of the last `window` tokens exceeds `threshold`.

    `threshold=float("inf")` is the small model alone, `float("-inf")` the large one alone.
    `min_dwell`: tokens a row stays with a model after switching to it (>= 1).
    `catchup_width`: tokens fed per catch-up forward (a static shape; longer backlogs loop).
    """

    threshold: float
    window: int = 5
    min_dwell: int = 5
    catchup_width: int = 16

    name = "entropy_adaptive"
    cache_slack = 1

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
            raise ValueError(f"threshold must be a number of bits (float('inf') = small model only, "
                             f"float('-inf') = large model only), got {self.threshold!r}.")
        for name in ("window", "min_dwell", "catchup_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}"
                                 + (" (min_dwell=1 means no constraint beyond the window)." if name == "min_dwell"
                                    else "."))

    def validate(self, ctx: Context, draft) -> None:
        if draft is None or ctx.draft is None:
            raise ValueError(
                "EntropyAdaptive needs two models: pass the small one as the draft, "
                "generate(large_model, prompts, strategy=EntropyAdaptive(threshold=...), draft=small_model).")
        if ctx.draft.vocab_size != ctx.target.vocab_size:
            raise ValueError(
                f"EntropyAdaptive needs the small and large models to share a tokenizer: their vocabularies "
                f"have {ctx.draft.vocab_size} and {ctx.target.vocab_size} entries. Both models extend one token "
                "sequence, so their token ids must mean the same; pick a small model of the large one's family.")

    def split_runtime(self) -> tuple["EntropyAdaptive", dict]:
        """-> (this strategy with the threshold canonicalised, {"threshold": value}).

        `generate` passes the threshold to the compiled program as a traced value (in
        `params["runtime"]`), so a threshold sweep compiles once per shape, not once per value.
        """
        return dataclasses.replace(self, threshold=0.0), {"threshold": self.threshold}

    def _threshold(self, params) -> jax.Array | float:
        runtime = params.get("runtime")
        return runtime["threshold"] if runtime is not None else self.threshold

    # -- init: prefill both models, the first token -------------------------------------------

    def init(self, ctx: Context, params, prompt, lengths, key) -> State:
        b, p = prompt.shape
        small = KVCache.init(ctx.draft, b, ctx.capacity, params["draft"]["embed"].dtype)
        large = KVCache.init(ctx.target, b, ctx.capacity, params["target"]["embed"].dtype)
        logits_s, small = prefill(ctx.draft, params["draft"], prompt, lengths, small, ctx.options)
        logits_l, large = prefill(ctx.target, params["target"], prompt, lengths, large, ctx.options)
        h0 = entropy_bits(logits_s)
        entropy = jnp.zeros((b, self.window), jnp.float32).at[:, 0].set(h0)
        free = jnp.full((b,), self.min_dwell, jnp.int32)  # the start is not a switch: no dwell
        use_large, since, switched = switch(h0, jnp.zeros((b,), bool), free, self._threshold(params), self.min_dwell)
        key, sub = round_keys(ctx, key)
        first = ctx.sampling.sample(sub, jnp.where(use_large[:, None], logits_l, logits_s))
        out = tokens.commit(tokens.Tokens.init(b, ctx.max_new_tokens), first[:, None], jnp.ones_like(lengths), ctx.rule)
        context = jnp.zeros((b, ctx.capacity), jnp.int32).at[:, :p].set(prompt)
        context = context.at[jnp.arange(b), lengths].set(first)
        zeros = jnp.zeros((b,), jnp.int32)
        return State(out=out, small=small, large=large, context=context, context_len=lengths + 1,
                     use_large=use_large, entropy=entropy, since_switch=since + 1, key=key,
                     small_tokens=(~use_large).astype(jnp.int32), large_tokens=use_large.astype(jnp.int32),
                     small_catchup=zeros, large_catchup=zeros, switches=switched.astype(jnp.int32),
                     small_calls=(~use_large).astype(jnp.int32), large_calls=use_large.astype(jnp.int32),
                     small_forwards=jnp.ones((), jnp.int32), large_forwards=jnp.ones((), jnp.int32),
                     small_params=_split_count(ctx.draft.param_count()),
                     large_params=_split_count(ctx.target.param_count()))

    # -- one step: catch_up -> select -> sample -> commit -> switch -----------------------------

    def step(self, ctx: Context, params, state: State) -> State:
        running = ~state.out.done
        need_l = running & state.use_large
        need_s = running & ~state.use_large
        logits_s, small, fed_s, calls_s = catch_up(ctx.draft, params["draft"], state.small, state.context,
                                                   state.context_len, need_s, self.catchup_width, ctx.options)
        logits_l, large, fed_l, calls_l = catch_up(ctx.target, params["target"], state.large, state.context,
                                                   state.context_len, need_l, self.catchup_width, ctx.options)
        logits = jnp.where(state.use_large[:, None], logits_l, logits_s)
        h = entropy_bits(logits)
        key, sub = round_keys(ctx, state.key)  # greedy: no random split per step
        tok = ctx.sampling.sample(sub, logits)
        out = tokens.commit(state.out, tok[:, None], jnp.ones_like(tok), ctx.rule)
        new = out.count - state.out.count  # 1 on running rows
        b = tok.shape[0]
        rows = jnp.arange(b)
        slot = jnp.where(running, state.context_len, ctx.capacity)
        context = state.context.at[rows, slot].set(tok, mode="drop")
        context_len = state.context_len + new
        k = state.out.count  # index of this token in the row's output
        ring = jnp.where(running, k % self.window, self.window)
        entropy = state.entropy.at[rows, ring].set(h, mode="drop")
        since = state.since_switch + new
        mean = rolling_mean(entropy, k + 1)
        use_large, since2, switched = switch(mean, state.use_large, since, self._threshold(params), self.min_dwell)
        keep = out.done  # done before or with this token: no next token follows, so no switch
        return State(
            out=out, small=small, large=large, context=context, context_len=context_len,
            use_large=jnp.where(keep, state.use_large, use_large), entropy=entropy,
            since_switch=jnp.where(keep, state.since_switch, since2), key=key,
            small_tokens=state.small_tokens + jnp.where(state.use_large, 0, new),
            large_tokens=state.large_tokens + jnp.where(state.use_large, new, 0),
            small_catchup=state.small_catchup + jnp.maximum(fed_s - 1, 0),
            large_catchup=state.large_catchup + jnp.maximum(fed_l - 1, 0),
            switches=state.switches + (switched & ~keep).astype(jnp.int32),
            small_calls=state.small_calls + calls_s, large_calls=state.large_calls + calls_l,
            small_forwards=state.small_forwards + jnp.max(calls_s),
            large_forwards=state.large_forwards + jnp.max(calls_l),
            small_params=state.small_params, large_params=state.large_params)

    # -- stats -------------------------------------------------------------------------------

    def stats(self, state: State) -> dict:
        return ead_stats(
            small_tokens=np.asarray(state.small_tokens), large_tokens=np.asarray(state.large_tokens),
            small_catchup=np.asarray(state.small_catchup), large_catchup=np.asarray(state.large_catchup),
            small_calls=np.asarray(state.small_calls), large_calls=np.asarray(state.large_calls),
            switches=np.asarray(state.switches), small_params=_join_count(state.small_params),
            large_params=_join_count(state.large_params), small_forwards=int(state.small_forwards),
            large_forwards=int(state.large_forwards))


def _split_count(n: int) -> jax.Array:
    return jnp.asarray([n >> 20, n & ((1 << 20) - 1)], jnp.int32)


def _join_count(parts) -> int:
    hi, lo = (int(x) for x in np.asarray(parts))
    return (hi << 20) + lo


def cost_ratio(small_tokens, large_tokens, small_params, large_params, small_extra=0, large_extra=0) -> float:
    """The paper's cost: (N_s P_s + N_l P_l) / (N P_l), N = N_s + N_l; `*_extra` tokens
    (catch-up) are added to each model's work but not to N. nan when N = 0."""
    n = small_tokens + large_tokens
    if n <= 0:
        return float("nan")
    work = (small_tokens + small_extra) * small_params + (large_tokens + large_extra) * large_params
    return float(work / (n * large_params))


def ead_stats(*, small_tokens, large_tokens, small_catchup, large_catchup, small_calls, large_calls, switches,
              small_params, large_params, small_forwards=None, large_forwards=None) -> dict:
    """Figures of one or more EAD runs from per-row counts (arrays of equal length).

    Aggregates sum the rows before dividing (token-weighted), as the paper's fractions are;
    the per-row counts are kept so that runs can be pooled (`experiments/ead.py`).
    """
    ns, nl = int(np.sum(small_tokens)), int(np.sum(large_tokens))
    cs, cl = int(np.sum(small_catchup)), int(np.sum(large_catchup))
    fs, fl = int(np.sum(small_calls)), int(np.sum(large_calls))
    n = ns + nl
    d = {
        "large_fraction": nl / n if n else float("nan"),
        "small_tokens": ns,
        "large_tokens": nl,
        "switches": int(np.sum(switches)),
        "catchup_tokens_small": cs,
        "catchup_tokens_large": cl,
        "small_calls": fs,
        "large_calls": fl,
        "cost": cost_ratio(ns, nl, small_params, large_params),
        "cost_with_catchup": cost_ratio(ns, nl, small_params, large_params, cs, cl),
        "cost_calls": cost_ratio(ns, nl, small_params, large_params, fs - ns, fl - nl),
        "params_small": int(small_params),
        "params_large": int(large_params),
        "small_tokens_per_row": [int(x) for x in small_tokens],
        "large_tokens_per_row": [int(x) for x in large_tokens],
        "catchup_small_per_row": [int(x) for x in small_catchup],
        "catchup_large_per_row": [int(x) for x in large_catchup],
        "small_calls_per_row": [int(x) for x in small_calls],
        "large_calls_per_row": [int(x) for x in large_calls],
        "switches_per_row": [int(x) for x in switches],
    }
    if small_forwards is not None:
        d["small_forwards"] = int(small_forwards)
        d["large_forwards"] = int(large_forwards)
    return d
