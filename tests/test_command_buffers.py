"""The opt-in XLA:GPU command buffers of the whole-generation program (`Options.command_buffers`).

On a CPU the option is accepted and ignored, so what is checked here is the plumbing: the
setting reaches the compiler, keys the compiled-program cache (no program compiled under one
setting is reused under another), leaves the tokens unchanged, and a bad value is a clear error.
"""

import jax
import pytest

import decoding
from decoding import Options, generation
from tiny import tiny_model


def test_command_buffers_key_the_compiled_program_and_keep_the_tokens(monkeypatch):
    model = tiny_model(seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    assert Options().compiler_options() is None
    plain = decoding.generate(model, prompts, max_new_tokens=6)
    n = generation.compile_count()
    decoding.generate(model, prompts, max_new_tokens=6, options=Options())
    assert generation.compile_count() == n  # same setting: reused
    seen = {}
    real_compile = jax.stages.Lowered.compile

    def spy(self, compiler_options=None):
        seen["options"] = compiler_options
        return real_compile(self, compiler_options=compiler_options)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    graphs = decoding.generate(model, prompts, max_new_tokens=6, options=Options(command_buffers="while"))
    assert generation.compile_count() == n + 1  # another program, not the one compiled without it
    assert "WHILE" in seen["options"]["xla_gpu_enable_command_buffer"].split(",")
    assert "CONDITIONAL" in seen["options"]["xla_gpu_enable_command_buffer"].split(",")
    assert graphs.tokens == plain.tokens


def test_a_bad_command_buffer_list_is_a_clear_error():
    with pytest.raises(ValueError, match="command_buffers.*NOT_A_KIND"):
        Options(command_buffers="WHILE,NOT_A_KIND")
    with pytest.raises(ValueError, match="attention"):
        Options(attention="cuda")
