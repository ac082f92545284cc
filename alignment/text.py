"""Text exchange between models that do not share a tokenizer: words, token strings, decoding.

Models with different vocabularies can only collaborate through text (Fei et al. 2025,
"Nudging", sec. 3): one model's tokens are decoded, the text is re-tokenised by the other.
Three small pieces make that exact and cheap:

* `split_words(text)`: words with their *leading* whitespace, losslessly
  (`"".join(split_words(t)) == t`). A word is a run of whitespace (possibly empty, at the start
  of the text) followed by a run of non-whitespace; trailing whitespace is a piece of its own.
  Every whitespace character counts (spaces, newlines, tabs), and so do the tokenizers'
  leading-space markers, so raw token strings split the same way as decoded text:
  byte-level BPE's `Ġ` (space), `Ċ` (newline), `ĉ` (tab) and SentencePiece's `▁`.
* `TokenBytes(tokenizer)[id]`: the bytes a token stands for, markers normalised (`Ġthe` and
  `▁the` are both `b" the"`; SentencePiece byte-fallback pieces `<0x0A>` are the byte itself).
  Comparing bytes rather than characters lets a token that holds part of a multi-byte
  character be compared with a word. Special tokens have no bytes (None).
* `decode_continuation(tokenizer, context, new)`: the text that token ids `new` add after
  `context`. Decoding `new` alone is wrong for SentencePiece tokenizers (they drop the leading
  space of the first piece); decoding a few context tokens with them and removing the
  context's own text is right for every tokenizer.
"""

from __future__ import annotations

import re
from typing import Sequence

BYTE_LEVEL_MARKERS = "\u0120\u010a\u0109"  # Ġ (space), Ċ (newline), ĉ (tab) in GPT-2's byte map
SENTENCEPIECE_MARKER = "\u2581"  # ▁
_SPACE = rf"[\s{BYTE_LEVEL_MARKERS}{SENTENCEPIECE_MARKER}]"
_WORD = re.compile(rf"{_SPACE}*[^\s{BYTE_LEVEL_MARKERS}{SENTENCEPIECE_MARKER}]+|{_SPACE}+")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def split_words(text: str) -> list[str]:
    """Words of `text`, each with its leading whitespace; `"".join(result) == text`.

    >>> split_words(" Hello  world\\n\\nBye ")
    [' Hello', '  world', '\\n\\nBye', ' ']
    >>> split_words("ĠHelloĠworld")  # raw byte-level token strings split the same way
    ['ĠHello', 'Ġworld']
    """
    return _WORD.findall(text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...)
    to U+0100 upwards in byte order, which is why a space is `Ġ` (U+0120) and a newline `Ċ`.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def token_scheme(tokenizer) -> str:
    """How the tokenizer writes leading spaces in its token strings: "byte_level" (`Ġ`),
    "sentencepiece" (`▁`) or "plain" (token strings are text)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a b", add_special_tokens=False))
    joined = "".join(p for p in pieces if p)
    if "\u0120" in joined:
        return "byte_level"
    if SENTENCEPIECE_MARKER in joined:
        return "sentencepiece"
    return "plain"


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes one token string stands for under `scheme` (see `token_scheme`)."""
    if scheme == "byte_level":
        if all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return piece.encode("utf-8")  # an added token written as plain text
    if scheme == "sentencepiece":
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace(SENTENCEPIECE_MARKER, " ").encode("utf-8")
    return piece.encode("utf-8")


class TokenBytes:
    """`TokenBytes(tokenizer)[token_id] -> bytes | None`: each token's bytes, markers normalised.

    Memoised per id. Special tokens (EOS, chat markers) map to None: they stand for no text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.scheme = token_scheme(tokenizer)
        self._special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        self._memo: dict[int, bytes | None] = {}

    def __getitem__(self, token_id: int) -> bytes | None:
        token_id = int(token_id)
        if token_id not in self._memo:
            if token_id in self._special:
                self._memo[token_id] = None
            elif self.scheme == "plain":
                self._memo[token_id] = self.tokenizer.decode([token_id]).encode("utf-8")
            else:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                self._memo[token_id] = None if piece is None else piece_bytes(piece, self.scheme)
        return self._memo[token_id]

    def starts(self, word: str, token_id: int) -> bool:
        """Whether `word` begins with the token's text (bytes compared; never for an empty or
        special token)."""
        b = self[token_id]
        return bool(b) and word.encode("utf-8").startswith(b)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_continuation(tokenizer, context: Sequence[int], new: Sequence[int], tail: int = 8) -> str:
    """Text that token ids `new` add after the token ids `context`.

    Decodes the last `tail` context tokens with and without `new` and keeps the difference, so
    leading-space markers of the first new token are kept (SentencePiece decoders strip them at
    the start of a decode). Falls back to decoding `new` alone if the context's text is not a
    prefix of the joint text (a context ending inside a multi-byte character).
    """
    if not new:
        return ""
    head_ids = list(context[-tail:]) if tail else []
    head = _decode(tokenizer, head_ids)
    full = _decode(tokenizer, head_ids + list(new))
    if full.startswith(head):
        return full[len(head):]
    return _decode(tokenizer, new)


def continuation_offsets(tokenizer, context: Sequence[int], new: Sequence[int]) -> list[int]:
    """`offsets[k]`: number of characters of text the first k tokens of `new` add after
    `context` (`offsets[0] == 0`); used to count how many tokens a prefix of the text took."""
    return [0] + [len(decode_continuation(tokenizer, context, new[:k])) for k in range(1, len(new) + 1)]


def trim_repetition(text: str, min_chars: int = 30) -> str:
    """Strip `text`, then, while it ends with two adjacent copies of a suffix of at least
    `min_chars` characters, drop the last copy (the longest such suffix first).

    The nudging authors apply this to nudged answers, whose loops are cut by the round or
    token limit; applying it to every compared system keeps comparisons fair.
    """
    text = text.strip()
    while True:
        longest = 0
        for n in range(len(text) // 2, min_chars - 1, -1):
            if text[:-n].endswith(text[-n:]):
                longest = n
                break
        if not longest:
            return text
        text = text[:-longest]
