"""Data-parallel training throughput: tokens/s per device on 1, 2, ... devices, and a checkpoint
saved on many devices restored on one.

The recipe is DistillSpec (`distill.DistillSpec`: the student, Qwen2.5-Coder-0.5B-Instruct, trained
toward the frozen teacher, Qwen2.5-Coder-1.5B-Instruct, by forward KL over the whole vocabulary),
the simplest of distill/'s recipes to drive: no hidden states, every student weight trains. For
each data-parallel size n of `--data`, a `distill.Trainer` runs on `make_mesh(data=n, model=1)`
(batch rows over "data", weights replicated, GSPMD's gradient all-reduce) with the same
per-device batch (`--per-device-batch` rows of `--seq-len` tokens, so the global batch is n times
that), `--warmup` steps (compilation included) and then `--steps` timed steps, timed by the
trainer itself (`Trainer.run`'s tokens/s, which leaves out the first step of a session). Scaling
efficiency is the per-device tokens/s on n devices over that on one.

Batches are real tokens: GSM8K train conversations (`distill.data.load_conversations`, the
trainers' data; never Spec-Bench) with the chat template, concatenated and cut into rows at
offsets that depend on (step, row); every position is trained (`loss_mask` 1, one sequence per row). Identical rows across sizes are not
needed: each size is measured on its own.

Then the checkpoint the largest size saved at its last step is restored by a `Trainer` without
a mesh (one device, the same settings and checkpoint directory: `distill.checkpoint` reads each
shard into the current layout), and its parameters are compared with the trained ones (equal
bit for bit, or the report says by how much they differ).

    python -m experiments.train_scaling --data 1,2,4,8          # on 8 GPUs
    python -m experiments.train_scaling --tiny --data 1,2 --out /tmp/t   # CPU (8 simulated devices)

Writes `<out>.json` and `<out>.md` (default experiments/results/sharding/train_scaling) after every
measured size, naming device and commit; a rerun with the same settings skips the sizes already
measured and the checkpoint check once done for the largest size (resumable). Run directories
(checkpoints, metrics) go to `<out>_runs/`.

Legend: n data-parallel size, B rows per device, T tokens per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import environment


def parse_sizes(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (sorted, distinct, positive)."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--data: {text!r} is not a comma list of data-parallel sizes, e.g. --data 1,2,4.") from None
    if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise SystemExit(f"--data: {text!r} must list distinct positive sizes.")
    return sorted(sizes)


def check_device_count(sizes: list[int], available: int) -> None:
    big = [s for s in sizes if s > available]
    if big:
        raise SystemExit(f"--data {big} need more devices than the {available} jax.device_count() sees; use sizes "
                         f"of at most {available} (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "before jax starts).")


def tiny_pair():
    """(student config, student params, teacher config, teacher params, token stream): tiny random models."""
    import decoding


    teacher = decoding.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    student = decoding.ModelConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    stream = np.random.default_rng(0).integers(0, 96, 4096).astype(np.int32)
    params = jax.jit(lambda: (decoding.init_params(student, jax.random.PRNGKey(1), scale=0.5),  # one compilation
                              decoding.init_params(teacher, jax.random.PRNGKey(0), scale=0.5)))()
    return student, params[0], teacher, params[1], stream


def real_pair(args):
    """The same from the registry models, the stream from GSM8K train conversations (the
    trainers' own data; never Spec-Bench or a test split) rendered with the chat template."""
    import decoding
    import distill
    from distill import data

    teacher = decoding.load(args.teacher, dtype=jnp.bfloat16)
    student = decoding.load(args.student, dtype=jnp.bfloat16)
    distill.check_pair(teacher, student)
    ds = data.load_conversations("gsm8k", limit=args.conversations, root=args.data_dir)
    ids = [data.chat_ids(teacher.tokenizer, row["messages"], add_generation_prompt=False) for row in ds]
    stream = np.concatenate([np.asarray(p, np.int32) for p in ids])
    return student.config, student.params, teacher.config, teacher.params, stream


def batch_source(stream: np.ndarray, accumulate: int, rows: int, seq_len: int):
    """`batches(step, trainable) -> {key: int32/float32 [A, rows, T]}`: windows of the cyclic
    token stream starting at offsets fixed by (step, row), every position trained."""
    n = len(stream)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (accumulate, rows, seq_len)).copy()

    def batches(step: int, trainable):
        starts = (np.arange(accumulate * rows) + step * accumulate * rows) * 97 % n
        idx = (starts[:, None] + np.arange(seq_len)[None]) % n
        return {"tokens": stream[idx].reshape(accumulate, rows, seq_len), "positions": positions,
                "segments": np.ones((accumulate, rows, seq_len), np.int32),
                "loss_mask": np.ones((accumulate, rows, seq_len), np.float32)}

    return batches


