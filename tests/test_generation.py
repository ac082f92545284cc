"""generate / stream / tokens.commit on a tiny random model (token-id prompts, CPU).

Compiled whole-generation programs are the expensive part here (seconds each on two cores),
so most tests share one model, one prompt batch and one `max_new_tokens`.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from decoding import Autoregressive, Options, Sampling, Speculative, generate, make_sampling, stream
from decoding.generation import compile_count
from decoding.tokens import StopRule, Tokens, commit
from tiny import compile_events, numpy_greedy, smollm_tokenizer, tiny_model

N = 10  # max_new_tokens shared by most tests (one compiled program)
_rng = np.random.RandomState(0)
PROMPTS = [_rng.randint(0, 96, size=n).tolist() for n in (1, 5, 13)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch_result(model):
    return generate(model, PROMPTS, max_new_tokens=N)


@pytest.fixture(scope="module")
def reference(model):
    """Naive greedy decoding of each prompt alone (full recompute each step, numpy)."""
    return [numpy_greedy(model.config, model.params, p, N) for p in PROMPTS]


def run_stream(gen):
    """Collect every round's new tokens and the generator's return value (the Result)."""
    rounds = []
    while True:
        try:
            rounds.append(next(gen))
        except StopIteration as stop:
            return rounds, stop.value


# ------------------------------------------------------------------------------------------
# Greedy correctness
# ------------------------------------------------------------------------------------------


def test_ragged_batch_equals_each_prompt_alone_and_the_naive_reference(model, batch_result, reference):
    assert batch_result.prompt_tokens == PROMPTS
    assert len(batch_result.tokens) == 3
    assert len({tuple(t) for t in batch_result.tokens}) == 3  # rows really differ
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=N)
        assert batch_result.tokens[b] == alone.tokens[0] == reference[b], b
    # A flat list of ints is one prompt.
    assert generate(model, PROMPTS[1], max_new_tokens=N).tokens == [reference[1]]


def test_numpy_token_ids_are_accepted_as_prompts(model, reference):
    """Token ids straight from numpy (a tokenizer's return_tensors="np", or list(array)) are
    prompts like any list of ints (currently: an ambiguous-truth-value ValueError and
    "'numpy.int64' object is not iterable")."""
    ids = np.asarray(PROMPTS[1], np.int64)
    assert generate(model, [ids], max_new_tokens=N).tokens == [reference[1]]  # already works
    assert generate(model, list(ids), max_new_tokens=N).tokens == [reference[1]]
    assert generate(model, ids, max_new_tokens=N).tokens == [reference[1]]
    assert generate(model, ids[None], max_new_tokens=N).tokens == [reference[1]]


def test_jax_arrays_and_tuples_are_accepted_as_prompts(model, reference):
    ids = jnp.asarray(PROMPTS[1], jnp.int32)
    assert generate(model, ids, max_new_tokens=N).tokens == [reference[1]]
    assert generate(model, [ids, tuple(PROMPTS[2])], max_new_tokens=N).tokens == reference[1:]


def test_max_new_tokens_respected_and_no_tokenizer_gives_empty_texts(batch_result):
    assert [len(t) for t in batch_result.tokens] == [N] * 3
    assert batch_result.texts == ["", "", ""]


def pick_eos(rows):
    """A token that first appears mid-way through row 0 and never in some other row."""
    for j in range(1, len(rows[0])):
        tok = rows[0][j]
        if tok in rows[0][:j]:
            continue
        if any(tok not in r for r in rows[1:]):
            return tok
    raise AssertionError(f"no usable EOS candidate in {rows}")


def cut_at(row, eos):
    return row[: row.index(eos) + 1] if eos in row else row


def test_eos_stops_only_its_row_and_is_kept(model, reference):
    eos = pick_eos(reference)
    res = generate(model, PROMPTS, max_new_tokens=N, eos_token_id=eos)
    want = [cut_at(r, eos) for r in reference]
    assert res.tokens == want
    assert res.tokens[0][-1] == eos and len(res.tokens[0]) < N
    assert any(len(t) == N and eos not in t for t in res.tokens[1:])  # another row ran on
    assert res.stats.tokens_per_row == [len(t) for t in want]


# ------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------


def test_second_call_with_same_shapes_does_not_compile(model, batch_result):
    before = compile_count()
    with compile_events() as events:
        again = generate(model, PROMPTS, max_new_tokens=N)
    assert events == [] and compile_count() == before
    assert again.stats.compile_s == 0.0
    assert again.tokens == batch_result.tokens


def test_prompts_of_other_lengths_in_the_same_bucket_reuse_the_program(model, batch_result, reference):
    other = [_rng.randint(0, 96, size=n).tolist() for n in (16, 2, 9)]
    before = compile_count()
    with compile_events() as events:
        res = generate(model, other, max_new_tokens=N)
    assert events == [] and compile_count() == before
    assert res.tokens == [numpy_greedy(model.config, model.params, p, N) for p in other]


def test_compile_count_does_not_depend_on_the_number_of_steps(model):
    """One program per shape, whatever the number of loop iterations: a 1-token generation
    (no loop iteration) and a 41-token one compile the same (a per-step compile would show)."""
    counts = []
    for max_new in (1, 41):
        before = compile_count()
        with compile_events() as events:
            res = generate(model, PROMPTS, max_new_tokens=max_new)
        assert compile_count() == before + 1
        assert res.stats.compile_s > 0
        assert [len(t) for t in res.tokens] == [max_new] * 3
        assert res.stats.target_forwards == max_new
        counts.append(len(events))
    assert counts[0] == counts[1] >= 1, counts


def test_a_program_traced_with_one_options_value_is_never_reused_for_another(model, batch_result):
    """`decoding.Options` is part of every compile key: each value that changes the traced
    program (the layer loop unrolled or a scan, the attention implementation) compiles its own
    programs, in `generate` and in `stream`; the same value again reuses them; the tokens do not
    change. On a CPU `Options()` resolves to the scan, so it shares `unroll_layers=False`'s."""
    def run_generate(options):
        return generate(model, PROMPTS, max_new_tokens=N, options=options).tokens

    def run_streamed(options):
        return run_stream(stream(model, PROMPTS, max_new_tokens=N, options=options))[1].tokens

    variants = (Options(unroll_layers=True), Options(attention="pallas"),
                Options(attention="pallas", unroll_layers=True))
    for run in (run_generate, run_streamed):
        assert run(Options()) == batch_result.tokens
        before = compile_count()
        with compile_events() as events:
            assert run(Options(unroll_layers=False)) == batch_result.tokens
        assert events == [] and compile_count() == before, run.__name__
        for options in variants:
            before = compile_count()
            with compile_events() as events:
                tokens = run(options)
            assert tokens == batch_result.tokens, (run.__name__, options)
            # generate: one whole-generation program; stream: its own init and step programs
            assert len(events) >= (1 if run is run_generate else 2), (run.__name__, options, events)
            assert compile_count() == before + (run is run_generate), (run.__name__, options)
            with compile_events() as events:
                assert run(options) == batch_result.tokens
            assert events == [], (run.__name__, options, events)


# ------------------------------------------------------------------------------------------
# stream
# ------------------------------------------------------------------------------------------


def test_stream_yields_the_same_tokens_as_generate(model, batch_result):
    gen = stream(model, PROMPTS, max_new_tokens=N)
    first = next(gen)  # prefill: one token per row
    assert [len(r) for r in first] == [1, 1, 1]
    second = next(gen)  # the step program compiles here
    with compile_events() as events:  # ... and never again for the remaining steps
        rounds, result = run_stream(gen)
    assert events == []
    rounds = [first, second] + rounds
    per_row = [sum((r[b] for r in rounds), []) for b in range(3)]
    assert per_row == batch_result.tokens
    assert result.tokens == batch_result.tokens
    assert result.stats.new_tokens == batch_result.stats.new_tokens
    # One round per target forward (prefill included): the definition of target_forwards.
    assert len(rounds) == result.stats.target_forwards == batch_result.stats.target_forwards


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_seeds_differ(model):
    s = Sampling(temperature=1.5)
    a = generate(model, PROMPTS, sampling=s, max_new_tokens=N, seed=1)
    b = generate(model, PROMPTS, sampling=s, max_new_tokens=N, seed=1)
    c = generate(model, PROMPTS, sampling=s, max_new_tokens=N, seed=2)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert all(0 <= t < 96 for row in a.tokens + c.tokens for t in row)
    assert [len(t) for t in a.tokens] == [N] * 3


# ------------------------------------------------------------------------------------------
# Stats
# ------------------------------------------------------------------------------------------


def test_stats_are_consistent(model, batch_result, reference):
    eos = pick_eos(reference)
    for res in (batch_result, generate(model, PROMPTS, max_new_tokens=N, eos_token_id=eos)):
        st = res.stats
        assert st.strategy == "autoregressive" and st.batch_size == 3
        assert st.tokens_per_row == [len(t) for t in res.tokens]
        assert st.new_tokens == sum(st.tokens_per_row)
        assert st.tau == 1.0  # one token per target forward, by definition
        # The prefill produces each row's first token; then one forward per further token,
        # until the longest row is done.
        assert st.target_forwards == max(st.tokens_per_row)
        # Each row counts only the calls made while it was generating: its own tau is 1.00
        # even when it stopped early and the batch went on for the others.
        assert st.forwards_per_row == st.tokens_per_row
        assert st.run_s > 0 and st.compile_s >= 0
        assert st.tokens_per_s == pytest.approx(st.new_tokens / st.run_s)
        d = st.as_dict()
        assert d["tau"] == 1.0 and d["new_tokens"] == st.new_tokens
        assert f"{st.new_tokens} tokens" in st.summary() and "tau 1.00" in st.summary()


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="no prompts given"):
        generate(model, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \[0, 96\): \[96, -1\]"):
        generate(model, [[3, 96, -1]])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, [[1]], stop="x")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, [[1]], sampling=make_sampling(-1.0))
    with pytest.raises(TypeError, match="sampling must be"):
        generate(model, [[1]], sampling="greedy")
    with pytest.raises(ValueError, match="no prompts given"):
        next(stream(model, []))
    with pytest.raises(TypeError, match="unexpected arguments"):
        next(stream(model, [[1]], temperature=0.5))


