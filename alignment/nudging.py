"""Nudging: a small aligned model steers an unaligned base model where the base is unsure.

Fei, Razeghi and Singh, "Nudging: Inference-time Alignment of LLMs via Guided Decoding",
ACL 2025 (arXiv:2410.09300). Alignment mostly changes a model's few *stylistic* tokens, and a
base model is uncertain exactly there; so the base writes the answer and a small aligned
(instruct) model inserts a few "nudging" words whenever the base's top-1 probability falls
below gamma. The two models may have different tokenizers and prompt formats: they exchange
*text*, and each renders the shared answer in its own format and tokenizes it itself.

One round (`nudge`):
  1. propose: the aligned model greedily writes a chunk (`chunk`=16 tokens) continuing the
     answer; the chunk is split into words with their leading whitespace (`split_words`).
  2. accept: the first word is always a nudge. Word i >= 1 starts where the base takes over
     if, after `answer + words[:i]`, the base is confident again (top-1 probability >= gamma)
     or word i begins with the base's own top token (token bytes compared, leading-space
     markers `Ġ`/`▁` normalised: `alignment.text.TokenBytes`). The nudge is `words[:i]`.
  3. continue: the base writes greedily, its first token unconditionally, and stops just
     before the first token whose top-1 probability is below gamma; control returns to 1.
Limits: `max_tokens` (512) tokens in all, `max_rounds` (150) rounds; generation also stops on
EOS / end-of-turn of either model, on repeated nudges and at optional stop strings.

Choices the paper leaves open (the authors' reference code, fywalter/nudging, decides most;
where it does, it is followed):
  * Uncertainty is the top-1 probability of the base's raw next-token distribution (no
    temperature); both models decode greedily, as in the paper's experiments.
  * Words are split at every whitespace character (the reference splits at spaces only, so
    "step.\\n\\nThen" is one word there, two here); leading whitespace stays with its word.
  * The chunk's last word is never checked nor accepted unless it is the only word: the
    chunk may end inside it. If no boundary passes, the nudge is every word but the last and
    the base does not write in that round (reference code).
  * The base continues in blocks of `chunk` tokens; a block whose text has more than
    `repeat_words` (5) space-separated words and already occurs in the answer is dropped and
    control returns to the aligned model (the reference's repetition check).
  * A chunk in which the aligned model reaches EOS / end-of-turn is accepted whole and
    generation ends (reference code). A base EOS ends generation when the base is confident
    in it (or it is the base's first token); an unconfident EOS hands control back.
  * Repeated nudges: generation stops when a nudge equals the previous one for the
    `repeat_nudges`-th (3rd) time in a row, before it is added (reference code).
  * Tokens are counted in each author's own tokenizer: the aligned model's chunk tokens that
    cover its accepted words, and the base's committed tokens (the reference counts the
    output with GPT-3.5's tokenizer). `max_tokens` bounds their sum; the aligned chunk and the
    base's blocks are shortened so the sum never exceeds it.
  * Prompt formats (`Prompts`): the base sees `base.format(question=...) + answer`, by default
    "Question: {question}\\nAnswer: " (the paper's question/answer style; the trailing space
    joins the first word, so "Answer: To" tokenizes as running text does). The aligned model
    sees its chat template (optional system message, the user turn, the generation prompt)
    followed by the answer: the assistant's turn continued, never closed. The answer never
    starts with whitespace (the first nudge is left-stripped).
  * Stop strings (`stop=`) cut the answer just before the first occurrence.
  * No half characters are exchanged: a base run is shortened to end on a whole character,
    and a lone chunk word cut inside one loses the partial character.
  * Each model's cache has a fixed capacity per call (a power of two covering its prompt and
    twice `max_tokens`); a view that no longer fits stops generation ("context_full").
  * The text is not post-processed; the reference strips repeated suffixes from nudged
    answers, and `alignment.text.trim_repetition` does that for callers that want it (the
    experiment applies it to every system alike).

Structure. The round loop is Python on the host: it works on text, and what it does next
depends on words, token strings and probabilities read back each round. The per-model work is
jitted with static shapes: `_extend` (prefill / score a block of new tokens, right-padded to a
power-of-two bucket, returning each position's top-1 token and probability) and `_greedy` (a
`lax.while_loop` writing up to `chunk` tokens, stopping on EOS, on a limit, or - for the base -
before a token under gamma). Rounds reuse the compiled programs: shapes depend only on the
bucket, `chunk` and the cache capacity (a power of two fixed per call).

KV caches are kept between queries and rolled back (`KVCache.truncate`): each model's session
remembers the token ids in its cache, tokenizes its new view of the text, keeps the longest
common prefix and runs only the rest. That is exact - a model's keys and values at a position
depend only on the tokens before it - so it gives the text that re-encoding the whole view for
every query gives (`Nudging(reuse_cache=False)`, the slow path kept for tests; up to float
rounding, since blocks of tokens run together or apart). It holds for any pair of tokenizers:
the fast path is not limited to a shared tokenizer, where the re-tokenized answer mostly equals
the ids already cached and a round costs a truncation plus the new tokens. Candidate
boundaries are scored in one forward over the longest candidate; a candidate whose
tokenization is not a prefix of it gets its own (rolled-back) forward.

Legend: T new tokens in one call (bucketed), S cache capacity, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding.arguments import check_model, check_options
from decoding.generation import default_eos_ids
from decoding.model import Model, forward
from decoding.options import Options
from decoding.shapes import bucket

from .text import TokenBytes, continuation_offsets, decode_continuation, split_words

MAX_BLOCK = 512  # longest run of tokens one `_extend` call takes (longer prompts take several)
MIN_BUCKET = 16
MIN_CAPACITY = 512  # cache slots: calls with short prompts and budgets share compiled programs
ALIGNED, BASE = "aligned", "base"
STOP_REASONS = ("aligned_eos", "base_eos", "max_tokens", "max_rounds", "repeated_nudges", "stop",
                "aligned_empty", "context_full")


@dataclasses.dataclass(frozen=True)
class Nudging:
    """Settings of nudging (defaults: the paper's).

    gamma: the base is confident when its top-1 probability is >= gamma. 0 lets the base write
      everything after the first nudge; a value above 1 hands control back after every base
      token. chunk: tokens the aligned model proposes per round (also the base's block size).
    max_tokens: tokens of both models together. max_rounds: aligned-model proposals.
    repeat_nudges: stop when a nudge repeats this many more times in a row (0: never).
    repeat_words: drop a base block of more than this many words already in the answer
      (None: never). reuse_cache: keep and roll back KV caches (False re-encodes every query).
    """

    gamma: float = 0.3
    chunk: int = 16
    max_tokens: int = 512
    max_rounds: int = 150
    repeat_nudges: int = 3
    repeat_words: int | None = 5
    reuse_cache: bool = True

    def __post_init__(self):
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0 (a top-1 probability threshold; > 1 means never "
                             f"confident), got {self.gamma}.")
        for name in ("chunk", "max_tokens", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.repeat_nudges < 0:
            raise ValueError(f"repeat_nudges must be >= 0 (0 disables the guard), got {self.repeat_nudges}.")
        if self.repeat_words is not None and self.repeat_words < 0:
            raise ValueError(f"repeat_words must be >= 0 or None (no guard), got {self.repeat_words}.")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """How each model sees the question and the answer written so far.

    base: format string of `question`; the base model's view is it followed by the answer.
    system: system message of the aligned model's chat (None: its template's default).
    user: format string of `question` for the aligned model's user turn.
    """

    base: str = "Question: {question}\nAnswer: "
    system: str | None = None
    user: str = "{question}"

    def base_prefix(self, question: str) -> str:
        return self.base.format(question=question)

    def aligned_prefix(self, tokenizer, question: str) -> str:
        """The chat up to the assistant's (open) turn, as text."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the aligned model's tokenizer has no chat template: nudging steers with an instruct "
                "model in its chat format. Load an instruct checkpoint, or set tokenizer.chat_template."
            )
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": self.user.format(question=question)})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of the answer: who wrote it, its text, how many of its author's tokens, in
    which round."""

    author: str
    text: str
    tokens: int
    round: int


@dataclasses.dataclass
class NudgeResult:
    """The answer, how it was written and why it stopped (`stop_reason` in STOP_REASONS).

    handoffs: rounds in which control passed to the base model (it may then write nothing: a
    confident EOS, or a first block dropped as a repetition). calls / forwarded: jitted model
    calls and tokens run through each model (prefills and re-runs after rollbacks included).
    """

    text: str
    segments: list
    rounds: int
    handoffs: int
    stop_reason: str
    seconds: float = 0.0
    calls: dict = dataclasses.field(default_factory=dict)
    forwarded: dict = dataclasses.field(default_factory=dict)

    def _sum(self, author: str, what: str) -> int:
        return sum(len(s.text) if what == "chars" else s.tokens for s in self.segments if s.author == author)

    @property
    def aligned_tokens(self) -> int:
        return self._sum(ALIGNED, "tokens")

    @property
    def base_tokens(self) -> int:
        return self._sum(BASE, "tokens")

    @property
    def aligned_token_fraction(self) -> float:
        """Tokens written by the aligned model / all tokens (each in its author's tokenizer)."""
        total = self.aligned_tokens + self.base_tokens
        return self.aligned_tokens / total if total else 0.0

    @property
    def aligned_char_fraction(self) -> float:
        total = len(self.text)
        return self._sum(ALIGNED, "chars") / total if total else 0.0

    @property
    def aligned_word_fraction(self) -> float:
        """Words of the answer whose first non-space character the aligned model wrote."""
        owner = "".join(("a" if s.author == ALIGNED else "b") * len(s.text) for s in self.segments)
        pos, aligned, words = 0, 0, split_words(self.text)
        for w in words:
            core = len(w) - len(w.lstrip())
            if core < len(w) and owner[pos + core] == "a":
                aligned += 1
            pos += len(w)
        counted = sum(1 for w in words if w.strip())
        return aligned / counted if counted else 0.0

    def stats(self) -> dict:
        return {
            "rounds": self.rounds, "handoffs": self.handoffs, "stop_reason": self.stop_reason,
            "aligned_tokens": self.aligned_tokens, "base_tokens": self.base_tokens,
            "aligned_token_fraction": self.aligned_token_fraction,
            "aligned_word_fraction": self.aligned_word_fraction,
            "aligned_char_fraction": self.aligned_char_fraction,
            "seconds": self.seconds, "calls": dict(self.calls), "forwarded": dict(self.forwarded),
        }


# ------------------------------------------------------------------------------------------
# Jitted per-model work
# ------------------------------------------------------------------------------------------


def _top1(logits: jax.Array):
    """logits [..., V] -> (top-1 ids int32[...], their probabilities float32[...])."""
    logits = logits.astype(jnp.float32)
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jnp.exp(jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1))
    return ids, probs


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _extend(config, params, cache, tokens, start, count, options):
    """Run `tokens: int32[1, T]` (the first `count` real, the rest padding) at positions
    `start...`, after the first `start` cached slots. Returns the top-1 id and probability
    after each position (int32[T], float32[T]) and the cache holding `start + count` slots.
    `options`: `decoding.Options` (resolved), a static key of the compiled program."""
    t = tokens.shape[1]
    cache = cache.truncate(jnp.reshape(start, (1,)))
    positions = (start + jnp.arange(t, dtype=jnp.int32))[None, :]
    out = forward(config, params, tokens, positions, cache, options=options)
    ids, probs = _top1(out.logits[0])
    return ids, probs, out.cache.truncate(jnp.reshape(start + count, (1,)))


