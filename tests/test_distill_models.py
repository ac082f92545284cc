"""Tiny teacher/student pairs for the distill tests, and the drafter export round trip.

The models are random transformers Qwen2 networks saved with `save_pretrained` beside a tiny
byte-level BPE tokenizer with a ChatML template, and loaded through `decoding.load` (the real
loader). `pair()` builds (teacher, student) once per process; other distill test modules
import it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("Janet sells 16 eggs a day. She eats three for breakfast and bakes muffins with four. "
          "The remainder is sold at the market for 2 dollars each, so she makes 18 dollars a day. "
          "Question: How many apples are left? Answer: There are 7 apples left, because 10 - 3 = 7. "
          "Write a short poem about the sea: the waves roll in, the gulls cry out, the tide goes away. ")
VOCAB = 320

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}: how many eggs does Janet sell in {i} days?"},
     {"role": "assistant", "content": f"She sells 16 eggs a day, so {16 * i} eggs in {i} days."}]
    for i in range(1, 40)
] + [
    [{"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The waves roll in, the gulls cry out."},
     {"role": "user", "content": "And the tide?"},
     {"role": "assistant", "content": "The tide goes away."}],
]


@functools.lru_cache(maxsize=None)
def tokenizer(vocab: int = VOCAB, corpus: str = CORPUS):
    """A byte-level BPE tokenizer of `vocab` ids with ChatML specials (EOS <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus] * 10, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def save_tiny(directory: Path, layers: int, seed: int, tok, scale: float = 0.3, hidden: int = 32) -> Path:
    """A random transformers Qwen2 model over `tok`, saved with its tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, use_sliding_window=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else scale * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@functools.lru_cache(maxsize=None)
def pair():
    """(teacher: 2 layers, student: 1 layer), float32, loaded with `decoding.load`."""
    root = Path(tempfile.mkdtemp(prefix="distill_pair_"))
    tok = tokenizer()
    teacher = decoding.load(str(save_tiny(root / "teacher", 2, 0, tok)), dtype=jnp.float32)
    student = decoding.load(str(save_tiny(root / "student", 1, 1, tok, scale=0.1)), dtype=jnp.float32)
    return teacher, student


@functools.lru_cache(maxsize=None)
def pruned_student():
    """The teacher cut to its first layer (a draft of the same family), written with
    `distill.export_drafter` and loaded back through `decoding.load`."""
    import dataclasses

    from distill import export_drafter, load_drafter

    teacher, _ = pair()
    config = dataclasses.replace(teacher.config, num_layers=1)
    params = {**teacher.params, "layers": jax.tree.map(lambda x: x[:1], teacher.params["layers"])}
    root = Path(tempfile.mkdtemp(prefix="distill_pruned_"))
    return load_drafter(export_drafter(config, params, root / "pruned", teacher.tokenizer, dtype="float32"),
                        dtype=jnp.float32)


def test_export_round_trip(tmp_path):
    """A drafter exported by distill loads back through decoding.load with the same logits and
    the same tokenizer, and drafts for its target in Speculative and TreeDecoding."""
    import drafting
    from distill import export_drafter, load_drafter
    from distill.data import chat_ids

    teacher, student = pair()
    params = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                          student.params)
    out = export_drafter(student.config, params, tmp_path / "drafter", student.tokenizer, dtype="float32")
    back = load_drafter(out, dtype=jnp.float32)
    assert back.config == student.config
    assert back.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt = [chat_ids(teacher.tokenizer, [{"role": "user", "content": "How many eggs?"}], True)]
    plain = decoding.generate(teacher, prompt, max_new_tokens=12, eos_token_id=())
    spec = decoding.generate(teacher, prompt, strategy=decoding.Speculative(drafting.DraftModel(), gamma=3),
                             draft=back, max_new_tokens=12, eos_token_id=())
    assert spec.tokens == plain.tokens


@pytest.mark.slow
def test_exported_drafter_drafts_trees(tmp_path):
    import drafting
    from distill import export_drafter, load_drafter
    from distill.data import chat_ids

    teacher, student = pair()
    back = load_drafter(export_drafter(student.config, student.params, tmp_path / "d", student.tokenizer), dtype=jnp.float32)
    prompt = [chat_ids(teacher.tokenizer, [{"role": "user", "content": "How many eggs?"}], True)]
    plain = decoding.generate(teacher, prompt, max_new_tokens=12, eos_token_id=())
    tree = decoding.generate(teacher, prompt, strategy=decoding.TreeDecoding(
        drafting.DraftModel(), tree=decoding.DynamicTree(depth=2, top_k=2, total_tokens=4)),
        draft=back, max_new_tokens=12, eos_token_id=())
    assert tree.tokens == plain.tokens


def test_export_bf16_halves_the_file(tmp_path):
    from distill import export_drafter, load_drafter

    _, student = pair()
    f32 = export_drafter(student.config, student.params, tmp_path / "f32", student.tokenizer, dtype="float32")
    b16 = export_drafter(student.config, student.params, tmp_path / "b16", student.tokenizer)
    assert (b16 / "model.safetensors").stat().st_size < 0.6 * (f32 / "model.safetensors").stat().st_size
    back = load_drafter(b16, dtype=jnp.float32)
    want = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), student.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