BAD_ARGUMENTS = [  # (arguments replaced, error, words of the message)
    ({"model": 123}, TypeError, r"model must be a decoding.Model .*got int"),
    ({"model": None}, TypeError, r"model must be a decoding.Model .*got NoneType"),
    ({"prompts": 123}, TypeError, r"prompts must be a string, a list of strings, a list of token-id lists.*got int"),
    ({"prompts": None}, TypeError, r"prompts must be .*got NoneType"),
    ({"prompts": {"text": "hi"}}, TypeError, r"prompts must be .*got dict"),
    ({"prompts": [[1], {"a": 1}]}, TypeError, r"prompt 1 is a dict; each prompt is a string or a list of token ids"),
    ({"prompts": [1.5, 2.5]}, TypeError, r"prompt 0 is a float"),
    ({"prompts": [[1, 2.5]]}, TypeError, r"prompt 0 holds float 2.5; a prompt of token ids holds ints only"),
    ({"prompts": [[1, True]]}, TypeError, r"prompt 0 holds bool True"),
    ({"prompts": np.zeros((2, 3))}, TypeError, r"2-D float64 array; prompts must be"),
    ({"prompts": np.zeros((1, 2, 3), np.int32)}, TypeError, r"3-D int32 array"),
    ({"prompts": []}, ValueError, r"no prompts given"),
    ({"prompts": ()}, ValueError, r"no prompts given"),
    ({"prompts": np.zeros((0, 4), np.int32)}, ValueError, r"no prompts given"),
    ({"prompts": [""]}, ValueError, r"prompt 0 is empty \(an empty string\)"),
    ({"prompts": [[1], []]}, ValueError, r"prompt 1 is empty \(an empty list of token ids\)"),
    ({"prompts": [[1], np.zeros(0, np.int64)]}, ValueError, r"prompt 1 is empty \(an empty list of token ids\)"),
    ({"strategy": "spec"}, TypeError, r"strategy must be a decoding strategy \(an object with init and step.*got str"),
    ({"strategy": Autoregressive}, TypeError, r"got the class Autoregressive: instantiate it"),
    ({"draft": "small"}, TypeError, r"draft must be a decoding.Model or None .*got str"),
    ({"sampling": 0.7}, TypeError, r"sampling must be decoding.Greedy\(\) or decoding.Sampling"),
    ({"max_new_tokens": 0}, ValueError, r"max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": -3}, ValueError, r"max_new_tokens must be >= 1, got -3"),
    ({"max_new_tokens": 2.5}, TypeError, r"max_new_tokens must be an int >= 1, got float 2.5"),
    ({"max_new_tokens": "8"}, TypeError, r"max_new_tokens must be an int >= 1, got str '8'"),
    ({"max_new_tokens": True}, TypeError, r"max_new_tokens must be an int >= 1, got bool"),
    ({"options": {"attention": "pallas"}}, TypeError, r"options must be a decoding.Options\(...\) or None, got dict"),
    ({"options": "pallas"}, TypeError, r"options must be a decoding.Options\(...\) or None, got str"),
]


