"""`decoding.Options`: the static switches of a traced program, validated, hashable and read
from the environment only by `Options.from_env` (command lines)."""

import pytest

from decoding import Options


def test_options_are_hashable_values_and_resolve_the_layer_loop_by_backend():
    assert hash(Options()) == hash(Options()) and Options() == Options()
    assert Options(attention="pallas") != Options()
    resolved = Options().resolved()
    assert resolved.unroll_layers is False  # the test backend is the CPU: a scan compiles fastest
    assert Options(unroll_layers=True).resolved().unroll_layers is True
    assert resolved.resolved() is resolved


def test_compiler_options_of_command_buffers():
    assert Options().compiler_options() is None and Options(command_buffers="default").compiler_options() is None
    kinds = Options(command_buffers="while").compiler_options()["xla_gpu_enable_command_buffer"].split(",")
    assert {"WHILE", "CONDITIONAL", "FUSION"} <= set(kinds)
    assert Options(command_buffers="FUSION,WHILE").compiler_options() == {"xla_gpu_enable_command_buffer": "FUSION,WHILE"}


def test_from_env_reads_the_three_variables_and_refuses_bad_values():
    env = {"DECODING_ATTENTION": "pallas", "DECODING_UNROLL_LAYERS": "1", "DECODING_COMMAND_BUFFERS": "while"}
    assert Options.from_env(env) == Options(attention="pallas", unroll_layers=True, command_buffers="while")
    assert Options.from_env({}) == Options()
    assert Options.from_env({"DECODING_UNROLL_LAYERS": "0"}).unroll_layers is False
    with pytest.raises(ValueError, match="DECODING_UNROLL_LAYERS"):
        Options.from_env({"DECODING_UNROLL_LAYERS": "maybe"})
    with pytest.raises(ValueError, match="attention must be one of"):
        Options.from_env({"DECODING_ATTENTION": "cuda"})
    with pytest.raises(ValueError, match="unroll_layers"):
        Options(unroll_layers="yes")
