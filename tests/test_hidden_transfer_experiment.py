"""experiments/hidden_transfer.py end to end on CPU with the toy target (--toy): results, summary
files, map and head files, a resumed run that only does what is missing, and bad arguments."""

from __future__ import annotations

import json

import pytest

from distill import data as D
from experiments import hidden_transfer as exp


@pytest.mark.slow
def test_toy_run_end_to_end_and_resume(tmp_path):
    """A few minutes on two CPU cores: run with -m slow."""
    if not (D.data_root() / D.SOURCES["gsm8k"]).is_file():
        pytest.skip(f"the shared data folder {D.data_root()} is absent (set DISTILL_DATA)")
    out = tmp_path / "run"
    argv = ["--toy", "--out", str(out), "--no-progress"]
    assert exp.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {(r["row"], r["kind"]) for r in rows}
    assert kinds == {(r, k) for r in exp.TOY_ROWS for k in ("train", "heldout")}
    for r in rows:
        if r["kind"] == "train":
            assert r["steps"] == 6 and r["tokens_seen"] > 0 and r["train_tokens_per_s"] > 0
            assert r["trainable_params"] > 0
        else:
            assert r["shape"] in r["per_shape"] and r["tau"] >= 1.0 and r["speedup"] > 0
    assert (out / "ht_k2" / "maps.safetensors").is_file() and (out / "medusa_k2" / "heads.safetensors").is_file()
    for name in ("summary.md", "summary.json"):
        assert (out / name).is_file()
    assert "ht:k=2" in (out / "summary.md").read_text()
    before = (out / "results.jsonl").read_text()
    assert exp.main(argv) == 0  # a rerun skips every present row
    assert (out / "results.jsonl").read_text() == before


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert exp.main(["--toy", "--out", str(tmp_path), "--rows", "lookahead:k=2"]) == 2
    assert "unknown row 'lookahead:k=2'" in capsys.readouterr().err
    assert exp.main(["--toy", "--out", str(tmp_path), "--rows", "ht:k=0"]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown option 'gamma'"):
        exp.Row.parse("ht:gamma=2")
    assert exp.parse_shape("g3") == ("chain", 3) and exp.parse_shape("4-2-2") == ("tree", (4, 2, 2))
    assert exp.method_string(exp.Row.parse("ht:layer=3:k=4"), ("tree", (4, 2)), "/m.safetensors") == \
        "ht:maps=/m.safetensors:tree=4-2"
    separate = exp.method_string(exp.Row.parse("ht:k=4"), ("chain", 3), "/m", "separate")
    assert separate == "ht:maps=/m:gamma=3:pseudo=separate"
    assert exp.split_choice("g3/separate") == ("g3", "separate") and exp.split_choice("4-2") == ("4-2", "verify")
    assert exp.main(["--toy", "--out", str(tmp_path), "--pseudo-modes", "later"]) == 2


def test_spec_bench_methods_load_map_and_head_files_and_decode_losslessly(tmp_path):
    """`ht:maps=PATH:tree=2-2` and `medusa:heads=PATH` on the harness's toy target: the files are
    loaded against the run's target and the greedy output equals `ar`'s; a missing file is a
    clear error."""
    import jax

    from drafting import hidden_transfer as ht
    from drafting import medusa
    from experiments import methods, specbench

    env = specbench.BenchEnv(specbench.BenchConfig(target="toy", draft=None, max_new_tokens=6))
    target = env.target
    cfg = ht.config_for(target, 2, layer=1)
    maps_path = ht.save_maps(tmp_path / "maps.safetensors", cfg, ht.init_maps(cfg, jax.random.PRNGKey(0), 0.3))
    hcfg = medusa.config_for(target, 2)
    heads_path = medusa.save_heads(tmp_path / "heads.safetensors", hcfg, medusa.init_heads(hcfg))
    prompt = [list(b"hello there")]
    ar = methods.parse("ar").build(env).generate(prompt, 0).tokens
    labels = (f"ht:maps={maps_path}:tree=2-2", f"ht:maps={maps_path}:gamma=2:pseudo=separate",
              f"medusa:heads={heads_path}:gamma=2")
    for label in labels:
        m = methods.parse(label).build(env)
        assert m.generate(prompt, 0).tokens == ar, label
    assert isinstance(methods.parse(f"ht:maps={maps_path}:tree=2-2").build(env).strategy.drafter, ht.HiddenTransfer)
    with pytest.raises(methods.MethodUnavailable, match="needs maps=PATH"):
        methods.parse("ht").build(env)
    with pytest.raises(methods.MethodSpecError, match="branching factors joined by '-'"):
        methods.parse(f"ht:maps={maps_path}:tree=2x2").build(env)
