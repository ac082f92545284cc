"""Greedy generation on the real SmolLM2-135M-Instruct equals Hugging Face transformers'.

Both sides read the same registry GGUF (Q4_1, dequantized to float32): ours through
`decoding.load`, the reference through transformers' own GGUF conversion into a
`LlamaForCausalLM` (torch, float32). Greedy decoding must agree token for token, for the
prompts run as one ragged batch and one by one.

Building transformers' model from the GGUF and decoding with it takes tens of seconds on a
small CPU, so its greedy tokens are kept under the registry cache directory, keyed by the
GGUF's sha256, the prompt ids, the number of tokens and the versions of transformers, torch
and gguf; any change recomputes them.
"""

import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from tiny import SMOLLM_NAME, smollm_gguf_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning to play the guitar.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_path():
    path = smollm_gguf_path()
    if path is None:
        pytest.skip(f"the registry checkpoint {SMOLLM_NAME!r} could not be fetched (offline?)")
    return path


@pytest.fixture(scope="module")
def ours(gguf_path):
    return decoding.load(SMOLLM_NAME, dtype=jnp.float32)


@pytest.fixture(scope="module")
def batched(ours):
    # No EOS: compare all NEW_TOKENS tokens of every row (greedy is deterministic past EOS too).
    return decoding.generate(ours, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_id=())


def transformers_model(path):
    """transformers' LlamaForCausalLM with the GGUF's weights, via transformers' own converter
    (`from_pretrained(gguf_file=...)` itself would need `accelerate`, not a dependency here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result
    assert set(result.missing_keys) <= {"lm_head.weight"} and config.tie_word_embeddings, result
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def transformers_greedy(path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation (NEW_TOKENS, no EOS) of each prompt, run one by one."""
    torch = pytest.importorskip("torch")
    import gguf
    import transformers

    from decoding import registry
    from decoding.loading import gguf_sha256

    versions = [transformers.__version__, torch.__version__, getattr(gguf, "__version__", "")]
    key = json.dumps([gguf_sha256(path), prompt_ids, NEW_TOKENS, versions])
    file = registry.cache_dir() / "reference" / f"greedy-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if file.is_file():
        with np.load(file) as ref:
            if json.loads(str(ref["key"])) == json.loads(key):
                return ref["tokens"].tolist()
    model = transformers_model(path)
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
            )
            out.append(seq[0, len(ids):].tolist())
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, key=np.asarray(key), tokens=np.asarray(out, np.int64))
    os.replace(tmp, file)
    return out


def test_loaded_model_is_the_expected_checkpoint(ours):
    c = ours.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert ours.dtype == jnp.float32 and c.tie_embeddings
    assert ours.tokenizer is not None and ours.tokenizer.chat_template


def test_greedy_equals_transformers_batched_and_one_by_one(ours, gguf_path, batched):
    prompt_ids = batched.prompt_tokens
    assert len({len(p) for p in prompt_ids}) > 1  # really a ragged batch
    im_start = ours.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(im_start in ids for ids in prompt_ids)  # the chat template was applied
    want = transformers_greedy(gguf_path, prompt_ids)
    assert [len(w) for w in want] == [NEW_TOKENS] * len(PROMPTS)
    for i, ids in enumerate(prompt_ids):
        tok = ours.tokenizer
        assert batched.tokens[i] == want[i], (PROMPTS[i], tok.decode(batched.tokens[i]), tok.decode(want[i]))
        alone = decoding.generate(ours, [ids], max_new_tokens=NEW_TOKENS, eos_token_id=())
        assert alone.tokens[0] == want[i], (PROMPTS[i], tok.decode(alone.tokens[0]), tok.decode(want[i]))
    # The answers are real text, not a degenerate repetition.
    for text in batched.texts:
        assert len(set(text.split())) >= 5, text
