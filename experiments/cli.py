"""Command line: `python -m experiments.cli {demo,generate,models}` (installed as `decoding`).

  demo      speculative decoding on the default real pair (Qwen2.5-Coder 1.5B target, 0.5B
            draft) beside plain autoregressive decoding: prints the outputs, the stats, the
            speedup, and whether the greedy outputs are identical.
  generate  any model (registry name, HF directory, GGUF file, hub id) with any strategy.
  models    the registry's real checkpoints.

Program switches come from the environment through `decoding.Options.from_env()`
(DECODING_ATTENTION=xla|pallas, DECODING_UNROLL_LAYERS=1|0, DECODING_COMMAND_BUFFERS=while|...).
"""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h? Explain briefly.",
    "Explain in two sentences what a key-value cache does in a transformer.",
)


def _dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32}[name]


def build_strategy(name: str, gamma: int = 4, layers: int = 8, depth: int = 6, top_k: int = 10,
                   total_tokens: int = 60, lenience: float = 1.0, branching: tuple[int, ...] = (4, 2, 2),
                   pseudo: str = "verify"):
    """Strategy objects by CLI name: ar, spec, tree, pld, layerskip, layerskip-tree, ht (hidden
    transfer, a chain of gamma), ht-tree (hidden transfer on the static tree of `branching`)."""
    from decoding import Autoregressive, Speculative, TreeDecoding
    from drafting import DraftModel, DynamicTree, HiddenTransfer, LayerSkip, PromptLookup, TreeTopology

    table = {
        "ar": lambda: Autoregressive(),
        "spec": lambda: Speculative(DraftModel(), gamma=gamma, lenience=lenience),
        "tree": lambda: TreeDecoding(DraftModel(), tree=DynamicTree(depth, top_k, total_tokens)),
        "pld": lambda: Speculative(PromptLookup(), gamma=gamma),
        "layerskip": lambda: Speculative(LayerSkip(layers=layers), gamma=gamma),
        "layerskip-tree": lambda: TreeDecoding(LayerSkip(layers=layers), tree=DynamicTree(depth, top_k, total_tokens)),
        "ht": lambda: Speculative(HiddenTransfer(pseudo=pseudo), gamma=gamma),
        "ht-tree": lambda: TreeDecoding(HiddenTransfer(pseudo=pseudo), tree=TreeTopology.from_branching(branching)),
    }
    if name not in table:
        raise SystemExit(f"unknown strategy {name!r}; choose from {', '.join(table)}.")
    return table[name]()


def _print_result(title, res):
    print(f"\n=== {title} ===")
    for i, text in enumerate(res.texts):
        print(f"--- [{i}] ({len(res.tokens[i])} tokens)\n{text.strip()}")
    print(f"stats: {res.stats.summary()}")


def cmd_demo(args) -> None:
    import jax

    from decoding import Autoregressive, Options, generate, load

    dtype = _dtype(args.dtype)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); dtype: {dtype.__name__ if hasattr(dtype, '__name__') else dtype}")
    target = load(args.target, dtype=dtype)
    draft = load(args.draft, dtype=dtype)
    print(f"target: {target}\ndraft:  {draft}")
    prompts = list(DEMO_PROMPTS[: args.prompts])
    spec = build_strategy("spec", gamma=args.gamma)
    common = dict(max_new_tokens=args.max_new_tokens, options=Options.from_env())
    # Compilation is ahead of time and reported apart (stats.compile_s); run_s excludes it.
    ar = generate(target, prompts, strategy=Autoregressive(), **common)
    sp = generate(target, prompts, strategy=spec, draft=draft, **common)
    _print_result("autoregressive (target alone)", ar)
    _print_result(f"speculative decoding (gamma={args.gamma}, draft={args.draft})", sp)
    same = ar.tokens == sp.tokens
    print("\n=== summary ===")
    print(f"greedy outputs identical to autoregressive: {same}")
    print(f"mean accepted length tau: {sp.stats.tau:.2f}; acceptance per position: "
          + ", ".join(f"{a:.2f}" for a in sp.stats.extra.get("acceptance_per_position", [])))
    print(f"speedup over autoregressive (same process, batch {len(prompts)}): "
          f"{ar.stats.run_s / sp.stats.run_s:.2f}x ({ar.stats.tokens_per_s:.1f} -> {sp.stats.tokens_per_s:.1f} tok/s)")
    if not same:
        sys.exit("speculative output differs from autoregressive output")