@pytest.mark.parametrize("entry", [generate, stream], ids=["generate", "stream"])
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_entry_points_check_their_arguments(model, entry, case):
    """Each argument of the public entry points is checked at the call (stream too, before its
    first round), and the error names the argument, what was given and what it takes."""
    replace, error, words = BAD_ARGUMENTS[case]
    args = {"model": model, "prompts": [[1, 2]], "max_new_tokens": 2, **replace}
    with pytest.raises(error, match=words):
        entry(args.pop("model"), args.pop("prompts"), **args)


def test_a_speculative_strategy_needs_its_drafter_arguments(model):
    with pytest.raises(TypeError, match="drafter"):
        Speculative()  # the drafter is required
    with pytest.raises(TypeError, match=r"draft must be a decoding.Model or None"):
        generate(model, [[1, 2]], max_new_tokens=2, strategy=Autoregressive(), draft=model.params)


def test_prompt_too_long_for_the_cache_names_the_numbers(model, batch_result):
    # longest 13 + N + 1 slot of lookahead = 24: exactly at the limit is fine ...
    res = generate(model, PROMPTS, max_new_tokens=N, max_cache_len=24)
    assert res.tokens == batch_result.tokens
    # ... one slot less is refused with the arithmetic spelled out.
    with pytest.raises(ValueError, match=r"longest prompt has 13 tokens.*max_new_tokens=10.*24 > 23"):
        generate(model, PROMPTS, max_new_tokens=N, max_cache_len=23)
    # Without max_cache_len the model's context is the limit.
    long_prompt = [[1] * 250]
    with pytest.raises(ValueError, match=r"250 tokens.*261 > 256"):
        generate(model, long_prompt, max_new_tokens=N)