@functools.partial(jax.jit, static_argnums=(0, 3, 9), donate_argnums=(2,))
def _greedy(config, params, cache, block, start, first, gamma, limit, eos, options):
    """Greedy writing after `start` cached slots: commit `first` (accepted by the caller), then
    each next top-1 token while its probability is >= gamma, it is not in `eos: int32[E]` and
    fewer than `limit` (<= block) tokens are written.

    Returns tokens int32[block], the top-1 id / probability after each of them (int32[block],
    float32[block]), the number written and the cache holding `start + count` slots. The token
    that stopped the loop is not written: it is the last returned top-1.
    `options` as in `_extend`.
    """

    def cond(s):
        return ~s[-1]

    def body(s):
        i, tok, cache, toks, nids, nprobs, _ = s
        pos = jnp.reshape(start + i, (1, 1))
        out = forward(config, params, jnp.reshape(tok, (1, 1)), pos, cache, options=options)
        nid, nprob = _top1(out.logits[0, 0])
        toks, nids, nprobs = toks.at[i].set(tok), nids.at[i].set(nid), nprobs.at[i].set(nprob)
        done = (nprob < gamma) | jnp.any(nid == eos) | (i + 1 >= limit)
        return i + 1, nid, out.cache, toks, nids, nprobs, done

    init = (jnp.int32(0), jnp.asarray(first, jnp.int32), cache.truncate(jnp.reshape(start, (1,))),
            jnp.zeros((block,), jnp.int32), jnp.zeros((block,), jnp.int32), jnp.zeros((block,), jnp.float32),
            jnp.asarray(False))
    count, _, cache, toks, nids, nprobs, _ = jax.lax.while_loop(cond, body, init)
    return toks, nids, nprobs, count, cache


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _ContextFull(Exception):
    """A model's view of the text no longer fits its cache."""


