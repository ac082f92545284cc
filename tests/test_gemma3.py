"""Gemma 3 (decoding.gemma3) against transformers' Gemma3ForCausalLM (PyTorch, float32, CPU).

Tiny random Gemma 3 text models are built with transformers (eager attention), saved with
`save_pretrained` and loaded with `decoding.load`. Their sliding window (4) is short against the
sequences (20 tokens) and local and global layers are mixed, so windows, the two rotary bases,
qk-norm, the four norms per layer, the attention scale and logit soft-capping all show in the
logits. Checked: full-sequence logits; incremental decoding through the cache; a token tree verified in
one call (ancestor mask, and the same tree as a slot mask) and committed with `cache.gather`;
greedy `decoding.generate` against transformers' greedy `generate`; speculative and tree
decoding reproducing greedy decoding; a GGUF written the way llama.cpp's converter writes Gemma 3
(norms stored as 1 + w). The real gemma-3-270m GGUF from the registry is compared with
transformers loading the same GGUF, on a ~890-token prompt (past the 512-token window), and in
24 greedy tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import decoding  # noqa: E402
from decoding import Autoregressive, Speculative, TreeDecoding, generate  # noqa: E402
from decoding.config import ConfigError  # noqa: E402
from decoding.gemma3 import Gemma3Config  # noqa: E402
from decoding.loading import load  # noqa: E402
from decoding.model import check_params, forward, init_params, param_shapes  # noqa: E402
from drafting import DraftModel, DynamicTree, LayerSkip  # noqa: E402

ATOL = 1e-4
T = 20
WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
            sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
CASES = {
    "gemma3": {},
    "softcap-linear-rope-untied": dict(
        final_logit_softcapping=2.0, tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}}),
}


def make_reference(seed: int = 0, **overrides):
    """A tiny random Gemma3ForCausalLM (float32, eager): every weight random, norms included."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**BASE, **overrides})
    model = transformers.Gemma3ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.3 if name.endswith("norm.weight") else 0.15) * torch.randn_like(p))
    return model.eval()


@functools.cache
def _pair(case: str, root: str):
    """(transformers model, our model loaded from its save_pretrained directory)."""
    ref = make_reference(**CASES[case])
    directory = Path(root) / case
    ref.save_pretrained(directory)
    return ref, load(directory, dtype=jnp.float32, tokenizer=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gemma3"))
    return lambda case="gemma3": _pair(case, root)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


_jit_forward = jax.jit(forward, static_argnums=0, static_argnames=("return_hidden", "compute_logits"))


def fwd(config, params, tokens, positions, cache, **kwargs):
    return _jit_forward(config, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                        cache, **kwargs)


def arange_positions(b, t, start=0):
    return np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (b, t))


def our_logits(model, ids, config=None) -> np.ndarray:
    b, t = ids.shape
    out = fwd(config or model.config, model.params, ids, arange_positions(b, t), model.init_cache(b, 32))
    return np.asarray(out.logits)


def tokens(batch=2, length=T, seed=0):
    return np.random.default_rng(seed).integers(0, 128, (batch, length))


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


