"""`generate` and `stream`: the user's entry points, over every decoding strategy.

The host does what must happen outside the compiled program — checking the arguments,
tokenising (chat template applied), bucketing prompt lengths so that calls of similar shapes
share one compiled program, choosing the cache capacity (`prepare`) — then runs the strategy's
whole generation as one jitted `while_loop` (`decoding.driver.run`; `compiled` keeps the
compile cache), and finally turns tokens back into text, cutting at stop strings exactly
(`finish`). `stream` runs the same `step` from Python (`decoding.driver.stream`).

Compilation is ahead-of-time (`jit(...).lower(...).compile()`) and memoised per (strategy,
static settings, shapes), so compile time is reported apart from run time and a repeated call
with the same shapes never recompiles.

Stop strings: inside the loop a row stops when the token sequence of a stop string (as the
tokenizer encodes it, with and without a leading space) appears; on the host the text is cut
at the first occurrence of the stop string itself, whatever its tokenisation, and the tokens
are cut to the shortest prefix whose text contains it.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import driver, shapes
from .arguments import check_model, check_options, check_positive_int, check_strategy, prompt_list
from .autoregressive import Autoregressive
from .model import Model
from .options import Options
from .sampling import Greedy, Sampling
from .strategy import Context
from .tokens import StopRule

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


@dataclasses.dataclass
class Stats:
    """What one `generate` call did. Times in seconds; `tau` counts the bonus token."""

    strategy: str
    batch_size: int
    new_tokens: int  # all rows together
    tokens_per_row: list
    target_forwards: int  # batched target calls, prefill included
    compile_s: float
    run_s: float
    extra: dict = dataclasses.field(default_factory=dict)
    #: each row's target calls while it was still generating, prefill included: a row's own
    #: tokens per call is tokens_per_row[b] / forwards_per_row[b] (1.00 for autoregressive),
    #: where the batch keeps calling the target for rows that have not finished yet
    forwards_per_row: list = dataclasses.field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.run_s if self.run_s > 0 else float("nan")

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward over rows (1.00 for autoregressive)."""
        return float(self.extra.get("tau", 1.0))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(tokens_per_s=self.tokens_per_s, tau=self.tau)
        return d

    def summary(self) -> str:
        s = (f"{self.strategy}: {self.new_tokens} tokens in {self.run_s:.3f} s "
             f"({self.tokens_per_s:.1f} tok/s, batch {self.batch_size}), "
             f"{self.target_forwards} target forwards, tau {self.tau:.2f}, compile {self.compile_s:.1f} s")
        for k, v in self.extra.items():
            if k != "tau" and not isinstance(v, (list, dict)):
                s += f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}"
        return s


@dataclasses.dataclass
class Result:
    texts: list
    tokens: list
    stats: Stats
    prompt_tokens: list = dataclasses.field(default_factory=list)


_COMPILED: dict = {}


def compile_count() -> int:
    """Number of distinct programs compiled by `generate` so far (for tests and reports)."""
    return len(_COMPILED)


def clear_compiled() -> None:
    """Drop every program `generate` compiled (and jax's own caches), freeing their memory; later
    calls compile again. For long processes that run many differently shaped programs (a test
    suite, a sweep): each compiled CPU program holds memory maps until it is dropped."""
    _COMPILED.clear()
    jax.clear_caches()


def encode_prompts(tokenizer, prompts, chat) -> list[list[int]]:
    """Strings or token lists -> token lists (chat template applied when `chat`); the prompts
    are checked first (`decoding.arguments.prompt_list`)."""
    out = []
    for i, p in enumerate(prompt_list(prompts)):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: load the model with tokenizer=True or pass token ids.")
            use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
            if use_chat:
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError("chat=True but this tokenizer has no chat template (a base model?); pass chat=False.")
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer.encode(p, add_special_tokens=True)
            ids = [int(t) for t in ids]
        else:
            ids = p
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenisation: give at least one token.")
        out.append(ids)
    return out


def default_eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus any end-of-turn special token its vocabulary has."""
    if tokenizer is None:
        return ()
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab and t in getattr(tokenizer, "all_special_tokens", [t]):
            ids.add(int(vocab[t]))
    return tuple(sorted(ids))


def _stop_sequences(tokenizer, stop: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    seqs = set()
    for s in stop:
        if not s:
            raise ValueError("stop strings must be non-empty.")
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer.")
        for variant in (s, " " + s):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids:
                seqs.add(tuple(int(t) for t in ids))
    return tuple(sorted(seqs))


def _cut_at_stop(tokenizer, tokens: list[int], text: str, stop: Sequence[str]):
    cut = min((text.find(s) + len(s) for s in stop if s in text), default=None)
    if cut is None:
        return tokens, text
    text = text[:cut]
    for n in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:n], skip_special_tokens=True) for s in stop):
            return tokens[:n], text
    return tokens, text


@dataclasses.dataclass
class Prepared:
    """One call's inputs, checked and laid out for the compiled program (`prepare`)."""

    strategy: object
    ctx: Context
    params: dict
    prompt: np.ndarray  # int32[B, P], right-padded to the prompt bucket
    lengths: np.ndarray  # int32[B]
    key: jax.Array
    ids: list  # each row's prompt token ids
    stop: tuple  # stop strings
    tokenizer: object
    layout: object = None  # decoding.sharding.Layout of a sharded target, else None