# ------------------------------------------------------------------------------------------
# loop.commit on hand-made inputs
# ------------------------------------------------------------------------------------------


def make_out(rows, cap, done=None, steps=None):
    b = len(rows)
    tokens = np.full((b, cap), -7, np.int32)  # -7 marks never-written slots
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return Tokens(
        tokens=jnp.asarray(tokens),
        count=jnp.asarray([len(r) for r in rows], jnp.int32),
        done=jnp.asarray(done if done is not None else [False] * b),
        steps=jnp.asarray(steps if steps is not None else [0] * b, jnp.int32),
    )


def rows_of(out):
    toks, count = np.asarray(out.tokens), np.asarray(out.count)
    return [toks[b, : count[b]].tolist() for b in range(len(count))]


def test_commit_appends_ragged_blocks():
    out = make_out([[], [5]], cap=6)
    new = commit(out, jnp.array([[1, 2, 3], [4, 9, 9]]), jnp.array([3, 1]), StopRule())
    assert rows_of(new) == [[1, 2, 3], [5, 4]]
    assert np.asarray(new.tokens)[1, 2:].tolist() == [-7] * 4  # nothing past n written
    assert np.asarray(new.done).tolist() == [False, False]
    assert np.asarray(new.steps).tolist() == [1, 1]
    quiet = commit(out, jnp.array([[1, 2, 3], [4, 9, 9]]), jnp.array([3, 1]), StopRule(), count_step=False)
    assert np.asarray(quiet.steps).tolist() == [0, 0]


