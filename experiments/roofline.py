"""Print the roofline cost of a model on a device and its predicted speculative speedups.

    python -m experiments.roofline --target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --profile h200
    python -m experiments.roofline --profile measure   # this device, measured

The cost model itself is `decoding.roofline`; this script only reads model configs (no weights)
and prints its tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decoding.roofline import (PROFILES, autoregressive_prediction, chain_prediction, dtype_bytes, format_rate,
                               forward_cost, measure_profile, profile, weight_params)


def config_of(source: str):
    """The ModelConfig of a registry name, .gguf file, HF directory or toy model (no weights read)."""
    from . import toy

    if source in toy.TOY_NAMES:
        return toy.toy_config(toy.TOY_NAMES[source]["layers"])
    import gguf

    from decoding import loading, registry

    path = registry.fetch(source) if source in registry.REGISTRY else Path(source).expanduser()
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
    args = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
