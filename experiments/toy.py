"""A tiny random target for trying the harness without weights ("--target toy").

`ByteTokenizer` is a byte-level tokenizer with the handful of methods the harness and
`decoding.generate` use (encode, decode, a ChatML-style chat template, EOS, vocabulary); the
models are random Llama-family networks over its 259-token vocabulary, so runs finish in
seconds on a CPU. Their outputs are noise: use them to exercise the machinery, never to
report a figure.
"""

from __future__ import annotations

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
TOY_NAMES = {"toy": dict(layers=2, seed=0), "toy-draft": dict(layers=1, seed=1)}


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; then <|im_start|>, <|im_end|> (EOS), <|endoftext|>."""

    chat_template = "chatml"  # any non-empty value: `decoding.generate` only checks presence

    def __init__(self):
        self._vocab = {f"<0x{i:02X}>": i for i in range(256)}
        self._vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
        self.all_special_tokens = list(SPECIALS)
        self.eos_token_id = self._vocab["<|im_end|>"]
        self.pad_token_id = self._vocab["<|endoftext|>"]

    def __len__(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        del add_special_tokens
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[i - 256])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True, **_):
        start, end = self._vocab["<|im_start|>"], self._vocab["<|im_end|>"]
        ids: list[int] = []
        for m in messages:
            ids += [start, *self.encode(f"{m['role']}\n{m['content']}"), end, *self.encode("\n")]
        if add_generation_prompt:
            ids += [start, *self.encode("assistant\n")]
        return ids if tokenize else self.decode(ids)


def toy_config(layers: int = 2):
    """A ModelConfig small enough to compile and run in about a second on a CPU."""
    from decoding import ModelConfig

    return ModelConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=8192, model_type="llama")


def load_toy(name: str = "toy"):
    """A random `decoding.Model` with a `ByteTokenizer` ('toy': 2 layers, 'toy-draft': 1 layer).

    Weights come from numpy's generator (seeded per name), which is much quicker than
    `decoding.init_params` on a CPU; norms are ones, as there.
    """
    import jax
    import numpy as np

    from decoding import Model
    from decoding.model import check_params, param_shapes

    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy model {name!r}; known: {', '.join(TOY_NAMES)}.")
    spec = TOY_NAMES[name]
    config = toy_config(spec["layers"])
    rng = np.random.default_rng(spec["seed"])

    def init(path, shape):
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf.endswith("norm"):
            return np.ones(shape, np.float32)
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    check_params(config, params)
    return Model(config=config, params=params, tokenizer=ByteTokenizer(), source=name)