def test_commit_eos_in_the_middle_cuts_the_rest():
    rule = StopRule(eos_ids=(0, 50))
    out = make_out([[7], [7], [7]], cap=8)
    new = commit(out, jnp.array([[3, 50, 5, 6], [3, 4, 5, 0], [3, 4, 50, 6]]), jnp.array([4, 4, 2]), rule)
    assert rows_of(new) == [[7, 3, 50], [7, 3, 4, 5, 0], [7, 3, 4]]  # row 2: EOS past n is ignored
    assert np.asarray(new.done).tolist() == [True, True, False]
    assert np.asarray(new.tokens)[0, 3:].tolist() == [-7] * 5  # tokens after EOS not written


def test_commit_stop_sequence_spanning_committed_and_new_tokens():
    rule = StopRule(stop_sequences=((7, 8, 9),))
    out = make_out([[1, 7, 8], [1, 2, 7], [1, 2], [8], [1, 7, 8]], cap=8)
    new = commit(out, jnp.array([[9, 4, 4], [8, 9, 4], [7, 8, 9], [9, 4, 4], [9, 4, 4]]),
                 jnp.array([3, 3, 3, 3, 0]), rule)
    assert rows_of(new) == [
        [1, 7, 8, 9],  # two committed tokens + one new
        [1, 2, 7, 8, 9],  # one committed + two new
        [1, 2, 7, 8, 9],  # wholly inside the new block
        [8, 9, 4, 4],  # the sequence's start would lie before the first token: no match
        [1, 7, 8],  # n = 0: nothing offered, nothing stops
    ]
    assert np.asarray(new.done).tolist() == [True, True, True, False, False]


def test_commit_stop_sequences_of_different_lengths():
    rule = StopRule(stop_sequences=((5,), (2, 3, 4, 6)))
    out = make_out([[2, 3], [1]], cap=8)
    new = commit(out, jnp.array([[4, 6, 1], [4, 6, 5]]), jnp.array([3, 3]), rule)
    assert rows_of(new) == [[2, 3, 4, 6], [1, 4, 6, 5]]
    assert np.asarray(new.done).tolist() == [True, True]


def test_commit_leaves_done_rows_unchanged():
    rule = StopRule(eos_ids=(0,))
    out = make_out([[1, 2], [3]], cap=5, done=[True, False], steps=[4, 2])
    new = commit(out, jnp.array([[6, 6], [6, 0]]), jnp.array([2, 2]), rule)
    np.testing.assert_array_equal(np.asarray(new.tokens)[0], np.asarray(out.tokens)[0])
    assert rows_of(new) == [[1, 2], [3, 6, 0]]
    assert np.asarray(new.done).tolist() == [True, True]
    assert np.asarray(new.steps).tolist() == [4, 3]  # done rows do not count forwards


