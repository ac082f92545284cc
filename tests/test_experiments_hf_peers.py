"""The transformers peers of the benchmarks run on a saved random Qwen2 model (CPU): eager and
static-cache `generate` give the same greedy tokens, and the static mode reports what it
compiled (nothing on CPU, where transformers does not auto-compile)."""

from __future__ import annotations

import pytest

from tests.test_distill_models import save_tiny, tokenizer


def test_static_cache_peer_matches_eager_generate(tmp_path):
    pytest.importorskip("torch")
    from experiments.bench_autoregressive import run_hf

    tok = tokenizer()
    directory = save_tiny(tmp_path / "m", layers=2, seed=3, tok=tok)
    prompts = [tok.encode("the cat sat on")[:5], tok.encode("a dog ran")[:3], tok.encode("on the mat the")[:7]]
    eos = (tok.eos_token_id,)
    eager = run_hf(str(directory), prompts, eos, batch=2, max_new_tokens=6, mode="eager")
    static = run_hf(str(directory), prompts, eos, batch=2, max_new_tokens=6, mode="static")
    assert eager["mode"] == "eager" and static["mode"] == "static"
    assert len(static["outputs"]) == len(prompts)
    assert static["outputs"] == eager["outputs"]
    assert all(1 <= len(o) <= 6 for o in static["outputs"])
    assert static["tokens"] == sum(len(o) for o in static["outputs"])


def test_unknown_peer_mode_is_refused(tmp_path):
    pytest.importorskip("torch")
    from experiments.bench_autoregressive import run_hf

    with pytest.raises(ValueError, match="eager and/or static"):
        run_hf(str(tmp_path), [[1, 2]], (0,), batch=1, max_new_tokens=2, mode="compiled")


def test_report_files_keep_a_dotted_model_name_whole(tmp_path):
    """`--out DIR/qwen2.5-coder-1.5b-instruct` once wrote DIR/qwen2.5-coder-1.json (the dot taken
    for an extension), so the GPU stage's resume check never found its report."""
    from experiments.bench_autoregressive import write_report

    report = {"environment": {"device": {}}, "models": {}, "n_prompts": 0, "prompts": "", "bandwidth_measured_Bps": None,
              "bandwidth_datasheet_Bps": None, "settings": {"max_new_tokens": 8}}
    write_report(report, tmp_path / "qwen2.5-coder-1.5b-instruct")
    assert (tmp_path / "qwen2.5-coder-1.5b-instruct.json").exists()
    assert (tmp_path / "qwen2.5-coder-1.5b-instruct.md").exists()
    assert not (tmp_path / "qwen2.5-coder-1.json").exists()


def test_best_variant_is_the_fastest_at_that_batch_and_reaches_the_peer_row():
    from experiments.bench_autoregressive import best_variant, markdown

    ours = {"1": {"tokens_per_s": 200.0}, "1 (split layer weights)": {"tokens_per_s": 260.0},
            "8": {"tokens_per_s": 1500.0}, "8 (pallas projections)": {"tokens_per_s": 1400.0},
            "16": {"tokens_per_s": 9000.0}}
    assert best_variant(ours, 1) == "1 (split layer weights)"
    assert best_variant(ours, 8) == "8"
    assert best_variant(ours, 16) == "16" and best_variant(ours, 4) is None
    row = {"tokens_per_s": 100.0, "outputs": [[1]], "ours_speedup": 2.0, "identical_outputs": 1,
           "best_ours": "1 (split layer weights)", "best_ours_speedup": 2.6}
    r = {k: 1.0 for k in ("fraction_of_physical_limit", "ms_per_step_in_loop", "ms_forward_only",
                          "ms_weights_at_bandwidth", "compile_s")}
    report = {"environment": {"device": {}}, "n_prompts": 1, "prompts": "", "bandwidth_measured_Bps": None,
              "bandwidth_datasheet_Bps": None, "settings": {"max_new_tokens": 8},
              "models": {"m": {"ours": {"1": {**r, "tokens_per_s": 200.0}}, "hf_static": {"1": row},
                               "physical_limit_tokens_per_s_batch1": 1000.0}}}
    assert "2.00x (2.60x with split layer weights)" in markdown(report)
