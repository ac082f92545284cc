"""The roofline cost model against hand-computed cases."""

import dataclasses

import pytest

from decoding import ModelConfig
from decoding import roofline

# Tiny config: V=100, D=8, F=16, L=2, H=2, K=1, Dh=4, untied, no bias.
#   attention weights per layer: 8*2*4 + 2*8*1*4 + 2*4*8 = 192; MLP 3*8*16 = 384; norms 2*8 = 16
#   -> 592 per layer, 1184 for both; + embedding 800 + head 800 + final norm 8 = 2792 parameters;
#   a forward reads all but the input embedding table: 1992 parameters = 3984 bytes in bf16.
#   KV per token: L * 2 * K * Dh * 2 bytes = 32 bytes.
CFG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=4)
DEV = roofline.DeviceProfile("test", memory_bandwidth=1000.0, peak_flops=10000.0)


def test_forward_cost_by_hand():
    assert CFG.param_count() == 2792
    assert roofline.weight_params(CFG) == 1992
    c = roofline.forward_cost(CFG, DEV, new_tokens=3, context=10, batch=2)
    assert c.weight_bytes == 3984
    assert c.kv_read_bytes == 2 * 10 * 32  # B * S * bytes per token
    assert c.kv_write_bytes == 2 * 3 * 32
    assert c.linear_flops == 2 * 1992 * 2 * 3
    assert c.attention_flops == 4 * 2 * 2 * 2 * 4 * 3 * (10 + 3)  # 4 B L H Dh T (S + T)
    assert c.memory_s == pytest.approx((3984 + 640 + 192) / 1000)
    assert c.compute_s == pytest.approx((23904 + 4992) / 10000)
    assert c.time_s == pytest.approx(4.816) and c.bound == "memory"


def test_compute_bound_when_many_tokens():
    c = roofline.forward_cost(CFG, DEV, new_tokens=64, context=0, batch=4)
    assert c.bound == "compute"
    assert c.time_s == pytest.approx(c.flops / 10000)


def test_tied_embeddings_are_read_once_as_the_head():
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    assert tied.param_count() == 1992
    assert roofline.weight_params(tied) == 1992


def test_expected_tokens_chain():
    assert roofline.expected_tokens_chain(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)  # 3.3616
    assert roofline.expected_tokens_chain(0.8, 4) == pytest.approx(3.3616)
    assert roofline.expected_tokens_chain(1.0, 4) == 5.0
    assert roofline.expected_tokens_chain(0.0, 4) == 1.0
    assert roofline.alpha_from_expected_tokens(3.3616, 4) == pytest.approx(0.8, abs=1e-9)
    assert roofline.expected_tokens_from_reach([0.8, 0.64, 0.512, 0.4096]) == pytest.approx(3.3616)
    assert roofline.reach_from_conditional([0.5, 0.5, 0.2]) == pytest.approx([0.5, 0.25, 0.05])


def test_chain_prediction_by_hand():
    # t_target(1) at S=0, B=1: bytes 3984 + 32 = 4016 -> 4.016 s (FLOPs: 4048 -> 0.4048 s).
    # t_target(5): bytes 3984 + 5*32 = 4144 -> 4.144 s (FLOPs 19920 + 1600 -> 2.152 s).
    # round = 4 draft forwards of 0.5 s + 4.144 s = 6.144 s; E(0.8, 4) = 3.3616.
    p = roofline.chain_prediction(CFG, DEV, gamma=4, alpha=0.8, draft=0.5)
    assert p.autoregressive_s == pytest.approx(4.016)
    assert p.round_s == pytest.approx(6.144)
    assert p.speedup == pytest.approx(3.3616 * 4.016 / 6.144)
    assert p.tokens_per_s == pytest.approx(3.3616 / 6.144)
    # Free drafts (prompt lookup): the round is one target forward of 5 tokens.
    free = roofline.chain_prediction(CFG, DEV, gamma=4, expected_tokens=2.0, draft=None)
    assert free.speedup == pytest.approx(2.0 * 4.016 / 4.144)
    # A draft model costs its own roofline forward.
    small = dataclasses.replace(CFG, num_layers=1)
    with_model = roofline.chain_prediction(CFG, DEV, gamma=4, expected_tokens=2.0, draft=small)
    assert with_model.round_s == pytest.approx(4 * roofline.forward_time(small, DEV) + 4.144)


