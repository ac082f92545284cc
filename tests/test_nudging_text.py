"""The text exchange under nudging: word splitting, token bytes with leading-space markers,
decoding continuations, trimming repeated suffixes (alignment.text). Pure host code, fast.

Also home of the two small tokenizers the nudging tests use (`make_tokenizer`): a GPT-2-style
byte-level BPE (`Ġ` markers) and a SentencePiece-style BPE (`▁` markers, merges across
newlines), trained in milliseconds on a fixed ASCII text, each with a minimal chat template.
Their alphabets are ASCII, so random models over them only ever write whole characters.
"""

import functools

import pytest

from alignment.text import (TokenBytes, _bytes_to_unicode, decode_continuation, piece_bytes, split_words,
                            token_scheme, trim_repetition)
from tiny import SMOLLM_NAME, smollm_gguf_path

CORPUS = (
    "Janet sells 16 eggs a day. She eats three for breakfast and bakes muffins with four. "
    "The remainder is sold at the market for 2 dollars each, so she makes 18 dollars a day.\n\n"
    "Question: How many apples are left? Answer: There are 7 apples left, because 10 - 3 = 7.\n"
    "Write a short poem about the sea: the waves roll in, the gulls cry out, the tide goes away."
)
ASCII = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
VOCAB = 256  # both tokenizers, special tokens included: tiny models over them share one config