class _Session:
    """One model's view of the shared text: a KV cache holding `ids` (the model's own
    tokenization of `prefix + answer`) and the top-1 token / probability after each of them."""

    def __init__(self, model: Model, prefix: str, *, add_special: bool, reuse: bool, capacity: int, block: int,
                 options: Options | None = None):
        self.model, self.tokenizer, self.prefix = model, model.tokenizer, prefix
        self.options = (options or Options()).resolved()
        self.add_special, self.reuse, self.capacity, self.block = add_special, reuse, capacity, block
        self.cache = model.init_cache(1, capacity)
        self.ids: list[int] = []
        self.top_ids: list[int] = []
        self.top_probs: list[float] = []
        self.eos = frozenset(default_eos_ids(self.tokenizer))
        self._eos = jnp.asarray(sorted(self.eos) or [-1], jnp.int32)
        self.bytes = TokenBytes(self.tokenizer)
        self.calls = 0
        self.forwarded = 0

    def encode(self, answers: Sequence[str]) -> list[list[int]]:
        """The model's token ids of `prefix + answer` for each answer (one batched call)."""
        enc = self.tokenizer([self.prefix + a for a in answers], add_special_tokens=self.add_special)
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def _keep(self, n: int) -> None:
        del self.ids[n:], self.top_ids[n:], self.top_probs[n:]

    def sync(self, ids: Sequence[int]) -> None:
        """Make the cache hold exactly `ids`: keep the common prefix, run the rest."""
        if len(ids) + 1 > self.capacity:
            raise _ContextFull(f"{len(ids)} tokens do not fit a cache of {self.capacity}")
        keep = _common_prefix(self.ids, ids) if self.reuse else 0
        self._keep(keep)
        cfg, params = self.model.config, self.model.params
        while keep < len(ids):
            n = min(len(ids) - keep, MAX_BLOCK)
            buf = np.zeros((1, bucket(n, MIN_BUCKET)), np.int32)
            buf[0, :n] = ids[keep:keep + n]
            top, prob, self.cache = _extend(cfg, params, self.cache, buf, np.int32(keep), np.int32(n),
                                            self.options)
            self.ids.extend(int(t) for t in ids[keep:keep + n])
            self.top_ids.extend(np.asarray(top)[:n].tolist())
            self.top_probs.extend(np.asarray(prob)[:n].tolist())
            self.calls += 1
            self.forwarded += n
            keep += n

    def top_after(self, ids: Sequence[int]) -> tuple[int, float]:
        """Top-1 token and probability after `ids` (runs the model unless cached)."""
        n = len(ids)
        if not self.reuse or n > len(self.ids) or self.ids[:n] != list(ids):
            self.sync(ids)
        return self.top_ids[n - 1], self.top_probs[n - 1]

    def pending(self) -> tuple[int, float]:
        """Top-1 token and probability after everything cached."""
        return self.top_ids[-1], self.top_probs[-1]

    def greedy(self, first: int, gamma: float, limit: int) -> list[int]:
        """Write `first` and continue greedily (see `_greedy`); returns the tokens written."""
        start = len(self.ids)
        limit = min(limit, self.block, self.capacity - start - 1)
        if limit < 1:
            raise _ContextFull(f"no room left after {start} tokens in a cache of {self.capacity}")
        toks, nids, nprobs, count, self.cache = _greedy(
            self.model.config, self.model.params, self.cache, self.block, np.int32(start), np.int32(first),
            np.float32(gamma), np.int32(limit), self._eos, self.options)
        count = int(count)
        new = np.asarray(toks)[:count].tolist()
        self.ids.extend(new)
        self.top_ids.extend(np.asarray(nids)[:count].tolist())
        self.top_probs.extend(np.asarray(nprobs)[:count].tolist())
        self.calls += 1
        self.forwarded += count
        return new

    def text(self, start: int, new: Sequence[int]) -> str:
        """Text of `new`, written after the first `start` cached ids."""
        return decode_continuation(self.tokenizer, self.ids[:start], new)