def test_tree_expected_tokens_by_hand():
    # root -> a (0.6), b (0.3); a -> c (0.5): E = 1 + 0.6 + 0.3 + 0.6*0.5 = 2.2
    parents, accept = [-1, -1, 0], [0.6, 0.3, 0.5]
    assert roofline.tree_expected_tokens(parents, accept) == pytest.approx(2.2)
    assert roofline.tree_reach_per_depth(parents, accept) == pytest.approx([0.9, 0.3])
    with pytest.raises(ValueError, match="sum above 1"):
        roofline.tree_expected_tokens([-1, -1], [0.7, 0.6])
    with pytest.raises(ValueError, match="topological"):
        roofline.tree_expected_tokens([1, -1], [0.5, 0.5])


def test_tree_prediction_by_hand():
    # 3 draft forwards of 2 tokens at 0.25 s, then the target over 7 nodes + root = 8 tokens:
    # bytes 3984 + 8*32 = 4240 -> 4.24 s (FLOPs 31872 + 4096 -> 3.5968 s).
    p = roofline.tree_prediction(CFG, DEV, nodes=7, depth=3, expected_tokens=2.2, draft=0.25, draft_tokens_per_step=2)
    assert p.round_s == pytest.approx(3 * 0.25 + 4.24)
    assert p.speedup == pytest.approx(2.2 * 4.016 / 4.99)


def test_predict_from_method_costs():
    ar = roofline.predict({"kind": "ar"}, target=CFG, device=DEV, expected_tokens=1.0)
    assert ar.speedup == pytest.approx(1.0)
    skip = roofline.predict({"kind": "chain", "gamma": 4, "draft": {"layers": 1}}, target=CFG, device=DEV,
                            expected_tokens=3.0)
    one_layer = roofline.forward_time(dataclasses.replace(CFG, num_layers=1), DEV)
    assert skip.round_s == pytest.approx(4 * one_layer + 4.144)
    assert roofline.predict({"kind": "adaptive"}, target=CFG, device=DEV, expected_tokens=2.0) is None
    with pytest.raises(ValueError, match="no draft config"):
        roofline.predict({"kind": "chain", "gamma": 2, "draft": "model"}, target=CFG, device=DEV, expected_tokens=2)