def test_commit_caps_the_count_at_capacity():
    rule = StopRule(eos_ids=(9,))
    out = make_out([[1, 2, 3], [1]], cap=4)
    new = commit(out, jnp.array([[4, 5, 9], [4, 5, 6]]), jnp.array([3, 3]), rule)
    assert rows_of(new) == [[1, 2, 3, 4], [1, 4, 5, 6]]
    assert np.asarray(new.count).tolist() == [4, 4]
    assert np.asarray(new.done).tolist() == [True, True]
    assert np.asarray(new.tokens)[0].tolist() == [1, 2, 3, 4]  # nothing wrapped onto slot 0


# ------------------------------------------------------------------------------------------
# Stop strings with a real tokenizer
# ------------------------------------------------------------------------------------------


def tiny_bpe_tokenizer():
    """A small byte-level BPE tokenizer trained in memory (used when SmolLM2's is unavailable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat and the dog ate the bone while the bird sang a song"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    tok = smollm_tokenizer()
    if tok is None:
        tok = tiny_bpe_tokenizer()
    return tok


def expected_cut(tok, tokens, stops):
    """The documented contract: text cut right after the first stop string; tokens cut to the
    shortest prefix whose text contains one."""
    text = tok.decode(tokens, skip_special_tokens=True)
    hits = [text.find(s) + len(s) for s in stops if s in text]
    if not hits:
        return tokens, text
    for n in range(1, len(tokens) + 1):
        if any(s in tok.decode(tokens[:n], skip_special_tokens=True) for s in stops):
            return tokens[:n], text[: min(hits)]
    raise AssertionError("unreachable")


def test_stop_strings_cut_text_and_tokens(tokenizer):
    tok = tokenizer
    model = tiny_model(vocab_size=len(tok), tokenizer=tok, seed=3)
    prompts = ["Tell me a story about a cat.", "What is two plus two?"]
    m = 24
    full = generate(model, prompts, max_new_tokens=m, eos_token_id=())
    rows = full.tokens
    assert [len(r) for r in rows] == [m, m]
    assert full.texts == [tok.decode(r, skip_special_tokens=True) for r in rows]

    def ascii_word(s):
        return len(s.strip()) >= 3 and s.isascii() and s.strip().isprintable()

    # s1: the exact text of two generated tokens of row 0 (so the loop itself can stop there).
    s1 = None
    for i in range(2, m - 4):
        cand = tok.decode(rows[0][i:i + 2])
        if (ascii_word(cand) and tok.encode(cand, add_special_tokens=False) == rows[0][i:i + 2]
                and cand not in full.texts[1] and cand not in tok.decode(rows[0][: i + 1])):
            s1, stop_at = cand, i + 2
            break
    # s2: a piece of row 1's text that starts inside a token, so that no tokenization of it
    # occurs in the generated ids: only the host-side cut on the text can find it.
    def occurs(seq, row):
        return any(row[k:k + len(seq)] == seq for k in range(len(row)))

    s2 = None
    for j in range(2, m - 4):
        first = tok.decode(rows[1][j:j + 1])
        skip = 2 if first.startswith(" ") else 1
        cand = tok.decode(rows[1][j:j + 3])[skip:]
        if (len(first) > skip + 1 and ascii_word(cand) and cand[0].isalnum() and cand not in full.texts[0]
                and not any(occurs(tok.encode(v, add_special_tokens=False), r)
                            for v in (cand, " " + cand) for r in rows)):
            s2 = cand
            break
    if s1 is None or s2 is None:
        pytest.fail(f"could not pick stop strings from {full.texts!r}")

    res = generate(model, prompts, max_new_tokens=m, eos_token_id=(), stop=[s1, s2])
    for b in range(2):
        want_tokens, want_text = expected_cut(tok, rows[b], [s1, s2])
        assert res.tokens[b] == want_tokens, (b, s1, s2)
        assert res.texts[b] == want_text, (b, s1, s2)
        assert res.texts[b].endswith(s1 if b == 0 else s2)
        assert len(res.tokens[b]) < m
    assert res.stats.tokens_per_row[0] == stop_at  # row 0 stopped inside the loop
    assert res.stats.tokens_per_row[1] == m  # row 1 ran on: only the text cut found s2
