"""alignment: inference-time alignment on top of `decoding`.

* `nudge` / `Nudging` (Fei, Razeghi, Singh 2025): a small aligned model writes the few words
  where an unaligned base model is unsure; the two may have different tokenizers.
* `alignment.text`: the text exchange between tokenizers (`split_words`, `TokenBytes`,
  `decode_continuation`, `trim_repetition`).
"""

from .nudging import NudgeResult, Nudging, Prompts, Segment, nudge
from .text import TokenBytes, decode_continuation, split_words, trim_repetition

__all__ = ["NudgeResult", "Nudging", "Prompts", "Segment", "TokenBytes", "decode_continuation", "nudge",
           "split_words", "trim_repetition"]
