"""Print the roofline cost of a model on a device and its predicted speculative speedups.

    python -m experiments.roofline --target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --profile h200
    python -m experiments.roofline --profile measure   # this device, measured
    python -m experiments.roofline --tensor-parallel 1,2,4,8 --link nvlink4   # split over devices

The cost model itself is `decoding.roofline`; this script only reads model configs (no weights)
and prints its tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decoding.roofline import (LINKS, PROFILES, TP_LAYOUTS, LinkProfile, autoregressive_prediction, chain_prediction,
                               dtype_bytes, format_rate, forward_cost, measure_profile, profile,
                               tensor_parallel_breakeven_bytes, tensor_parallel_cost, weight_params)


def config_of(source: str):
    """The ModelConfig of a registry name, .gguf file, HF directory or toy model (no weights read)."""
    from . import toy

    if source in toy.TOY_NAMES:
        return toy.toy_config(toy.TOY_NAMES[source]["layers"])
    import gguf

    from decoding import loading, registry

    path = registry.fetch(source) if source in registry.REGISTRY else Path(source).expanduser()
    if not path.exists():
        raise SystemExit(f"error: {source!r} is not a registry name ({', '.join(registry.REGISTRY)}), a toy model "
                         f"({', '.join(toy.TOY_NAMES)}), a .gguf file or a Hugging Face model directory.")
    if path.is_dir():
        return loading.load_config(path)
    return loading.gguf_config(gguf.GGUFReader(str(path)), str(path))


def main(argv=None) -> int:
    """`python -m experiments.roofline --target NAME [--draft NAME] [--profile h100-sxm|measure]`."""
    p = argparse.ArgumentParser(prog="python -m experiments.roofline",
                                description="Roofline time per forward and predicted speculative speedups.")
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="'none' for no draft model")
    p.add_argument("--profile", default="h100-sxm", help=f"{', '.join(PROFILES)} or 'measure' (this device)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=float, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.8, help="acceptance rate for the chain predictions")
    p.add_argument("--tensor-parallel", default="", metavar="N,N,...",
                   help="also print the target's decode step split over these device counts (e.g. 1,2,4,8)")
    p.add_argument("--link", default="nvlink4", help=f"interconnect for --tensor-parallel: {', '.join(LINKS)}")
    p.add_argument("--link-latency-us", type=float, default=None,
                   help="override the link's per-collective latency (microseconds)")
    args = p.parse_args(argv)
    try:
        tp = [int(n) for n in args.tensor_parallel.split(",") if n]
        if any(n < 1 for n in tp):
            raise ValueError
    except ValueError:
        p.error(f"--tensor-parallel takes device counts >= 1 separated by commas, got {args.tensor_parallel!r}")
    if args.link not in LINKS:
        p.error(f"unknown --link {args.link!r}; known: {', '.join(LINKS)}")
    device = measure_profile() if args.profile == "measure" else profile(args.profile)
    target = config_of(args.target)
    draft = None if args.draft == "none" else config_of(args.draft)
    bpp = dtype_bytes(args.dtype)
    kw = dict(context=args.context, batch=args.batch, bytes_per_param=bpp, bytes_per_kv=bpp)
    print(f"device: {device.name}: {format_rate(device.memory_bandwidth, 'B/s')}, "
          f"{format_rate(device.peak_flops, 'FLOP/s')} ({device.source})")
    print(f"target {args.target}: {target.param_count() / 1e9:.3f} B parameters, "
          f"{weight_params(target) * bpp / 1e9:.3f} GB read per forward")
    print("\n| new tokens | weight GB | KV GB | GFLOP | time (lower bound) | bound |\n|---|---|---|---|---|---|")
    for t in (1, 2, 4, 8, 16, 32, 64, 128):
        c = forward_cost(target, device, new_tokens=t, **kw)
        print(f"| {t} | {c.weight_bytes / 1e9:.3f} | {(c.kv_read_bytes + c.kv_write_bytes) / 1e9:.4f} | "
              f"{c.flops / 1e9:.1f} | {c.time_s * 1e3:.3f} ms | {c.bound} |")
    ar = autoregressive_prediction(target, device, **kw)
    print(f"\nautoregressive: at most {ar.tokens_per_s:.0f} tokens/s (batch {args.batch}, context {args.context:g})")
    if draft is not None:
        print(f"\nspeculative with {args.draft} (alpha = {args.alpha}):\n\n| gamma | E | speedup (upper bound) |"
              "\n|---|---|---|")
        for g in range(1, 11):
            pr = chain_prediction(target, device, gamma=g, alpha=args.alpha, draft=draft, **kw)
            print(f"| {g} | {pr.expected_tokens:.2f} | {pr.speedup:.2f}x |")
    if tp:
        print_tensor_parallel(target, device, tp, args, kw)
    return 0


def print_tensor_parallel(target, device, counts, args, kw) -> None:
    """The decode step (one new token per row) split over each device count, both layouts."""
    link = LINKS[args.link]
    if args.link_latency_us is not None:
        link = LinkProfile(link.name, link.bandwidth, args.link_latency_us * 1e-6, "given")
    print(f"\ntensor parallel over {link.name}: {format_rate(link.bandwidth, 'B/s')} bus bandwidth, "
          f"{link.latency * 1e6:g} us per collective ({link.source})\n\n"
          "| devices | layout | per-device roofline | collectives | collective time | step | vs 1 device |"
          "\n|---|---|---|---|---|---|---|")
    one = tensor_parallel_cost(target, device, 1, link=link, **kw).time_s
    for n in counts:
        for layout in TP_LAYOUTS if n > 1 else ("fused_in",):
            c = tensor_parallel_cost(target, device, n, link=link, layout=layout, **kw)
            print(f"| {n} | {layout if n > 1 else '-'} | {c.per_device.time_s * 1e3:.3f} ms | {c.collectives} | "
                  f"{c.collective_s * 1e3:.3f} ms | {c.time_s * 1e3:.3f} ms | {one / c.time_s:.2f}x |")
    for n in (n for n in counts if n > 1):
        for layout in TP_LAYOUTS:
            w = tensor_parallel_breakeven_bytes(target, device, n, link=link, layout=layout)
            print(f"break-even at {n} devices ({layout}): {w / 1e9:.2f} GB of weights for {target.num_layers} "
                  f"layers (this model reads {weight_params(target) * dtype_bytes(args.dtype) / 1e9:.2f} GB)")


if __name__ == "__main__":
    raise SystemExit(main())
