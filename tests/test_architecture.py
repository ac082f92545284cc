"""decoding.architecture: a model family is one registered object, and a new one runs every
algorithm without touching the library.

The toy family below is the Llama family with a GELU-gated MLP (GeGLU instead of SwiGLU),
declared and registered in this file alone, as docs/interface.md ("Adding an architecture")
describes; its forward is checked against the independent numpy reference of tests/tiny.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from decoding import architecture, llama
from decoding.config import ModelConfig
from decoding.model import init_params, param_shapes
from tiny import numpy_forward, tiny_config, tiny_params


@dataclasses.dataclass(frozen=True)
class GeluLlamaConfig(ModelConfig):
    """The Llama family's hyper-parameters under their own type (the registry key)."""

    model_type: str = "toy-gelu-llama"


def _config_from_hf(cfg):
    base = ModelConfig.from_hf({**cfg, "model_type": "llama"})
    return GeluLlamaConfig(**{**dataclasses.asdict(base), "model_type": "toy-gelu-llama"})


TOY = architecture.register(dataclasses.replace(
    llama.LLAMA,
    name="toy-gelu-llama",
    config_type=GeluLlamaConfig,
    model_types=("toy-gelu-llama",),
    config_from_hf=_config_from_hf,
    layer=functools.partial(llama.layer, activation=functools.partial(jax.nn.gelu, approximate=True)),
    gguf_arches={},
))


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def toy_model(seed=0):
    base = tiny_config()
    config = GeluLlamaConfig(**{**dataclasses.asdict(base), "model_type": "toy-gelu-llama"})
    return decoding.Model(config=config, params=tiny_params(base, seed), source="toy")


def test_lookups_find_each_family():
    assert architecture.for_config(tiny_config()) is llama.LLAMA
    assert architecture.for_config(decoding.Gemma3Config(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
        head_dim=8, layer_types=("full_attention",))).name == "gemma3"
    assert architecture.for_model_type("qwen2") is llama.LLAMA
    assert architecture.for_model_type("gemma3_text").name == "gemma3"
    assert architecture.for_gguf_arch("mistral") is llama.LLAMA
    assert architecture.for_config(toy_model().config) is TOY
    assert isinstance(architecture.config_from_hf({"model_type": "toy-gelu-llama", "hidden_size": 32,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "intermediate_size": 64, "num_hidden_layers": 2,
                                                   "vocab_size": 96}), GeluLlamaConfig)


def test_unknown_configs_and_clashing_registrations_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        num_layers: int = 1

    with pytest.raises(TypeError, match="no architecture is registered for a config of type Unregistered.*register"):
        decoding.forward(Unregistered(), {}, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), None)
    with pytest.raises(decoding.ConfigError, match="model_type='gpt2'.*supported: .*llama"):
        architecture.for_model_type("gpt2")
    with pytest.raises(ValueError, match="model_type 'llama' \\(served by 'llama'\\)"):
        architecture.register(dataclasses.replace(TOY, name="clash", model_types=("llama",)))
    assert architecture.register(TOY) is TOY  # the same object again changes nothing


def test_toy_family_forward_matches_the_numpy_reference():
    model = toy_model()
    assert param_shapes(model.config) == param_shapes(tiny_config())
    tokens = jnp.array([[5, 17, 3, 60, 2, 9]], jnp.int32)
    positions = jnp.arange(6, dtype=jnp.int32)[None]
    cache = model.init_cache(1, 16)
    out = decoding.forward(model.config, model.params, tokens, positions, cache, return_hidden=(1,))
    want, hidden = numpy_forward(tiny_config(), model.params, tokens[0], activation=_np_gelu)
    np.testing.assert_allclose(np.asarray(out.logits[0]), want, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(out.hidden[1][0]), hidden[1], rtol=2e-4, atol=2e-4)
    silu, _ = numpy_forward(tiny_config(), model.params, tokens[0])
    assert np.abs(silu - want).max() > 1e-2, "the toy's activation must change the logits"
    # the same parameters under the Llama config run the Llama layer
    llama_logits = decoding.forward(tiny_config(), model.params, tokens, positions, cache).logits
    np.testing.assert_allclose(np.asarray(llama_logits[0]), silu, rtol=2e-4, atol=2e-4)
    # random init follows the family's declaration and norm unit
    params = init_params(model.config, jax.random.PRNGKey(0))
    assert np.all(np.asarray(params["layers"]["attn_norm"]) == TOY.norm_unit)


def test_toy_family_runs_generate_with_chains_and_trees():
    """Greedy autoregressive, speculative (a chain) and tree decoding of the toy family give the
    numpy reference's greedy continuation."""
    from drafting import DraftModel, DynamicTree

    model, draft = toy_model(seed=1), toy_model(seed=2)
    prompts = [[3, 9, 4, 1, 7], [5, 2]]
    want = [numpy_greedy_gelu(model.params, p, 6) for p in prompts]
    ar = decoding.generate(model, prompts, max_new_tokens=6, eos_token_id=())
    assert ar.tokens == want
    for strategy in (decoding.Speculative(DraftModel(), gamma=3),
                     decoding.TreeDecoding(DraftModel(), tree=DynamicTree(depth=2, top_k=2, total_tokens=4))):
        out = decoding.generate(model, prompts, strategy=strategy, draft=draft, max_new_tokens=6, eos_token_id=())
        assert out.tokens == want, type(strategy).__name__


def numpy_greedy_gelu(params, prompt, n):
    seq, out = list(prompt), []
    for _ in range(n):
        logits, _ = numpy_forward(tiny_config(), params, seq, activation=_np_gelu)
        out.append(int(np.argmax(logits[-1])))
        seq.append(out[-1])
    return out