def build_trainer(pair, args, n: int, mesh, run_dir: Path):
    """A DistillSpec `Trainer` over n x per-device-batch rows, on `mesh` (None: one device)."""
    import distill

    student_cfg, student, teacher_cfg, teacher, stream = pair
    rows = args.per_device_batch * n
    cfg = distill.TrainConfig(steps=args.warmup + 1 + args.steps, batch_size=rows, accumulate=1, seq_len=args.seq_len,
                              learning_rate=args.learning_rate, warmup_steps=1,
                              compute_dtype="float32" if args.tiny else "bfloat16", log_every=10 ** 9,
                              checkpoint_every=10 ** 9)
    recipe = distill.DistillSpec(student_cfg, teacher_cfg, distill.Divergence("fkl"))
    trainable, frozen = recipe.init(student, teacher)
    return distill.Trainer(recipe, cfg, trainable, frozen, batch_source(stream, 1, rows, args.seq_len),
                           out_dir=run_dir, progress=False, mesh=mesh)


def measure(pair, args, n: int, run_dir: Path):
    """(entry, trainer): tokens/s of `args.steps` steps on a data=n mesh after the warm-up."""
    from decoding import sharding

    shutil.rmtree(run_dir, ignore_errors=True)  # a stale checkpoint would be resumed, not measured
    trainer = build_trainer(pair, args, n, sharding.make_mesh(data=n, model=1), run_dir)
    t0 = time.perf_counter()
    trainer.run(args.warmup)
    warmup_s = time.perf_counter() - t0
    summary = trainer.run()
    total = summary["tokens_per_s"]
    tokens_per_step = args.per_device_batch * n * args.seq_len
    entry = {"data": n, "devices": n, "global_batch": args.per_device_batch * n, "tokens_per_step": tokens_per_step,
             "timed_steps": args.steps, "warmup_s": warmup_s, "tokens_per_s": total,
             "tokens_per_s_per_device": total / n,
             "ms_per_step": 1e3 * tokens_per_step / total, "final_loss": summary["last"]["loss"],
             "step": trainer.step}
    return entry, trainer


