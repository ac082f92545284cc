"""Logit parity of loaded checkpoints with transformers (PyTorch, float32, CPU).

Tiny random models of every supported family are saved with `save_pretrained`, loaded with
`decoding.loading.load` and run through `decoding.model.forward`; the logits must match
PyTorch's. The real SmolLM2-135M GGUF from the registry is compared with transformers loading
the same GGUF (this also checks the inverse of llama.cpp's Q/K row permutation).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decoding.config import ConfigError  # noqa: E402
from decoding.loading import load  # noqa: E402
from decoding.model import forward  # noqa: E402

ATOL = 1e-4
T = 24


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions, cache):
    out = forward(config, params, tokens, positions, cache)
    return out.logits, out.cache


def our_logits(model, ids: np.ndarray, config=None) -> np.ndarray:
    """Full-sequence logits [B, T, V] from one forward pass over an empty cache."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = _forward(config or model.config, model.params, jnp.asarray(ids, jnp.int32), positions,
                         model.init_cache(b, t))
    return np.asarray(logits)


def tokens(batch=2, length=T, vocab=128, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama3-rope": (transformers.LlamaConfig, {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "linear-rope": (transformers.LlamaConfig, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "yarn-rope": (transformers.LlamaConfig, {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": False}),
    "mistral-window": (transformers.MistralConfig, {"sliding_window": 8, "head_dim": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_sequence_logits_match_transformers(case, tiny_torch_model, tmp_path):
    config_cls, overrides = CASES[case]
    ref = tiny_torch_model(config_cls, **overrides)
    ref.save_pretrained(tmp_path)
    model = load(tmp_path, dtype=jnp.float32, tokenizer=False)
    assert model.params["embed"].dtype == jnp.float32
    assert model.source == str(tmp_path)
    ids = tokens()
    want = torch_logits(ref, ids)
    got = our_logits(model, ids)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    c = model.config
    assert c.tie_embeddings == ref.config.tie_word_embeddings
    if case == "qwen2":
        assert c.qkv_bias and "lm_head" in model.params
    # The feature under test must matter for this input, or the comparison proves nothing.
    if c.rope_scaling is not None:
        plain = our_logits(model, ids, dataclasses.replace(c, rope_scaling=None))
        assert np.abs(plain - want).max() > 100 * ATOL
    if c.sliding_window is not None:
        assert c.sliding_window == 8
        full = our_logits(model, ids, dataclasses.replace(c, sliding_window=None))
        assert np.abs(full - want).max() > 100 * ATOL


def test_qwen2_mixed_sliding_layers_match_or_are_refused(tiny_torch_model, tmp_path):
    ref = tiny_torch_model(transformers.Qwen2Config, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert ref.config.layer_types == ["full_attention", "sliding_attention"]
    ref.save_pretrained(tmp_path)
    try:
        model = load(tmp_path, dtype=jnp.float32, tokenizer=False)
    except ConfigError:
        return  # refusing what it cannot compute is the other correct answer
    ids = tokens()
    np.testing.assert_allclose(our_logits(model, ids), torch_logits(ref, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mistral-window", "qwen2"])
def test_incremental_decode_matches_full_pass(case, tiny_torch_model, tmp_path):
    config_cls, overrides = CASES[case]
    ref = tiny_torch_model(config_cls, **overrides)
    ref.save_pretrained(tmp_path)
    model = load(tmp_path, dtype=jnp.float32, tokenizer=False)
    ids = tokens(seed=1)
    want = torch_logits(ref, ids)
    b, prefill = ids.shape[0], 7
    cache = model.init_cache(b, T)
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    logits, cache = _forward(model.config, model.params, jnp.asarray(ids[:, :prefill]), pos, cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, T):
        pos = jnp.full((b, 1), t, jnp.int32)
        logits, cache = _forward(model.config, model.params, jnp.asarray(ids[:, t:t + 1]), pos, cache)
        steps.append(np.asarray(logits))
    assert np.asarray(cache.lengths).tolist() == [T] * b
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, atol=ATOL, rtol=0)


def test_sharded_safetensors(tiny_torch_model, tmp_path):
    ref = tiny_torch_model(transformers.Qwen2Config)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = load(str(tmp_path), dtype=jnp.float32, tokenizer=False)
    ids = tokens()
    np.testing.assert_allclose(our_logits(model, ids), torch_logits(ref, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,config_cls,tied", [
    ("llama", transformers.LlamaConfig, True),
    ("qwen2", transformers.Qwen2Config, False),
])
def test_handwritten_gguf(arch, config_cls, tied, tiny_torch_model, write_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODING_CACHE_DIR", str(tmp_path / "cache"))
    ref = tiny_torch_model(config_cls, tie_word_embeddings=tied)
    path = write_gguf(ref, tmp_path / f"tiny-{arch}.gguf", arch)
    model = load(path, dtype=jnp.float32, tokenizer=False)
    assert model.config.tie_embeddings == tied and model.config.qkv_bias == (arch == "qwen2")
    ids = tokens()
    np.testing.assert_allclose(our_logits(model, ids), torch_logits(ref, ids), atol=ATOL, rtol=0)


MESSAGES = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


def _transformers_reference(path):
    """(prompt, token ids, float32 logits) from transformers loading the GGUF at `path`.

    Building transformers' model from a GGUF takes ~20 s on a small CPU, so the result is kept
    under the registry cache, keyed by the file's sha256, the messages and the versions of
    transformers, torch and gguf (any change recomputes it).
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoding import registry
    from decoding.loading import gguf_sha256

    versions = [transformers.__version__, torch.__version__, getattr(gguf, "__version__", "")]
    key = json.dumps([gguf_sha256(path), MESSAGES, versions])
    file = registry.cache_dir() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if file.is_file():
        with np.load(file) as ref:
            return str(ref["prompt"]), ref["ids"], ref["logits"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tok(prompt)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    logits = torch_logits(model, ids)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, prompt=np.asarray(prompt), ids=ids, logits=logits)
    return prompt, ids, logits


def _gguf_parity(path, atol):
    """Our float32 logits vs transformers loading the same GGUF, on a real chat prompt."""
    ours = load(path, dtype=jnp.float32)
    prompt, ids, want = _transformers_reference(path)
    assert ours.tokenizer.chat_template, "the GGUF's chat template was not attached"
    assert ours.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == prompt
    assert [ours.tokenizer(prompt)["input_ids"]] == ids.tolist()
    got = our_logits(ours, ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.98
    return ours


def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    model = _gguf_parity(smollm2_gguf, atol=5e-4)
    c = model.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert c.tie_embeddings and model.source == str(smollm2_gguf)


@pytest.mark.slow
def test_qwen_gguf_matches_transformers():
    from decoding import registry

    path = registry.fetch("qwen2.5-coder-0.5b-instruct", quiet=True)
    model = _gguf_parity(path, atol=5e-4)
    assert model.config.qkv_bias and not model.config.tie_embeddings