def _capacity(model: Model, prompt_len: int, config: Nudging) -> int:
    """Cache slots for one call: a power of two covering the prompt, twice the token budget
    (the other model's text may take more of this model's tokens) and some slack."""
    need = prompt_len + 2 * config.max_tokens + 4 * config.chunk + 2
    cap = MIN_CAPACITY
    while cap < need:
        cap *= 2
    limit = model.config.max_position_embeddings
    if cap > limit:
        if prompt_len + 2 * config.chunk + 2 > limit:
            raise ValueError(f"the prompt takes {prompt_len} tokens of {model.source or 'a model'} whose context "
                             f"is {limit}: shorten the question or the prompt format.")
        cap = limit
    return cap


def _check(base: Model, aligned: Model, question, config, prompts, stop, options) -> None:
    for role, m in (("base", base), ("aligned", aligned)):
        check_model(m, role)
        if m.tokenizer is None:
            raise ValueError(f"the {role} model has no tokenizer: nudging exchanges text between the models, "
                             "so load both with tokenizer=True (or attach a transformers tokenizer).")
    if not isinstance(question, str):
        raise TypeError(f"question must be a string (one question; call nudge once per question), "
                        f"got {type(question).__name__}.")
    if not question.strip():
        raise ValueError("question is empty: give the text of the question to answer.")
    if not isinstance(config, Nudging):
        raise TypeError(f"config must be an alignment.Nudging(...), got {type(config).__name__}.")
    if not isinstance(prompts, Prompts):
        raise TypeError(f"prompts must be an alignment.Prompts(...), got {type(prompts).__name__}.")
    if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
        raise TypeError(f"stop must be a list of non-empty strings, got {stop!r}.")
    check_options(options)


