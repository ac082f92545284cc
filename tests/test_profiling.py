"""The phase profiler compiles each phase of a round separately and reports all of them."""

import jax
import pytest

from decoding import Autoregressive, Model, ModelConfig, Speculative, init_params
from decoding.profiling import phase_times, split_run_time
from drafting import PromptLookup


def test_phase_times_reports_every_phase_and_splits_a_run():
    c = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8)
    m = Model(c, init_params(c, jax.random.PRNGKey(0)))
    ph = phase_times(m, [[1, 2, 1, 2, 1]], Speculative(PromptLookup(), gamma=3), repeats=2, max_new_tokens=8)
    assert set(ph) == {"propose_ms", "verify_ms", "accept_commit_ms", "round_ms"}
    assert all(v > 0 for v in ph.values())
    split = split_run_time(ph, 2.0)
    assert sum(split.values()) == pytest.approx(2.0)
    assert split["verify_s"] / split["propose_s"] == pytest.approx(ph["verify_ms"] / ph["propose_ms"])


def test_phase_times_refuses_a_strategy_without_phases():
    c = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8)
    m = Model(c, init_params(c, jax.random.PRNGKey(0)))
    with pytest.raises(TypeError, match="no propose/verify phases"):
        phase_times(m, [[1, 2]], Autoregressive())