def prepare(model: Model, prompts, *, strategy=None, sampling=None, max_new_tokens: int = 128, seed: int = 0,
            stop: Sequence[str] | str = (), eos_token_id=None, chat: bool | None = None,
            max_cache_len: int | None = None, draft: Model | None = None, prompt_bucket: int | None = None,
            options: Options | None = None) -> Prepared:
    """Check `generate`'s arguments and lay them out for the compiled program (tokenised,
    padded prompts, the static `Context`, the params pytree). `generate`, `stream` and the
    phase profiler (`decoding.profiling`) start from it."""
    check_model(model)
    check_strategy(strategy)
    check_model(draft, "draft", optional=True)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_options(options)
    strategy = strategy or Autoregressive()
    sampling = sampling if sampling is not None else Greedy()
    if not isinstance(sampling, (Greedy, Sampling)):
        raise TypeError(f"sampling must be decoding.Greedy() or decoding.Sampling(...), got {sampling!r}.")
    max_new_tokens = int(max_new_tokens)
    tok = model.tokenizer
    ids = encode_prompts(tok, prompts, chat)
    vocab = model.config.vocab_size
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
    stop = tuple([stop] if isinstance(stop, str) else (stop or ()))
    if eos_token_id is None:
        eos = default_eos_ids(tok)
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    rule = StopRule(eos_ids=eos, stop_sequences=_stop_sequences(tok, stop))
    limit = max_cache_len or model.config.max_position_embeddings
    longest = max(len(p) for p in ids)
    slack = int(strategy.cache_slack)
    if longest + max_new_tokens + slack > limit:
        raise ValueError(
            f"prompt too long for the cache: the longest prompt has {longest} tokens, plus "
            f"max_new_tokens={max_new_tokens} and {slack} slot(s) of {strategy.name} lookahead makes "
            f"{longest + max_new_tokens + slack} > {limit} (the model's context / max_cache_len). "
            "Shorten the prompt, lower max_new_tokens, or raise max_cache_len if the model allows."
        )
    bucket = shapes.prompt_bucket(longest)
    if prompt_bucket:
        bucket = max(bucket, int(prompt_bucket))
    capacity = shapes.round_up(bucket + max_new_tokens + slack, 128)
    prompt = np.zeros((len(ids), bucket), np.int32)
    for i, p in enumerate(ids):
        prompt[i, : len(p)] = p
    lengths = np.array([len(p) for p in ids], np.int32)
    params = {"target": model.params}
    layout = getattr(model, "layout", None)
    draft_cfg = None
    if draft is not None:
        check_same_tokenizer(model, draft)
        draft_cfg = draft.config
        params["draft"] = sharded_draft_params(layout, draft)
    options = (options or Options()).resolved()
    if layout is not None:
        options = dataclasses.replace(options, layout=layout)
    ctx = Context(target=model.config, sampling=sampling, rule=rule, max_new_tokens=max_new_tokens,
                  capacity=capacity, draft=draft_cfg, options=options)
    if hasattr(strategy, "validate"):
        strategy.validate(ctx, draft)
    if hasattr(strategy, "split_runtime"):
        # Settings a strategy reads as traced values (e.g. EAD's threshold) travel in the params
        # pytree, and the static strategy used as the compile key has them canonicalised, so a
        # sweep over such a setting reuses one compiled program.
        strategy, runtime = strategy.split_runtime()
        params["runtime"] = {k: jnp.asarray(v, jnp.float32) for k, v in runtime.items()}
    return Prepared(strategy, ctx, params, prompt, lengths, jax.random.PRNGKey(seed), ids, stop, tok, layout)