@functools.lru_cache(maxsize=None)
def make_tokenizer(kind: str):
    """A transformers tokenizer: kind "byte_level" (EOS <|endoftext|>, last id) or
    "sentencepiece" (EOS </s> = 0, <unk> = 1), VOCAB tokens, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte_level":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        b2u = _bytes_to_unicode()
        bpe.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(
            vocab_size=VOCAB - 1, initial_alphabet=[b2u[ord(c)] for c in ASCII], show_progress=False))
        bpe.add_special_tokens(["<|endoftext|>"])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    elif kind == "sentencepiece":
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        bpe.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["</s>", "<unk>"], initial_alphabet=ASCII + ["\u2581"],
            show_progress=False))
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")
    else:
        raise ValueError(kind)
    assert len(tok) == VOCAB, len(tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def smollm():
    """The real SmolLM2-135M-Instruct (registry GGUF; bf16 load reads the converted cache, with
    the tokenizer files, in seconds), parameters in float32 for CPU; None when unavailable."""
    if smollm_gguf_path() is None:
        return None
    import jax
    import jax.numpy as jnp

    import decoding

    model = decoding.load(SMOLLM_NAME, dtype=jnp.bfloat16)
    model.params = jax.tree.map(lambda x: x.astype(jnp.float32), model.params)
    return model


@pytest.fixture(scope="session")
def bytelevel_tok():
    return make_tokenizer("byte_level")


@pytest.fixture(scope="session")
def metaspace_tok():
    return make_tokenizer("sentencepiece")

# ------------------------------------------------------------------------------------------
# split_words
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("", []),
    ("Hello", ["Hello"]),
    ("Hello world", ["Hello", " world"]),
    (" Hello world", [" Hello", " world"]),  # leading whitespace stays with the first word
    ("Hello  world", ["Hello", "  world"]),  # runs of spaces stay together
    ("Hello world ", ["Hello", " world", " "]),  # trailing whitespace is a piece of its own
    ("   ", ["   "]),
    ("step.\n\nThen 3 + 4 = 7.", ["step.", "\n\nThen", " 3", " +", " 4", " =", " 7."]),
    ("a\tb\r\nc", ["a", "\tb", "\r\nc"]),
    ("$2,000 (net) -> 18%", ["$2,000", " (net)", " ->", " 18%"]),
    ("café’s naïve 日本語 text", ["café’s", " naïve", " 日本語", " text"]),
    ("don't\u00a0stop", ["don't", "\u00a0stop"]),  # a no-break space is whitespace too
])
def test_split_words_keeps_leading_whitespace(text, words):
    assert split_words(text) == words


@pytest.mark.parametrize("pieces, words", [
    # GPT-2 byte-level token strings: Ġ space, Ċ newline, ĉ tab
    ("ĠHelloĠworld", ["ĠHello", "Ġworld"]),
    ("HelloĠĠworldĊĊThe", ["Hello", "ĠĠworld", "ĊĊThe"]),
    ("aĉb", ["a", "ĉb"]),
    ("ĠHelloĠ", ["ĠHello", "Ġ"]),
    # SentencePiece pieces: ▁ space
    ("▁Hello▁world", ["▁Hello", "▁world"]),
    ("▁▁indented▁code", ["▁▁indented", "▁code"]),
    ("Hello▁", ["Hello", "▁"]),
    # markers and real whitespace mixed
    ("▁a b\nĠc", ["▁a", " b", "\nĠc"]),
])
def test_split_words_treats_leading_space_markers_as_whitespace(pieces, words):
    assert split_words(pieces) == words


@pytest.mark.parametrize("text", [
    "", " ", "x", " a  b\n\nc\t d ", "ĠaĊĊb▁c", "\n\n\n", "a" * 50, "Ġ", "▁▁", "end.\n", " é ü ",
])
def test_split_words_is_lossless_and_every_piece_is_one_word(text):
    words = split_words(text)
    assert "".join(words) == text
    for i, w in enumerate(words):
        core = w.lstrip(" \t\n\r\u0120\u010a\u0109\u2581")
        assert core == "" or not any(c.isspace() for c in core), w
        if not core:  # only trailing whitespace may stand alone
            assert i == len(words) - 1


# ------------------------------------------------------------------------------------------
# Token bytes: leading-space markers normalised
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("piece, scheme, expected", [
    ("Ġthe", "byte_level", b" the"),
    ("ĊĊ", "byte_level", b"\n\n"),
    ("ĉx", "byte_level", b"\tx"),
    ("cafÃ©", "byte_level", "café".encode()),  # é is two bytes, each its own character
    ("âĢĻ", "byte_level", "’".encode()),
    ("Ã", "byte_level", b"\xc3"),  # half a character: a byte, comparable with bytes
    ("<|im_end|>", "byte_level", b"<|im_end|>"),  # an added token written as plain text
    ("▁the", "sentencepiece", b" the"),
    ("▁▁", "sentencepiece", b"  "),
    ("<0x0A>", "sentencepiece", b"\n"),
    ("<0xE2>", "sentencepiece", b"\xe2"),
    ("the", "sentencepiece", b"the"),
    ("plain text", "plain", b"plain text"),
])
def test_piece_bytes_normalises_markers(piece, scheme, expected):
    assert piece_bytes(piece, scheme) == expected


def test_token_bytes_on_the_real_byte_level_tokenizer():
    if smollm() is None:
        pytest.skip(f"the registry checkpoint {SMOLLM_NAME!r} is not available (offline?)")
    tok = smollm().tokenizer
    tb = TokenBytes(tok)
    assert tb.scheme == "byte_level"
    ids = tok.encode(" Hello world\n\ncafé", add_special_tokens=False)
    assert b"".join(tb[i] for i in ids) == " Hello world\n\ncafé".encode()
    the = tok.encode(" the", add_special_tokens=False)
    assert len(the) == 1 and tb[the[0]] == b" the"
    assert tb.starts(" theory", the[0]) and tb.starts(" the", the[0])
    assert not tb.starts("the", the[0]) and not tb.starts(" them"[:3], the[0])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tb[eos] is None and not tb.starts("<|im_end|>", eos)


def test_token_bytes_on_sentencepiece_and_byte_level_test_tokenizers(bytelevel_tok, metaspace_tok):
    for tok in (bytelevel_tok, metaspace_tok):
        tb = TokenBytes(tok)
        assert tb.scheme == ("byte_level" if tok is bytelevel_tok else "sentencepiece")
        text = "Janet sells 16 eggs\n\nQuestion: why?"
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(tb[i] for i in ids)
        # SentencePiece adds one leading space (its dummy prefix) to the first word.
        assert joined == (text if tok is bytelevel_tok else " " + text).encode()
        assert tb[tok.eos_token_id] is None


def test_starts_compares_bytes_so_half_characters_match():
    class ByteTok:  # a one-token stand-in: token 7 is the first byte of "é"
        all_special_ids = []

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

        def convert_ids_to_tokens(self, ids):
            return ["a", "Ġb"] if isinstance(ids, list) else "Ã"

    tb = TokenBytes(ByteTok())
    assert tb.scheme == "byte_level"
    assert tb.starts("éclair", 7) and not tb.starts("eclair", 7)


# ------------------------------------------------------------------------------------------
# Decoding continuations
# ------------------------------------------------------------------------------------------


def test_decode_continuation_keeps_the_leading_space_sentencepiece_drops(metaspace_tok):
    tok = metaspace_tok
    ids = tok.encode("Janet sells eggs", add_special_tokens=False)
    cut = 2 if tok.convert_ids_to_tokens(ids[2]).startswith("▁") else 1
    assert tok.convert_ids_to_tokens(ids[cut]).startswith("▁")
    alone = tok.decode(ids[cut:])
    assert not alone.startswith(" ")  # what decoding the new ids alone gets wrong
    rest = decode_continuation(tok, ids[:cut], ids[cut:])
    assert rest.startswith(" ")
    assert tok.decode(ids[:cut]) + rest == "Janet sells eggs"
    assert decode_continuation(tok, ids, []) == ""


def test_decode_continuation_on_byte_level(bytelevel_tok):
    tok = bytelevel_tok
    text = "She eats three.\n\nThe answer is 7."
    ids = tok.encode(text, add_special_tokens=False)
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) + decode_continuation(tok, ids[:cut], ids[cut:]) == text


# ------------------------------------------------------------------------------------------
# trim_repetition
# ------------------------------------------------------------------------------------------


def test_trim_repetition_removes_repeated_suffixes_of_30_or_more_characters():
    loop = " She makes 64 cents per day, every day."
    assert len(loop) >= 30
    assert trim_repetition("Answer:" + loop * 5 + "\n") == "Answer:" + loop
    short = " ab ab"
    assert trim_repetition("x" + short * 4) == "x" + short * 4  # repeats under 30 chars stay
    assert trim_repetition("  no repetition here  ") == "no repetition here"
    assert trim_repetition("") == ""


def test_token_scheme_detects_each_kind(bytelevel_tok, metaspace_tok):
    assert token_scheme(bytelevel_tok) == "byte_level"
    assert token_scheme(metaspace_tok) == "sentencepiece"