def cmd_generate(args) -> None:
    from decoding import Options, generate, load, make_sampling

    dtype = _dtype(args.dtype)
    model = load(args.model, dtype=dtype)
    draft = load(args.draft, dtype=dtype) if args.draft else None
    if args.strategy.startswith("ht"):
        if not args.maps:
            sys.exit("--strategy ht / ht-tree needs --maps PATH (transfer maps written by "
                     "drafting.hidden_transfer.save_maps, e.g. by experiments.hidden_transfer).")
        from drafting.hidden_transfer import load_maps

        draft = load_maps(args.maps, model)
    branching = tuple(int(b) for b in args.branching.split(","))
    strategy = build_strategy(args.strategy, gamma=args.gamma, layers=args.layers, depth=args.depth,
                              top_k=args.top_k_tree, total_tokens=args.total_tokens, lenience=args.lenience,
                              branching=branching, pseudo=args.pseudo)
    sampling = make_sampling(args.temperature, args.top_k, args.top_p)
    prompts = args.prompt or [sys.stdin.read()]
    chat = None if args.chat == "auto" else args.chat == "yes"
    kwargs = dict(strategy=strategy, sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  stop=args.stop or (), chat=chat, draft=draft, options=Options.from_env())
    if args.stream:
        from decoding import stream

        gen = stream(model, prompts, **kwargs)
        try:
            while True:
                new = next(gen)
                if model.tokenizer is not None and len(new) == 1:
                    print(model.tokenizer.decode(new[0]), end="", flush=True)
        except StopIteration as stop:
            res = stop.value
        print()
        print(f"stats: {res.stats.summary()}")
        return
    _print_result(f"{args.strategy} on {args.model}", generate(model, prompts, **kwargs))


def cmd_models(args) -> None:
    from decoding.registry import list_models

    for e in list_models():
        print(f"{e.name:32s} {e.size / 1e6:8.1f} MB  {e.description}" if hasattr(e, "description")
              else f"{e.name:32s} {e.size / 1e6:8.1f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="speculative decoding on the default real pair")
    d.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    d.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    d.add_argument("--gamma", type=int, default=4)
    d.add_argument("--prompts", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp32", "float32"])
    d.set_defaults(fn=cmd_demo)
    g = sub.add_parser("generate", help="generate with any model and strategy")
    g.add_argument("--model", required=True)
    g.add_argument("--draft")
    g.add_argument("--prompt", action="append", help="repeatable; reads stdin when absent")
    g.add_argument("--strategy", default="ar", help="ar, spec, tree, pld, layerskip, layerskip-tree, ht, ht-tree")
    g.add_argument("--maps", help="transfer maps file for --strategy ht / ht-tree")
    g.add_argument("--branching", default="4,2,2", help="children per depth of the ht-tree static tree")
    g.add_argument("--pseudo", default="verify", choices=("verify", "separate"),
                   help="ht: pseudo positions in the verify forward, or in a separate partial forward")
    g.add_argument("--gamma", type=int, default=4)
    g.add_argument("--layers", type=int, default=8, help="layers used by layer-skip drafting")
    g.add_argument("--depth", type=int, default=6)
    g.add_argument("--top-k-tree", type=int, default=10)
    g.add_argument("--total-tokens", type=int, default=60)
    g.add_argument("--lenience", type=float, default=1.0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append")
    g.add_argument("--chat", default="auto", choices=["auto", "yes", "no"])
    g.add_argument("--stream", action="store_true")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp32", "float32"])
    g.set_defaults(fn=cmd_generate)
    m = sub.add_parser("models", help="list the registry's real checkpoints")
    m.set_defaults(fn=cmd_models)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