def sharded_draft_params(layout, draft: Model):
    """The draft's parameters as the compiled program takes them: as they are on one device; on
    the target's mesh when the target is sharded (replicated there unless the draft was
    sharded on that mesh itself, `decoding.shard(draft, mesh, rules)`)."""
    draft_layout = getattr(draft, "layout", None)
    if layout is None:
        if draft_layout is not None:
            raise ValueError("the draft is sharded (draft.layout is set) but the target is not: shard the target "
                             "on the same mesh too (decoding.shard(model, mesh)).")
        return draft.params
    if draft_layout is not None:
        if draft_layout.mesh != layout.mesh:
            raise ValueError("the draft is sharded on another mesh than the target's: shard both on one mesh.")
        return draft.params
    from .sharding import replicate

    return replicate(draft.params, layout.mesh)


def check_same_tokenizer(target: Model, draft: Model) -> None:
    """Token-level verification needs one vocabulary: refuse a draft whose tokenizer differs."""
    problems = []
    if target.config.vocab_size != draft.config.vocab_size:
        problems.append(f"vocab sizes {target.config.vocab_size} vs {draft.config.vocab_size}")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None:
        tv, dv = tt.get_vocab(), dt.get_vocab()
        if tv != dv:
            diff = len(set(tv.items()) ^ set(dv.items()))
            problems.append(f"token-to-id maps differ ({diff} entries)")
        elif tt.eos_token_id != dt.eos_token_id:
            problems.append(f"EOS ids {tt.eos_token_id} vs {dt.eos_token_id}")
    if problems:
        raise ValueError(
            "draft and target tokenizers differ: " + "; ".join(problems) + ". Strategies that put both "
            "models' token ids into one sequence (speculative, tree and entropy-adaptive decoding) need "
            "the draft to share the target's tokenizer; for models with different tokenizers use "
            "text-level methods such as alignment.nudging."
        )


def _whole(strategy, ctx, params, prompt, lengths, key):
    state = strategy.init(ctx, params, prompt, lengths, key)
    return driver.run(lambda s: strategy.step(ctx, params, s), state)


_whole_jit = jax.jit(_whole, static_argnums=(0, 1))


def _whole_sharded(strategy, ctx, layout, params, prompt, lengths, key):
    """`_whole` on a mesh: every KV cache in the state is held to the cache layout
    (`decoding.sharding.constrain_caches`), and the tokens come back replicated so that any
    process (process 0 in a multi-host run) can read the results."""
    from .sharding import constrain_caches, replicated_out

    state = constrain_caches(strategy.init(ctx, params, prompt, lengths, key), layout)
    state = driver.run(lambda s: constrain_caches(strategy.step(ctx, params, s), layout), state)
    return replicated_out(state, layout)


_whole_sharded_jit = jax.jit(_whole_sharded, static_argnums=(0, 1, 2))

def _signature(tree) -> tuple:
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(tree))


def _shardings(tree) -> tuple:
    return tuple(str(getattr(x, "sharding", None)) for x in jax.tree_util.tree_leaves(tree))


def compiled(prep: Prepared):
    """(The compiled whole-generation program for `prep`, seconds spent compiling it: 0.0 when
    a program of the same strategy, static settings and shapes was compiled before)."""
    options = prep.ctx.options.compiler_options()
    key = (prep.strategy, prep.ctx, prep.prompt.shape, _signature(prep.params),
           jax.tree_util.tree_structure(prep.params), tuple(sorted((options or {}).items())))
    if prep.layout is not None:
        key += (prep.layout, _shardings(prep.params))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    if prep.layout is None:
        lowered = _whole_jit.lower(prep.strategy, prep.ctx, prep.params, prep.prompt, prep.lengths, prep.key)
    else:
        lowered = _whole_sharded_jit.lower(prep.strategy, prep.ctx, prep.layout, prep.params, prep.prompt,
                                           prep.lengths, prep.key)
    try:
        exe = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as err:  # XLA's message for a bad value is terse: say where it came from
        if options and "xla_gpu_enable_command_buffer" in str(err):
            raise ValueError(f"Options.command_buffers = "
                             f"{prep.ctx.options.command_buffers!r} is not a valid xla_gpu_enable_command_buffer list: {err}. "
                             "Use '', 'while' or a comma-separated list of XLA's command buffer kinds.") from err
        raise
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


def finish(prep: Prepared, state, compile_s: float, run_s: float) -> Result:
    """The `Result` of a finished generation: texts (cut at stop strings), tokens and stats."""
    out = state.out
    toks = np.asarray(out.tokens)
    counts = np.asarray(out.count)
    steps = np.asarray(out.steps)
    tok = prep.tokenizer
    texts, rows = [], []
    for b in range(len(counts)):
        row = toks[b, : counts[b]].tolist()
        text = tok.decode(row, skip_special_tokens=True) if tok is not None else ""
        if prep.stop and tok is not None:
            row, text = _cut_at_stop(tok, row, text, prep.stop)
        rows.append(row)
        texts.append(text)
    extra = dict(prep.strategy.stats(state))
    extra.setdefault("tau", float(np.mean(counts / np.maximum(steps, 1))))
    stats = Stats(
        strategy=prep.strategy.name,
        batch_size=len(counts),
        new_tokens=int(counts.sum()),
        tokens_per_row=[int(c) for c in counts],
        target_forwards=int(steps.max()),
        compile_s=compile_s,
        run_s=run_s,
        extra=extra,
        forwards_per_row=[int(s) for s in steps],
    )
    return Result(texts=texts, tokens=rows, stats=stats, prompt_tokens=prep.ids)


