"""The opt-in XLA:GPU command buffers of the whole-generation program (`COMMAND_BUFFERS`).

On a CPU the option is accepted and ignored, so what is checked here is the plumbing: the
setting reaches the compiler, keys the compiled-program cache (no program compiled under one
setting is reused under another), leaves the tokens unchanged, and a bad value is a clear error.
"""

import jax
import pytest

import decoding
from decoding import generation
from tiny import tiny_model


def test_command_buffers_key_the_compiled_program_and_keep_the_tokens(monkeypatch):
    model = tiny_model(seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    monkeypatch.setattr(generation, "COMMAND_BUFFERS", "")
    assert generation.compiler_options() is None
    plain = decoding.generate(model, prompts, max_new_tokens=6)
    n = generation.compile_count()
    decoding.generate(model, prompts, max_new_tokens=6)
    assert generation.compile_count() == n  # same setting: reused
    seen = {}
    real_compile = jax.stages.Lowered.compile

    def spy(self, compiler_options=None):
        seen["options"] = compiler_options
        return real_compile(self, compiler_options=compiler_options)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    monkeypatch.setattr(generation, "COMMAND_BUFFERS", "while")
    graphs = decoding.generate(model, prompts, max_new_tokens=6)
    assert generation.compile_count() == n + 1  # another program, not the one compiled without it
    assert "WHILE" in seen["options"]["xla_gpu_enable_command_buffer"].split(",")
    assert "CONDITIONAL" in seen["options"]["xla_gpu_enable_command_buffer"].split(",")
    assert graphs.tokens == plain.tokens


def test_a_bad_command_buffer_list_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(generation, "COMMAND_BUFFERS", "WHILE,NOT_A_KIND")
    with pytest.raises(ValueError, match="COMMAND_BUFFERS"):
        decoding.generate(tiny_model(seed=4), [[1, 2]], max_new_tokens=3)
