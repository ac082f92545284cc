"""A registry model refuses a tokenizer that does not tokenize like the model's own.

transformers 5.17 builds a wrong tokenizer from the Gemma 3 GGUF: text round-trips, but it is
split into pieces the model never saw and the model answers with garbage. The registry records
the token ids of a probe text for each file, and the loader checks them.
"""

import shutil

import pytest
from transformers import AutoTokenizer

from decoding import loading, registry


def _saved_tokenizer(path, tmp_path, name):
    tok = loading.tokenizer.hf_tokenizer(path.parent, path.name)
    out = tmp_path / name
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gemma_tok_dir(gemma_gguf, tmp_path_factory):
    """Gemma 3's tokenizer files: a tokenizer that is wrong for SmolLM2 (converted once)."""
    return _saved_tokenizer(gemma_gguf, tmp_path_factory.mktemp("tok"), "gemma-tok")


def test_probe_ids_are_the_checkpoints_own(smollm2_gguf, gemma_gguf, gemma_tok_dir):
    for name, path in (("smollm2-135m-instruct", smollm2_gguf), ("gemma-3-270m", gemma_gguf)):
        entry = registry.entry(name)
        tok = (loading.tokenizer.hf_tokenizer(path.parent, path.name) if name.startswith("smol")
               else AutoTokenizer.from_pretrained(str(gemma_tok_dir)))
        ids = tuple(tok(registry.PROBE_TEXT)["input_ids"])
        assert ids == entry.probe_ids
        assert tok.decode(ids, skip_special_tokens=True) == registry.PROBE_TEXT
        loading.check_tokenizer(tok, entry, "test")  # passes
    assert registry.by_sha256(registry.entry("gemma-3-270m").sha256).name == "gemma-3-270m"
    assert registry.by_sha256("0" * 64) is None


def test_another_models_tokenizer_is_refused_with_a_clear_error(smollm2_gguf, gemma_tok_dir, tmp_path):
    with pytest.raises(loading.TokenizerMismatch) as err:
        loading.load_gguf(smollm2_gguf, tokenizer=str(gemma_tok_dir), cache=False)
    msg = str(err.value)
    assert "smollm2-135m-instruct" in msg and "probe text" in msg and "expected 42" in msg
    assert "transformers" in msg and "tokenizer=" in msg
    # the model's own tokenizer, passed explicitly, is accepted
    own = _saved_tokenizer(smollm2_gguf, tmp_path, "smol-tok")
    model = loading.load_gguf(smollm2_gguf, tokenizer=str(own), cache=False)
    assert tuple(model.tokenizer(registry.PROBE_TEXT)["input_ids"]) == registry.entry("smollm2-135m-instruct").probe_ids
    with pytest.raises(loading.LoadError, match="tokenizer="):
        loading.load_gguf(smollm2_gguf, tokenizer=3, cache=False)


def test_a_wrong_conversion_raises_and_is_not_cached(smollm2_gguf, gemma_tok_dir, tmp_path, monkeypatch):
    wrong = AutoTokenizer.from_pretrained(str(gemma_tok_dir))
    monkeypatch.setattr(loading.tokenizer, "hf_tokenizer", lambda directory, gguf_file=None: wrong)
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(loading.TokenizerMismatch, match="builds a wrong tokenizer"):
        loading.load_gguf(smollm2_gguf, cache=None, dtype="float32")
    sha = registry.entry("smollm2-135m-instruct").sha256
    assert not (tmp_path / "cache" / "converted" / f"{sha}-tokenizer").exists()


def test_a_wrong_cached_tokenizer_is_converted_again(smollm2_gguf, gemma_tok_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    sha = registry.entry("smollm2-135m-instruct").sha256
    cached = tmp_path / "cache" / "converted" / f"{sha}-tokenizer"
    cached.parent.mkdir(parents=True)
    shutil.copytree(gemma_tok_dir, cached)  # stale and wrong
    model = loading.load_gguf(smollm2_gguf, cache=None, dtype="float32")
    probe = registry.entry("smollm2-135m-instruct").probe_ids
    assert tuple(model.tokenizer(registry.PROBE_TEXT)["input_ids"]) == probe
    again = AutoTokenizer.from_pretrained(str(cached))  # the cache now holds the right one
    assert tuple(again(registry.PROBE_TEXT)["input_ids"]) == probe