def test_config_of_the_real_270m_hub_config():
    """The hub's gemma-3-270m config.json (transformers 4.x layout) maps field by field."""
    hub = {
        "architectures": ["Gemma3ForCausalLM"], "_sliding_window_pattern": 6, "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
        + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": 512, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
        "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
    }
    c = Gemma3Config.from_hf(hub)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window) == (
        18, 640, 4, 1, 256, 512)
    assert c.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(18))
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling, c.tie_embeddings) == (1e6, 1e4, None, True)
    assert hash(c) == hash(Gemma3Config.from_hf(hub))  # static jit argument
    # 4B-style text config inside a multimodal one: linear rope scaling on global layers only.
    text = {**hub, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    del text["layer_types"]
    c4 = Gemma3Config.from_hf({"model_type": "gemma3", "text_config": text, "boi_token_index": 255999})
    assert c4.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and c4.rope_local_scaling is None
    assert c4.layer_types == c.layer_types  # from the legacy _sliding_window_pattern
    with pytest.raises(ConfigError, match="multimodal.*vision tower.*Gemma3ForCausalLM"):
        Gemma3Config.from_hf({"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 8}})
    for bad, message in [({"use_bidirectional_attention": True}, "causal"),
                         ({"hidden_activation": "silu"}, "tanh"),
                         ({"attention_bias": True}, "bias"),
                         ({"attn_logit_softcapping": 50.0}, "qk-norm"),
                         ({"altup_num_inputs": 4}, "altup_num_inputs")]:
        with pytest.raises(ConfigError, match=message):
            Gemma3Config.from_hf({**hub, **bad})


def test_param_tree_and_init_follow_the_config():
    c = Gemma3Config.from_hf({**BASE, "model_type": "gemma3_text"})
    shapes = param_shapes(c)
    assert "lm_head" not in shapes and shapes["layers"]["q_norm"] == (4, 16)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert c.param_count() == n
    assert decoding.KVCache.init(c, 2, 8, jnp.float32).k.shape == (4, 2, 2, 8, 16)
    # init_params dispatches too (a config whose weights share few shapes: one sampler each).
    small = Gemma3Config(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=1,
                         num_kv_heads=1, head_dim=16, layer_types=("sliding_attention", "full_attention"))
    params = init_params(small, jax.random.PRNGKey(0))
    check_params(small, params)
    assert float(jnp.abs(params["layers"]["post_mlp_norm"]).max()) == 0.0  # x * (1 + 0): unit scale
    assert float(jnp.abs(params["layers"]["wqkv"]).max()) > 0.0
    assert params["layers"]["wqkv"].shape == (2, 16, 48) and params["layers"]["w_gate_up"].shape == (2, 16, 32)
    with pytest.raises(ValueError, match="q_norm"):
        check_params(small, {**params, "layers": {k: v for k, v in params["layers"].items() if k != "q_norm"}})


# ------------------------------------------------------------------------------------------
# Parity with transformers on tiny models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_full_sequence_logits_match_transformers(case, pair):
    ref, model = pair(case)
    c = model.config
    assert isinstance(c, Gemma3Config) and c.layer_types == tuple(LAYER_TYPES)
    assert c.tie_embeddings == ref.config.tie_word_embeddings == ("lm_head" not in model.params)
    ids = tokens()
    want = torch_logits(ref, ids)
    got = our_logits(model, ids)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # Each Gemma-specific setting must matter for this input, or the comparison proves nothing.
    variants = {"window": dataclasses.replace(c, sliding_window=10_000),
                "local rope base": dataclasses.replace(c, rope_local_theta=c.rope_theta),
                "attention scale": dataclasses.replace(c, query_pre_attn_scalar=float(c.head_dim))}
    if case != "gemma3":
        variants.update({"rope scaling": dataclasses.replace(c, rope_scaling=None),
                         "final softcap": dataclasses.replace(c, final_logit_softcapping=None)})
    for name, variant in variants.items():
        assert np.abs(our_logits(model, ids, variant) - want).max() > 100 * ATOL, f"{name} does not matter"


def test_multimodal_layout_with_only_a_text_config_loads(pair, tmp_path):
    """A "gemma3" config holding only a text_config, with the language model's tensor names of
    a multimodal checkpoint, loads to the same model; a vision tensor is refused by name."""
    from safetensors.numpy import load_file, save_file

    ref, model = pair()
    saved, directory = tmp_path / "text", tmp_path / "multimodal"
    ref.save_pretrained(saved)
    directory.mkdir()
    text = json.loads((saved / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(saved / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors")
    other = load(directory, dtype=jnp.float32, tokenizer=False)
    assert other.config == model.config
    for k in model.params["layers"]:
        np.testing.assert_array_equal(np.asarray(other.params["layers"][k]), np.asarray(model.params["layers"][k]))
    tensors["model.vision_tower.patch_embedding.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(decoding.loading.LoadError, match="vision_tower"):
        load(directory, dtype=jnp.float32, tokenizer=False)


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def write_gemma3_gguf(model, path: Path) -> Path:
    """A float32 GGUF laid out as llama.cpp's Gemma 3 converter writes it: tensor names of
    gguf-py's map, no Q/K permutation, every norm weight stored as 1 + w, no layer pattern or
    attention scalar in the metadata (llama.cpp hard-codes them)."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_parameters["full_attention"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_sliding_window(c.sliding_window)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, kind = name.rsplit(".", 1)
        w = tensor.detach().numpy().astype(np.float32)
        if base.startswith("model.layers."):
            i, rest = base[len("model.layers."):].split(".", 1)
            out = f"blk.{i}.{GGUF_LAYER_NAMES[rest]}.{kind}"
        else:
            out = f"{GGUF_NAMES[base]}.{kind}"
        if base.endswith("norm"):
            w = w + np.float32(1.0)
        writer.add_tensor(out, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_handwritten_gemma3_gguf(tmp_path, monkeypatch):
    """The GGUF path offline: norms stored as 1 + w, llama.cpp's 5 local : 1 global pattern and
    its attention scalar (head_dim) recovered from a file that records neither."""
    monkeypatch.setenv("DECODING_CACHE_DIR", str(tmp_path / "cache"))
    six = ["sliding_attention"] * 5 + ["full_attention"]
    ref = make_reference(num_hidden_layers=6, layer_types=six, query_pre_attn_scalar=16, seed=4)
    model = load(write_gemma3_gguf(ref, tmp_path / "tiny-gemma3.gguf"), dtype=jnp.float32, tokenizer=False)
    c = model.config
    assert c.layer_types == tuple(six) and c.query_pre_attn_scalar == 16 and c.sliding_window == WINDOW
    assert (c.rope_local_theta, c.rope_theta, c.tie_embeddings) == (10_000.0, 1_000_000.0, True)
    ids = tokens(seed=6)
    np.testing.assert_allclose(our_logits(model, ids), torch_logits(ref, ids), atol=ATOL, rtol=0)


def test_incremental_decode_matches_full_pass(pair):
    """Prefill, token-by-token steps and chunks, crossing the window, equal one full pass."""
    ref, model = pair()
    ids = tokens(seed=1)
    want = torch_logits(ref, ids)
    cache, start, got = model.init_cache(2, 32), 0, []
    for t in [4, 1, 1, 1, 1, 4, 4, 4]:
        out = fwd(model.config, model.params, ids[:, start:start + t], arange_positions(2, t, start), cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
        start += t
    assert np.asarray(cache.lengths).tolist() == [T, T]
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=ATOL, rtol=0)


def test_layer_ranges_hidden_states_and_unrolled_layers(pair, monkeypatch):
    """run_layers over split ranges (injecting the stream at layer k) equals the full stack;
    hidden[i] is the stream after i layers; the unrolled layer loop (accelerators) equals the
    scanned one (CPU)."""

    _, model = pair()
    c, p = model.config, model.params
    ids = jnp.asarray(tokens(seed=5), jnp.int32)
    pos = jnp.asarray(arange_positions(2, T))
    out = fwd(c, p, ids, pos, model.init_cache(2, 32), return_hidden=(0, 1, 2, 4))
    x0 = decoding.embed(c, p, ids)
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(x0))
    run = jax.jit(decoding.run_layers, static_argnums=0, static_argnames=("layers", "return_hidden"))
    x, hidden, cache = run(c, p, x0, pos, model.init_cache(2, 32), layers=(0, 2), return_hidden=(1, 2))
    np.testing.assert_allclose(np.asarray(hidden[1]), np.asarray(out.hidden[1]), atol=1e-5, rtol=0)
    x, _, cache = run(c, p, x, pos, cache, layers=(2, 4))
    np.testing.assert_allclose(np.asarray(x), np.asarray(out.hidden[4]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(out.cache.k), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decoding.unembed(c, p, x)), np.asarray(out.logits), atol=1e-5, rtol=0)
    unrolled = jax.jit(forward, static_argnums=0, static_argnames=("return_hidden", "options"))(
        c, p, ids, pos, model.init_cache(2, 32), return_hidden=(2,), options=decoding.Options(unroll_layers=True))
    np.testing.assert_allclose(np.asarray(unrolled.logits), np.asarray(out.logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(unrolled.hidden[2]), np.asarray(out.hidden[2]), atol=1e-5, rtol=0)


# A token tree per row: parent of each node (-1 = child of the committed prefix).
TREES = [[-1, 0, 0, 1, 1, 2, 5, 6], [-1, 0, 1, 2, 3, 4, 5, 6]]  # depth 4 and a chain of 8 > WINDOW


def _tree_tables(parents):
    depth, mask, paths = np.zeros(len(parents), np.int32), np.zeros((len(parents),) * 2, bool), []
    for i, p in enumerate(parents):
        paths.append([i] if p < 0 else paths[p] + [i])
        depth[i] = len(paths[i]) - 1
        mask[i, paths[i]] = True
    return depth, mask, paths


def _last_logits(ref, seqs):
    """transformers' logits of the last token of each sequence (one right-padded batch)."""
    width = max(len(s) for s in seqs)
    padded = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    logits = torch_logits(ref, padded)
    return np.stack([logits[i, len(s) - 1] for i, s in enumerate(seqs)])


def test_tree_verification_gives_each_node_the_logits_of_its_path(pair):
    """Node i of a tree block (ancestor mask, positions prefix + depth) sees exactly its
    root-to-node path after the prefix, with windows measured in positions; the same tree as
    a slot mask gives the same logits; committing a path with `gather` then decoding on
    equals feeding that path as a plain sequence."""
    ref, model = pair()
    c, p = model.config, model.params
    rng = np.random.default_rng(3)
    prefix_lens = np.array([9, 6], np.int32)
    padded = rng.integers(0, 128, (2, 9))  # row 1's last 3 tokens are garbage, left stale
    cache = fwd(c, p, padded, arange_positions(2, 9), model.init_cache(2, 32)).cache
    cache = cache.truncate(jnp.asarray(prefix_lens))

    tables = [_tree_tables(t) for t in TREES]
    n = len(TREES[0])
    block = rng.integers(0, 128, (2, n))
    positions = np.stack([prefix_lens[b] + tables[b][0] for b in range(2)])
    mask = np.stack([tables[b][1] for b in range(2)])
    out = fwd(c, p, block, positions, cache, mask=jnp.asarray(mask))
    seqs = [np.concatenate([padded[b, : prefix_lens[b]], block[b, path]]) for b in range(2)
            for path in tables[b][2]]
    want = _last_logits(ref, seqs).reshape(2, n, -1)
    np.testing.assert_allclose(np.asarray(out.logits), want, atol=ATOL, rtol=0)

    slot_mask = np.broadcast_to(np.arange(32)[None, None, :] < prefix_lens[:, None, None], (2, n, 32)).copy()
    for b in range(2):
        slot_mask[b, :, prefix_lens[b]: prefix_lens[b] + n] |= mask[b]
    by_slots = fwd(c, p, block, positions, cache, slot_mask=jnp.asarray(slot_mask))
    np.testing.assert_allclose(np.asarray(by_slots.logits), want, atol=ATOL, rtol=0)

    accepted = [[0, 2, 5, 6, 7], [0, 1, 2]]
    src = np.zeros((2, 5), np.int32)
    for b, a in enumerate(accepted):
        src[b, : len(a)] = a
    count = np.array([len(a) for a in accepted], np.int32)
    committed = out.cache.gather(jnp.asarray(src), jnp.asarray(count), base=jnp.asarray(prefix_lens))
    nxt = rng.integers(0, 128, (2, 1))
    res = fwd(c, p, nxt, np.asarray(committed.lengths)[:, None], committed)
    seqs = [np.concatenate([padded[b, : prefix_lens[b]], block[b, accepted[b]], nxt[b]]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(res.logits)[:, 0], _last_logits(ref, seqs), atol=ATOL, rtol=0)


PROMPTS = [[2, 17, 99, 5, 64, 3, 81, 12, 40], [2, 33, 7]]
MAX_NEW = 17
EOS = 1


def _cut(row, eos=EOS):
    return row[: row.index(eos) + 1] if eos in row else row


def test_greedy_generate_matches_transformers(pair):
    ref, model = pair()
    out = generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=EOS)
    for prompt, got in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            seq = ref.generate(torch.as_tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                               eos_token_id=EOS, pad_token_id=0)
        want = _cut(seq[0, len(prompt):].tolist())
        assert got == want
    assert any(len(r) > WINDOW + len(p) for r, p in zip(out.tokens, PROMPTS))  # decoding past the window


def _noisy(model):
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [w + 0.02 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)]
    return decoding.Model(model.config, jax.tree_util.tree_unflatten(treedef, noisy), source="noisy")


@pytest.mark.parametrize("strategy, with_draft", [
    (Speculative(LayerSkip(layers=2), gamma=3), False),
    (TreeDecoding(DraftModel(), tree=DynamicTree(depth=3, top_k=2, total_tokens=6)), True),
], ids=["chain-layerskip", "dynamic-tree-draftmodel"])
def test_speculative_and_tree_decoding_reproduce_greedy(strategy, with_draft, pair):
    """Every algorithm runs Gemma 3 unchanged: lossless greedy speculative / tree decoding."""
    _, model = pair()
    want = generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=(), strategy=Autoregressive()).tokens
    draft = _noisy(model) if with_draft else None
    got = generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=(), strategy=strategy, draft=draft)
    assert got.tokens == want
    assert got.stats.tau > 1.0  # drafts were accepted, so verification really ran on blocks


# ------------------------------------------------------------------------------------------
# The real gemma-3-270m GGUF
# ------------------------------------------------------------------------------------------

GGUF_ATOL = 5e-4  # float32 against float32 over 18 layers; logits are O(10)
GREEDY_PROMPT = "The history of the printing press begins in"
GREEDY_NEW = 24
LONG_PROMPT_CHARS = 2600  # ~890 tokens of the json package's source: past the 512-token window


def _long_prompt() -> str:
    import json as json_module

    return Path(json_module.__file__).read_text()[:LONG_PROMPT_CHARS]


def _transformers_reference(path: Path) -> dict:
    """transformers on the GGUF: long-prompt ids and logits at chosen positions, and greedy
    continuation ids. Kept under the registry cache keyed by the file's sha256, the prompts and
    the versions of transformers, torch and gguf (building the model takes ~30 s on 2 cores)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoding import registry
    from decoding.loading import gguf_sha256

    long_prompt = _long_prompt()
    versions = [transformers.__version__, torch.__version__, getattr(gguf, "__version__", "")]
    key = json.dumps([gguf_sha256(path), long_prompt, GREEDY_PROMPT, GREEDY_NEW, versions])
    file = registry.cache_dir() / "reference" / f"gemma3-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if file.is_file():
        with np.load(file) as ref:
            return dict(ref)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = np.asarray([tok(long_prompt)["input_ids"]])
    t = ids.shape[1]
    picks = np.asarray(sorted({0, 100, 250, 400, 511, 512, 513, 600, t - 3, t - 2, t - 1}), np.int64)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids), logits_to_keep=torch.as_tensor(picks)).logits.float().numpy()
        prompt = tok(GREEDY_PROMPT, return_tensors="pt")["input_ids"]
        seq = model.generate(prompt, max_new_tokens=GREEDY_NEW, do_sample=False)
    out = dict(ids=ids, picks=picks, logits=logits, greedy_prompt=prompt.numpy(),
               greedy=seq[0, prompt.shape[1]:].numpy(), eos=np.asarray(model.generation_config.eos_token_id))
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, **out)
    return out


@pytest.mark.slow  # fetches a 250 MB checkpoint and builds transformers' model of it (accelerate)
def test_gemma_270m_gguf_matches_transformers(gemma_gguf):
    ref = _transformers_reference(gemma_gguf)
    model = load(gemma_gguf, dtype=jnp.float32, tokenizer=False)
    c = model.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size,
            c.sliding_window) == ("gemma3_text", 18, 640, 4, 1, 256, 262144, 512)
    assert c.layer_types.count("full_attention") == 3 and c.tie_embeddings and model.source == str(gemma_gguf)

    ids, picks = ref["ids"], ref["picks"]
    assert ids.shape[1] > 600, "the prompt must reach past the sliding window"
    forward_at = jax.jit(lambda cfg, params, ids, cache: forward(
        cfg, params, ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None], cache,
        logit_indices=jnp.asarray(picks[None], jnp.int32)).logits, static_argnums=0)
    cache = model.init_cache(1, ids.shape[1])
    got = np.asarray(forward_at(c, model.params, jnp.asarray(ids, jnp.int32), cache))
    want = ref["logits"]
    np.testing.assert_allclose(got, want, atol=GGUF_ATOL, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # The window matters from position 512 on (key 0 leaves the local layers' view), not before.
    unwindowed = np.asarray(forward_at(dataclasses.replace(c, sliding_window=1 << 20), model.params,
                                       jnp.asarray(ids, jnp.int32), cache))
    late = picks >= 512
    assert np.abs(unwindowed[0, late] - want[0, late]).max(-1).min() > 100 * GGUF_ATOL
    np.testing.assert_allclose(unwindowed[0, ~late], want[0, ~late], atol=GGUF_ATOL, rtol=0)

    eos = tuple(np.atleast_1d(ref["eos"]).tolist())
    out = generate(model, ref["greedy_prompt"].tolist(), max_new_tokens=GREEDY_NEW, eos_token_id=eos)
    want_tokens = ref["greedy"].tolist()
    assert out.tokens[0] == want_tokens[: len(out.tokens[0])] and len(out.tokens[0]) == GREEDY_NEW
