"""decoding.sharding: logical axes, rules and their checks (this process), and the sharded
runs on 8 simulated devices (tests/sharded_cases.py, in a subprocess).

The 8-device suite runs in a subprocess because XLA_FLAGS=--xla_force_host_platform_device_count=8
must be set before jax starts its backend, and setting it for the whole suite slowed a
single-device test file by about 10% on 2 cores. The subprocess runs the default selection
(under ~3 minutes); `-m slow` runs the full cross product of meshes and strategies and the
heavier sharded training cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import decoding
from decoding import Gemma3Config, ModelConfig, sharding
from decoding.model import param_shapes

HERE = Path(__file__).resolve().parent
LLAMA = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=16,
                    num_kv_heads=8, head_dim=8, qkv_bias=True, max_position_embeddings=256)
GEMMA = Gemma3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8,
                     num_kv_heads=8, head_dim=16, layer_types=("sliding_attention", "full_attention"))


def mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"))


@pytest.mark.parametrize("config", [LLAMA, GEMMA, ModelConfig(**{**LLAMA.__dict__, "qkv_bias": False,
                                                                    "tie_embeddings": True})],
                         ids=["llama-bias", "gemma3", "llama-tied"])
def test_every_parameter_declares_its_logical_axes(config):
    shapes, axes = param_shapes(config), sharding.param_axes(config)
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(shapes, is_leaf=is_tuple) == jax.tree.structure(axes, is_leaf=is_tuple)
    for shape, ax in zip(jax.tree.leaves(shapes, is_leaf=is_tuple), jax.tree.leaves(axes, is_leaf=is_tuple)):
        assert len(shape) == len(ax) and set(ax) - {None} <= set(sharding.LOGICAL_AXES)
    for name, ax in axes["layers"].items():
        assert ax[0] == "layers", name


def test_default_rules_give_tensor_and_data_parallel_specs():
    specs = sharding.param_specs(LLAMA, mesh(2, 4))
    assert specs["embed"] == P("model") and specs["lm_head"] == P(None, "model")
    assert specs["layers"]["wo"] == P(None, "model") and specs["layers"]["w_down"] == P(None, "model")
    # fused projections: their input axis D, never the q/k/v (gate/up) blocks of the output axis
    assert specs["layers"]["wqkv"] == P(None, "model") and specs["layers"]["w_gate_up"] == P(None, "model")
    assert specs["layers"]["bqkv"] == P() and specs["layers"]["attn_norm"] == P()
    kv, lengths = sharding.cache_spec(LLAMA, mesh(2, 4), sharding.DEFAULT_RULES, batch_size=6, capacity=128)
    assert kv == P(None, "data", "model") and lengths == P("data")
    # mesh axes of size 1 shard nothing
    assert all(s == P() for s in jax.tree.leaves(sharding.param_specs(LLAMA, mesh(8, 1)),
                                                  is_leaf=lambda x: isinstance(x, P)))
    gemma = sharding.param_specs(GEMMA, mesh(1, 8))
    assert gemma["layers"]["q_norm"] == P() and gemma["layers"]["wo"] == P(None, "model")


def test_a_rule_that_does_not_divide_names_the_axis_and_sizes():
    twelve = ModelConfig(**{**LLAMA.__dict__, "num_heads": 12, "num_kv_heads": 4})
    with pytest.raises(sharding.ShardingError, match=r"'heads' has 12 units .*'model' of size 8"):
        sharding.param_specs(twelve, mesh(1, 8))
    # heads x head_dim = 96 would divide by 8; the count checked is the heads'
    with pytest.raises(sharding.ShardingError, match=r"'heads' has 12"):
        sharding.param_specs(twelve, mesh(1, 8), sharding.DEFAULT_RULES.replace(vocab=None, mlp=None))
    with pytest.raises(sharding.ShardingError, match=r"'kv_heads' has 4 .*'model' of size 8"):
        sharding.cache_spec(twelve, mesh(1, 8), sharding.DEFAULT_RULES.replace(heads=None), 8, 128)
    with pytest.raises(sharding.ShardingError, match=r"'batch' has 3 .*'data' of size 2"):
        sharding.cache_spec(LLAMA, mesh(2, 4), sharding.DEFAULT_RULES, 3, 128)
    # the fix the message suggests works
    ok = sharding.param_specs(twelve, mesh(1, 8), sharding.DEFAULT_RULES.replace(heads=None))
    assert ok["layers"]["wo"] == P()


def test_rules_refuse_unknown_names():
    with pytest.raises(sharding.ShardingError, match="unknown logical axes"):
        sharding.Rules.of({"head": "model"})
    with pytest.raises(sharding.ShardingError, match="lacks"):
        sharding.param_specs(LLAMA, mesh(2, 4), sharding.Rules.of({"heads": "tensor"}))
    assert hash(sharding.DEFAULT_RULES) == hash(sharding.Rules.of(dict(sharding.DEFAULT_RULES.table)))


def test_without_a_mesh_nothing_changes():
    assert decoding.Model(LLAMA, {}).layout is None
    with pytest.raises(ValueError, match="pass mesh="):
        decoding.load("unused", rules=sharding.DEFAULT_RULES)


def run_sharded_cases(extra: list[str]) -> None:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip(),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "sharded_cases.py"), *extra]
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"sharded cases failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_sharded_runs_on_8_devices():
    """tests/sharded_cases.py's default selection on 8 simulated devices."""
    run_sharded_cases([])


@pytest.mark.slow
def test_sharded_runs_on_8_devices_all():
    """Every mesh x strategy and the heavier cases (-m slow)."""
    run_sharded_cases(["-m", "slow"])