def generate(
    model: Model,
    prompts,
    *,
    strategy=None,
    sampling=None,
    max_new_tokens: int = 128,
    seed: int = 0,
    stop: Sequence[str] | str = (),
    eos_token_id=None,
    chat: bool | None = None,
    max_cache_len: int | None = None,
    draft: Model | None = None,
    prompt_bucket: int | None = None,
    options: Options | None = None,
) -> Result:
    """Generate continuations of a batch of prompts with any strategy.

    model: a `decoding.Model`; draft: a `decoding.Model` or None (for strategies with a draft).
    prompts: a string, a list of strings, a list of token-id lists (ragged lengths are fine), or
      an integer numpy array (1-D: one prompt, 2-D: a batch); no prompt may be empty.
    strategy: `Autoregressive()` (default) or any strategy (`decoding.strategy.Strategy`).
    sampling: `Greedy()` (default) or `Sampling(temperature, top_k, top_p)`.
    chat: apply the tokenizer's chat template to string prompts (default: when it has one).
    eos_token_id: int or ids that end a row (default: the tokenizer's EOS and end-of-turn tokens;
      pass () to never stop early). stop: strings that end a row (the text is cut after them).
    prompt_bucket: pad prompts to at least this many tokens, so that batches of different prompt
      lengths share one compiled program (benchmarks over many prompts set it once).
    max_new_tokens: an int >= 1.
    options: `decoding.Options` or None (attention implementation, layer loop, command buffers):
      static switches of the compiled program, part of its compile key.
    Returns `Result(texts, tokens, stats)`; tokens include the EOS that ended a row, texts don't.
    `stats.new_tokens` counts the tokens generated, including any cut after a stop *string*.
    """
    prep = prepare(model, prompts, strategy=strategy, sampling=sampling, max_new_tokens=max_new_tokens,
                   seed=seed, stop=stop, eos_token_id=eos_token_id, chat=chat, max_cache_len=max_cache_len,
                   draft=draft, prompt_bucket=prompt_bucket, options=options)
    exe, compile_s = compiled(prep)
    t0 = time.perf_counter()
    state = exe(prep.params, prep.prompt, prep.lengths, prep.key)
    jax.block_until_ready(state.out.tokens)
    run_s = time.perf_counter() - t0
    if prep.layout is not None:  # each process reads its own copy of the replicated results
        from .sharding import local_view

        state = local_view(state)
    return finish(prep, state, compile_s, run_s)


_init_jit = jax.jit(lambda strategy, ctx, params, prompt, lengths, key: strategy.init(ctx, params, prompt, lengths, key),
                    static_argnums=(0, 1))
_step_jit = jax.jit(lambda strategy, ctx, params, state: strategy.step(ctx, params, state),
                    static_argnums=(0, 1), donate_argnums=(3,))


def stream(model: Model, prompts, **kwargs) -> Iterator[list[list[int]]]:
    """Like `generate` (the same keyword arguments, checked at the call), but yields each
    round's newly committed tokens per row from Python.

    Runs the same `init`/`step` functions as `generate` (jitted, state donated), one host sync
    per round: for debugging and interactive use. The generator's return value is the Result.
    """
    unknown = sorted(set(kwargs) - set(inspect.signature(prepare).parameters))
    if unknown:
        raise TypeError(f"stream: unexpected arguments {unknown}; it takes generate's keyword arguments "
                        f"(strategy, sampling, max_new_tokens, seed, stop, ..., options).")
    return _stream(prepare(model, prompts, **kwargs))


def _stream(prep: Prepared) -> Iterator[list[list[int]]]:
    t0 = time.perf_counter()
    state = _init_jit(prep.strategy, prep.ctx, prep.params, prep.prompt, prep.lengths, prep.key)
    counts = np.asarray(state.out.count)
    toks = np.asarray(state.out.tokens)
    yield [toks[b, : counts[b]].tolist() for b in range(len(counts))]
    step = lambda s: _step_jit(prep.strategy, prep.ctx, prep.params, s)  # noqa: E731
    for state, new in driver.stream(step, state):
        yield new
    return finish(prep, state, 0.0, time.perf_counter() - t0)
