"""Tokenizers: the checkpoint's own through `transformers.AutoTokenizer` (chat template
included), the one embedded in a GGUF file (kept as tokenizer files once converted), or one the
caller passes; for registry files each is checked against the token ids the registry records
for a probe text (`check_tokenizer`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import registry
from .convert import LoadError


def hf_tokenizer(directory: Path, gguf_file: str | None = None):
    """`AutoTokenizer` of a directory (or of the GGUF file `gguf_file` in it)."""
    from transformers import AutoTokenizer

    try:
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(str(directory))
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoadError(
            f"could not load a tokenizer from {directory / (gguf_file or '')}: {err}. "
            "Pass tokenizer=False to load the weights alone."
        ) from err


class TokenizerMismatch(LoadError):
    """The tokenizer built for a registry checkpoint does not tokenize like the model's own."""


def check_tokenizer(tok, entry: "registry.Entry | None", origin: str) -> None:
    """Refuse a tokenizer that does not give `entry.probe_ids` for `registry.PROBE_TEXT`.

    A wrong tokenizer is silent: decoding still runs and round-trips text, but the model sees
    token sequences it was never trained on and writes garbage. transformers 5.17, for one,
    builds such a tokenizer from the Gemma 3 GGUF (59 pieces for the probe instead of 41)."""
    if entry is None or not entry.probe_ids:  # not a registry file: nothing recorded to compare
        return
    got = tuple(int(i) for i in tok(registry.PROBE_TEXT)["input_ids"])
    if got == entry.probe_ids:
        return
    import transformers

    first = next((i for i, (a, b) in enumerate(zip(got, entry.probe_ids)) if a != b), min(len(got), len(entry.probe_ids)))
    raise TokenizerMismatch(
        f"the tokenizer {origin} for {entry.name!r} does not tokenize like the model: the probe text "
        f"{registry.PROBE_TEXT!r} gives {len(got)} tokens, expected {len(entry.probe_ids)} (first difference at "
        f"token {first}: got {got[first:first + 4]}, expected {entry.probe_ids[first:first + 4]}). This "
        f"transformers ({transformers.__version__}) builds a wrong tokenizer from this GGUF file, and the model "
        "would answer with garbage. Upgrade transformers (5.24 builds it right), or pass the model's own "
        "tokenizer: decoding.load(..., tokenizer='<tokenizer directory or hub id>'), or place tokenizer files "
        f"saved by a good version in {registry.cache_dir() / 'converted' / (entry.sha256 + '-tokenizer')}."
    )


def gguf_tokenizer(path: Path, cache_root: Path | None, sha: str):
    """The GGUF's embedded tokenizer via transformers, kept as tokenizer files once converted.

    For a registry file the tokenizer must pass `check_tokenizer`: a cached one that fails is
    converted again (it may come from an older transformers), a converted one that fails raises.
    `sha` is the file's sha256; `cache_root` None keeps nothing."""
    from transformers import AutoTokenizer

    entry = registry.by_sha256(sha)
    if cache_root is None:
        tok = hf_tokenizer(path.parent, path.name)
        check_tokenizer(tok, entry, f"transformers built from {path.name}")
        return tok
    cache_root.mkdir(parents=True, exist_ok=True)
    saved = cache_root / f"{sha}-tokenizer"
    if saved.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(saved))
            check_tokenizer(tok, entry, f"cached in {saved}")
            return tok
        except (OSError, ValueError):  # unreadable or wrong (TokenizerMismatch is a ValueError): convert again
            pass
    tok = hf_tokenizer(path.parent, path.name)
    check_tokenizer(tok, entry, f"transformers built from {path.name}")
    tmp = cache_root / f"{sha}-tokenizer.tmp{os.getpid()}"
    tok.save_pretrained(str(tmp))
    shutil.rmtree(saved, ignore_errors=True)
    try:
        os.replace(tmp, saved)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def explicit_tokenizer(tokenizer, sha: str | None = None):
    """`tokenizer=` given as a directory / hub id or a tokenizer object (checked for registry files)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LoadError(f"could not load the tokenizer {os.fspath(tokenizer)!r}: {err}. Pass a directory "
                            "holding tokenizer files, a hub id, a tokenizer object, True or False.") from err
        origin = f"loaded from {os.fspath(tokenizer)!r}"
    elif callable(tokenizer) and hasattr(tokenizer, "decode"):
        tok, origin = tokenizer, "passed as tokenizer="
    else:
        raise LoadError(f"tokenizer={tokenizer!r}: pass True (the checkpoint's own), False (none), a tokenizer "
                        "directory or hub id, or a transformers tokenizer object.")
    check_tokenizer(tok, registry.by_sha256(sha), origin)
    return tok