def test_device_profiles():
    assert roofline.profile_for_device("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert roofline.profile_for_device("NVIDIA H200").memory_bandwidth == 4.8e12
    assert roofline.profile_for_device("NVIDIA A100-SXM4-80GB").peak_flops == 312e12
    assert roofline.profile_for_device("TPU v5 lite").memory_bandwidth == 819e9
    assert roofline.profile_for_device("NVIDIA H100 PCIe") is None
    assert roofline.profile_for_device("cpu") is None
    with pytest.raises(ValueError, match="known"):
        roofline.profile("h900")


def test_measure_profile_runs_on_this_device():
    prof = roofline.measure_profile(copy_bytes=1 << 20, matmul_size=128, repeats=2)
    assert prof.source == "measured"
    assert prof.memory_bandwidth > 1e6 and prof.peak_flops > 1e6


def test_truncated_keeps_a_gemma3_config_valid():
    """A layer-skip draft of a Gemma 3 target: the per-layer attention kinds are cut with the
    layers (the config refuses a mismatch), and the cost counts only the kept layers."""
    from decoding.gemma3 import Gemma3Config

    kinds = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    full = Gemma3Config(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=4, num_heads=1,
                        num_kv_heads=1, head_dim=16, layer_types=kinds)
    half = roofline.truncated(full, 2)
    assert half.num_layers == 2 and half.layer_types == kinds[:2]
    per_layer = (roofline.weight_params(full) - roofline.weight_params(half)) / 2
    assert per_layer > 0 and roofline.weight_params(roofline.truncated(full, 1)) == roofline.weight_params(half) - per_layer


LINK = roofline.LinkProfile("test link", bandwidth=100.0, latency=0.5)


def test_tensor_parallel_on_one_device_is_the_plain_forward():
    one = roofline.tensor_parallel_cost(CFG, DEV, 1, link=LINK, new_tokens=3, context=10, batch=2)
    plain = roofline.forward_cost(CFG, DEV, new_tokens=3, context=10, batch=2)
    assert one.per_device == plain and one.collectives == 0 and one.time_s == plain.time_s


def test_tensor_parallel_cost_by_hand():
    # 2 devices, batch 1, one new token, no context; K = 1 kv head does not divide 2: the cache is
    # replicated (every device writes its 32 bytes), weights and FLOPs halve.
    c = roofline.tensor_parallel_cost(CFG, DEV, 2, link=LINK, layout="fused_in")
    assert c.per_device.weight_bytes == 3984 / 2 and c.per_device.kv_write_bytes == 32
    assert c.per_device.memory_s == pytest.approx((1992 + 32) / 1000)
    # per layer: all-reduces of (H + 2K) Dh = 16, D = 8, 2F = 32, D = 8 f32 values; then the
    # embedding (D = 8) and the all-gather of V = 100 logits. Ring: alpha + 2 (n-1)/n m / beta.
    ar = [0.5 + 1.0 * 4 * w / 100 for w in (16, 8, 32, 8)]
    expected = 2 * sum(ar) + (0.5 + 4 * 8 / 100) + (0.5 + 0.5 * 4 * 100 / 100)
    assert c.collectives == 2 * 4 + 2 and c.collective_s == pytest.approx(expected)
    assert c.time_s == pytest.approx(c.per_device.time_s + expected)
    contiguous = roofline.tensor_parallel_cost(CFG, DEV, 2, link=LINK, layout="contiguous")
    assert contiguous.collectives == 2 * 2 + 2 and contiguous.collective_s < c.collective_s
    assert contiguous.per_device == c.per_device


def test_kv_cache_splits_only_when_the_devices_divide_the_kv_heads():
    cfg = dataclasses.replace(CFG, num_kv_heads=2)
    two = roofline.tensor_parallel_cost(cfg, DEV, 2, link=LINK, context=10)
    one = roofline.forward_cost(cfg, DEV, context=10)
    assert two.per_device.kv_read_bytes == one.kv_read_bytes / 2
    four = roofline.tensor_parallel_cost(cfg, DEV, 4, link=LINK, context=10)
    assert four.per_device.kv_read_bytes == one.kv_read_bytes


def test_breakeven_weight_bytes_balance_saving_and_collective_latency():
    # A zero-bandwidth-cost link (only latency) and no KV: at the break-even weight size the
    # split step takes as long as one device's; a model with more weight bytes gains from it.
    link = roofline.LinkProfile("latency only", bandwidth=float("inf"), latency=0.25)
    outcomes = set()
    for n in (2, 4, 8):
        for layout in roofline.TP_LAYOUTS:
            w = roofline.tensor_parallel_breakeven_bytes(CFG, DEV, n, link=link, layout=layout)
            saving = w * (1 - 1 / n) / DEV.memory_bandwidth
            count = roofline.TP_LAYOUTS[layout] * CFG.num_layers + 2
            assert saving == pytest.approx(count * link.latency)
            # the same depth: a model with more weights than the break-even beats one device,
            # one with fewer does not (both outcomes occur below)
            for f in (16, 16 * 64):
                cfg = dataclasses.replace(CFG, intermediate_size=f)
                c_n = roofline.tensor_parallel_cost(cfg, DEV, n, link=link, layout=layout)
                c_1 = roofline.tensor_parallel_cost(cfg, DEV, 1, link=link)
                wins = c_n.time_s < c_1.time_s
                assert (roofline.weight_params(cfg) * 2 > w) == wins
                outcomes.add(wins)
    assert outcomes == {True, False}


def test_tensor_parallel_refuses_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        roofline.tensor_parallel_cost(CFG, DEV, 2, layout="rows")
    with pytest.raises(ValueError, match="devices"):
        roofline.tensor_parallel_cost(CFG, DEV, 0)
    with pytest.raises(ValueError, match="at least 2"):
        roofline.tensor_parallel_breakeven_bytes(CFG, DEV, 1)


def test_roofline_script_prints_the_tensor_parallel_table(capsys):
    from experiments import roofline as script

    assert script.main(["--target", "toy", "--draft", "none", "--tensor-parallel", "1,2",
                        "--link-latency-us", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 us per collective" in out
    table = out.split("tensor parallel over")[1]
    rows = [line for line in table.splitlines() if line.startswith("| 2 | ")]
    assert [r.split(" | ")[1] for r in rows] == ["fused_in", "contiguous"]
    assert "break-even at 2 devices (fused_in)" in out
    with pytest.raises(SystemExit):
        script.main(["--target", "toy", "--draft", "none", "--tensor-parallel", "0"])
    with pytest.raises(SystemExit):
        script.main(["--target", "no-such-model", "--draft", "none"])