class _Answer:
    """The shared answer text and its segments."""

    def __init__(self, stop: Sequence[str]):
        self.text = ""
        self.segments: list[Segment] = []
        self.stop = tuple(stop)

    def add(self, author: str, text: str, tokens: int, round_: int, tokenizer) -> bool:
        """Append a segment; returns True when a stop string now occurs (the text is cut before it)."""
        if not text:
            return False
        before = len(self.text)
        self.text += text
        self.segments.append(Segment(author, text, tokens, round_))
        hits = [self.text.find(s, max(0, before - len(s) + 1)) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return False
        self._cut(min(hits), tokenizer)
        return True

    def _cut(self, at: int, tokenizer) -> None:
        self.text = self.text[:at]
        kept, pos = [], 0
        for s in self.segments:
            if pos + len(s.text) <= at:
                kept.append(s)
            elif pos < at:  # the cut segment's tokens: its kept text, re-tokenized
                text = s.text[: at - pos]
                kept.append(Segment(s.author, text, len(tokenizer.encode(text, add_special_tokens=False)), s.round))
            pos += len(s.text)
        self.segments = kept


def nudge(base: Model, aligned: Model, question: str, config: Nudging = Nudging(),
          prompts: Prompts = Prompts(), stop: Sequence[str] = (), options: Options | None = None) -> NudgeResult:
    """Answer `question` with `base` nudged by `aligned` (see the module docstring).

    base, aligned: `decoding.Model`s with tokenizers (any two; the aligned one needs a chat
      template). question: a non-empty string. config: `Nudging`; prompts: `Prompts`.
    stop: strings that end the answer (it is cut just before the first one).
    options: `decoding.Options` (or None) of both models' compiled programs.
    """
    _check(base, aligned, question, config, prompts, stop, options)
    t0 = time.perf_counter()
    gamma = float(config.gamma)
    base_prefix = prompts.base_prefix(question)
    aligned_prefix = prompts.aligned_prefix(aligned.tokenizer, question)
    sessions = {}
    for role, model, prefix, special in ((BASE, base, base_prefix, True), (ALIGNED, aligned, aligned_prefix, False)):
        probe = model.tokenizer([prefix], add_special_tokens=special)["input_ids"][0]
        sessions[role] = _Session(model, prefix, add_special=special, reuse=config.reuse_cache,
                                  capacity=_capacity(model, len(probe), config), block=config.chunk,
                                  options=options)
    b, a = sessions[BASE], sessions[ALIGNED]
    answer = _Answer(stop)
    used = rounds = handoffs = repeats = 0
    last_nudge = None
    reason = None
    try:
        while reason is None:
            if rounds >= config.max_rounds:
                reason = "max_rounds"
                break
            if used >= config.max_tokens:
                reason = "max_tokens"
                break
            rounds += 1

            # 1. propose: the aligned model writes a chunk.
            a.sync(a.encode([answer.text])[0])
            start = len(a.ids)
            first, _ = a.pending()
            chunk = [] if first in a.eos else a.greedy(first, -1.0, min(config.chunk, config.max_tokens - used))
            ended = a.pending()[0] in a.eos
            offsets = continuation_offsets(a.tokenizer, a.ids[:start], chunk)
            text = a.text(start, chunk)
            lead = 0 if answer.text else len(text) - len(text.lstrip())
            text = text[lead:]
            if ended:
                answer.add(ALIGNED, text, len(chunk), rounds, a.tokenizer)
                reason = "aligned_eos"
                break
            words = split_words(text)
            if not words:
                reason = "aligned_empty"
                break

            # 2. accept: find the first word boundary where the base takes over.
            k, found, cands = (len(words) - 1 if len(words) > 1 else 1), False, []
            if len(words) > 1:
                cands = b.encode([answer.text + "".join(words[:i]) for i in range(1, len(words))])
                if config.reuse_cache:
                    b.sync(cands[-1])
                for i in range(1, len(words)):
                    top, prob = b.top_after(cands[i - 1])
                    if prob >= gamma or b.bytes.starts(words[i], top):
                        k, found = i, True
                        break
            nudge_text = "".join(words[:k])
            if len(words) == 1:  # the chunk stopped inside its only word, maybe inside a character
                nudge_text = nudge_text.rstrip("\ufffd")
                if not nudge_text:
                    reason = "aligned_empty"
                    break
            if nudge_text == last_nudge:
                repeats += 1
                if config.repeat_nudges and repeats >= config.repeat_nudges:
                    reason = "repeated_nudges"
                    break
            else:
                last_nudge, repeats = nudge_text, 0
            covered = lead + len(nudge_text)
            n_tokens = next((j for j, off in enumerate(offsets) if off >= covered), len(chunk))
            used += n_tokens
            if answer.add(ALIGNED, nudge_text, n_tokens, rounds, a.tokenizer):
                reason = "stop"
                break
            if not found:
                continue

            # 3. continue: the base writes until it is unsure again.
            handoffs += 1
            b.sync(cands[k - 1])
            start = len(b.ids)
            run: list[int] = []
            top, prob = b.pending()
            while True:
                if run and prob < gamma:
                    break
                if top in b.eos:
                    reason = "base_eos"
                    break
                limit = config.max_tokens - used - len(run)
                if limit < 1:
                    break
                block = b.greedy(top, gamma, min(limit, config.chunk))
                if config.repeat_words is not None:
                    piece = b.text(len(b.ids) - len(block), block)
                    if len(piece.split(" ")) > config.repeat_words and piece in answer.text + b.text(start, run):
                        break
                run.extend(block)
                top, prob = b.pending()
            text = b.text(start, run)
            while run and text.endswith("\ufffd"):  # never hand over half a character
                run.pop()
                text = b.text(start, run)
            used += len(run)
            if answer.add(BASE, text, len(run), rounds, b.tokenizer):
                reason = "stop"
    except _ContextFull:
        reason = "context_full"
    return NudgeResult(
        text=answer.text, segments=answer.segments, rounds=rounds, handoffs=handoffs, stop_reason=reason,
        seconds=time.perf_counter() - t0, calls={BASE: b.calls, ALIGNED: a.calls},
        forwarded={BASE: b.forwarded, ALIGNED: a.forwarded},
    )