def check_restore(pair, args, trainer, n: int, run_dir: Path) -> dict:
    """Restore the checkpoint `trainer` (on a data=n mesh) saved at its last step with a
    one-device Trainer; compare the parameters with `trainer`'s."""
    one = build_trainer(pair, args, n, None, run_dir)
    want = jax.device_get(trainer.state.params)
    got = jax.device_get(one.state.params)
    leaves = list(zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in leaves)
    return {"saved_on": f"{n}x1", "restored_on": "no mesh (1 device)", "step": one.step, "trained_step": trainer.step,
            "leaves": len(leaves), "params_equal": one.step == trainer.step and all(
                a.dtype == b.dtype and np.array_equal(a, b) for a, b in leaves),
            "max_abs_diff": diff, "restored_devices": sorted({str(d) for x in jax.tree.leaves(one.state.params)
                                                              for d in x.devices()})}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Data-parallel training throughput (DistillSpec)", "",
             environment.device_commit_line(report["environment"], report.get("device_count", 1)) + "; "
             f"student {s['student']} <- teacher {s['teacher']}; "
             f"{s['per_device_batch']} rows x {s['seq_len']} tokens per device; {s['warmup']} warm-up + "
             f"{s['steps']} timed steps; data: {report['data_source']}.", "",
             "| data-parallel devices | global batch | tokens/s | tokens/s per device | ms/step | scaling efficiency |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = report["sizes"].get("1")
    for r in sorted(report["sizes"].values(), key=lambda r: r["data"]):
        eff = f"{r['tokens_per_s_per_device'] / base['tokens_per_s_per_device']:.3f}" if base else "-"
        lines.append(f"| {r['data']} | {r['global_batch']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_per_device']:.0f} | {r['ms_per_step']:.1f} | {eff} |")
    c = report.get("checkpoint")
    if c:
        lines += ["", f"Checkpoint saved on a {c['saved_on']} mesh at step {c['trained_step']}, restored on "
                      f"{c['restored_on']} at step {c['step']}: parameters "
                      f"{'equal' if c['params_equal'] else 'DIFFERENT'} ({c['leaves']} arrays, max |diff| "
                      f"{c['max_abs_diff']:.3g})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--data", default="1,2", help="comma list of data-parallel sizes (devices)")
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (the first one compiles)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--data-dir", default=None,
                    help="the shared data folder holding gsm8k/train.jsonl (default: ../shared/data)")
    ap.add_argument("--conversations", type=int, default=512,
                    help="GSM8K train conversations tokenized into the stream of training rows")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random models, random tokens")
    ap.add_argument("--out", default="experiments/results/sharding/train_scaling")
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.data)
    check_device_count(sizes, jax.device_count())
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}.")
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    if args.tiny:
        settings.update(student="tiny-student", teacher="tiny-teacher")
    report = {"environment": environment.describe(), "device_count": jax.device_count(), "settings": settings,
              "sizes": {}, "checkpoint": None}
    old = out.with_suffix(".json")
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("settings") == settings:  # same settings: keep what was measured, skip it
            report["sizes"], report["checkpoint"] = prev.get("sizes", {}), prev.get("checkpoint")
    t0 = time.perf_counter()
    pair = tiny_pair() if args.tiny else real_pair(args)
    report["load_s"] = time.perf_counter() - t0
    report["data_source"] = ("random token ids (smoke test)" if args.tiny else
                             f"{args.conversations} GSM8K train conversations (chat template) cut into rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = out.parent / f"{out.name}_runs"

    def write():
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(report))

    largest, live = max(sizes), None
    for n in sizes:
        if str(n) in report["sizes"]:
            print(f"data={n}: measured before, skipped", flush=True)
            continue
        entry, trainer = measure(pair, args, n, runs / f"data{n}")
        entry["environment"] = environment.describe()
        report["sizes"][str(n)] = entry
        live = trainer if n == largest else None
        del trainer
        print(f"data={n}: {entry['tokens_per_s']:.0f} tokens/s, {entry['tokens_per_s_per_device']:.0f} per device, "
              f"{entry['ms_per_step']:.1f} ms/step", flush=True)
        write()
    done = report["checkpoint"] or {}
    if done.get("saved_on") == f"{largest}x1" and done.get("params_equal") is not None:
        print(f"checkpoint {largest}x1 -> 1 device: checked before, skipped", flush=True)
    else:
        run_dir = runs / f"data{largest}"
        if live is None:  # measured in an earlier session: train the largest again to have its state
            _, live = measure(pair, args, largest, run_dir)
        report["checkpoint"] = check_restore(pair, args, live, largest, run_dir)
        c = report["checkpoint"]
        print(f"checkpoint saved on {c['saved_on']} restored on one device: params equal {c['params_equal']} "
              f"(max |diff| {c['max_abs_diff']:.3g})", flush=True)
    write()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
