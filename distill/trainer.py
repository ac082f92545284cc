"""The trainer every drafter recipe shares: one pure, jitted train step and the loop around it.

A *recipe* (DistillSpec, Medusa and EAGLE heads, hidden-transfer maps) says what trains
and what the loss is; the trainer does the rest. A recipe is a frozen, hashable dataclass with

    loss(trainable, frozen, batch) -> (loss_sum, (count, metric_sums))

over one micro-batch: `trainable` is the pytree being trained (already cast to the compute
dtype), `frozen` what is only read (the teacher's parameters, the student's base weights
under LoRA), `batch` a dict of arrays [B, T] (`distill.data.BATCH_KEYS`); `loss_sum` and
`metric_sums` are sums over the `count` kept positions, so micro-batches of any fill average
exactly. A recipe computes whatever it needs inside the loss: the frozen teacher's logits, or
its hidden states via `decoding.forward(..., return_hidden=...)`.

    train_step(recipe, cfg, state, batch, frozen) -> (state, metrics)

is pure (no host round trip, shapes fixed: one compilation for a whole run). Batches carry a
leading gradient-accumulation axis A ([A, B, T]): the step scans over the A micro-batches,
sums gradients, divides by the kept positions of all of them and applies one optax update
(AdamW, linear warmup then cosine decay, global-norm clipping). Master weights and optimizer
state stay float32; the loss runs in `cfg.compute_dtype` (bf16 by default).

Data parallel: `Trainer(..., mesh=mesh)` puts each batch's B rows over the mesh's "data"
axis (`decoding.sharding.put_batch`), keeps trainable and frozen trees laid out as they come
(`decoding.shard(student, mesh).params` for tensor-parallel weights; anything else is
replicated), lays the optimizer state out like its parameters (`decoding.sharding.like_params`)
and restores a checkpoint saved on any mesh onto this one (orbax reads each shard where the
current state's layout puts it). The step is the same pure function; GSPMD inserts the gradient
all-reduce.

`Trainer` is the driver (the only place that calls `jax.jit`): it restores the latest
checkpoint (`distill.checkpoint`), runs steps with a tqdm bar (loss, tokens/s), appends metrics
as JSON lines, evaluates every `eval_every` steps, checkpoints every `checkpoint_every` steps
and when the time budget ends, and draws `plot.png` (loss and acceptance) at the end. The
batch of step s is `batches(s, trainable)`: a pure function of the step for fixed data, and of
the current student for on-policy data, so a resumed run replays exactly the batches an
uninterrupted one sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint as ckpt


class Recipe(Protocol):
    """What a training method supplies to the trainer (see the module doc)."""

    name: str

    def loss(self, trainable, frozen, batch: dict) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (static, hashable). Batch: A = accumulate micro-batches of
    B = batch_size rows of seq_len tokens per optimizer step."""

    steps: int = 1000
    batch_size: int = 8
    accumulate: int = 1
    seq_len: int = 1024
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    compute_dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.compute_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params: the trainable pytree (float32 master copy); opt_state: optax's; step: int32[]."""

    params: Any
    opt_state: Any
    step: jax.Array


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `final_lr_fraction` of it at `steps`."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (weight decay on matrices only)."""
    decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))


def init_state(cfg: TrainConfig, trainable) -> TrainState:
    """A fresh state: float32 master weights, optimizer state, step 0.

    The weights are copied: the driver donates the state to each step, and the caller's
    arrays (a loaded model's parameters, shared with a teacher) must stay valid."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    return TrainState(params=params, opt_state=optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32))


def cast_floats(tree, dtype):
    """Every floating leaf of `tree` cast to `dtype` (integer leaves unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_step(recipe: Recipe, cfg: TrainConfig, state: TrainState, batch: dict, frozen) -> tuple[TrainState, dict]:
    """One optimizer step over batch {key: [A, B, T]} (pure; see the module doc).

    metrics: loss (mean over kept positions), count (kept positions), tokens (non-padding),
    grad_norm, lr, and the recipe's metrics as means over kept positions.
    """
    dtype = jnp.dtype(cfg.compute_dtype)

    def micro_loss(params, micro):
        return recipe.loss(cast_floats(params, dtype), frozen, micro)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, micro):
        grads, loss, count, sums = carry
        (l, (c, m)), g = grad_fn(state.params, micro)
        grads = jax.tree.map(jnp.add, grads, g)
        sums = {k: sums[k] + m[k] for k in sums}
        return (grads, loss + l, count + c, sums), None

    first = jax.tree.map(lambda x: x[0], batch)
    metric_shapes = jax.eval_shape(micro_loss, state.params, first)[1][1]
    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             {k: jnp.zeros((), jnp.float32) for k in metric_shapes})
    (grads, loss, count, sums), _ = jax.lax.scan(body, zeros, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss / denom, "count": count, "tokens": jnp.sum(batch["segments"] > 0).astype(jnp.float32),
               "grad_norm": optax.global_norm(grads), "lr": schedule(cfg)(state.step)}
    metrics.update({k: v / denom for k, v in sums.items()})
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file ([] when absent); a torn last line (a killed write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def plot(metrics_path: Path, out: Path) -> Path | None:
    """loss (and acceptance 1 - TVD, and evaluated acceptance when present) against step."""
    rows = read_jsonl(metrics_path)
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].set_title("training loss")
    if train and "acceptance" in train[0]:
        axes[1].plot([r["step"] for r in train], [r["acceptance"] for r in train], label="1 - TVD (train batches)")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["acceptance_rate"] for r in evals], "o-",
                     label="acceptance rate (speculative decoding)")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("acceptance"), axes[1].set_title("acceptance")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# One jitted step for every Trainer: runs with equal recipes, configs and shapes share a program.
_jitted_step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=(2,))


class Trainer:
    """Runs a recipe for `cfg.steps` steps with checkpoints, metrics, evaluation and progress.

    trainable, frozen: initial pytrees (trainable is replaced by the checkpoint when one exists).
    batches: (step, trainable) -> {key: numpy [A, B, T]}.
    evaluate: optional (trainable) -> dict of figures (e.g. `distill.evaluation.acceptance`).
    identity: what else the checkpoint must match (model configs, data); the recipe, the
      settings (all but the logging/evaluation/checkpoint periods) and the trainable shapes are
      always part of it; a mismatch is an error.
    out_dir: checkpoints under ckpt/, metrics.jsonl, plot.png.
    mesh, rules: run data parallel on a `jax.sharding.Mesh` (batch rows over the rules' batch
      axis, "data" by default; see the module doc). None: one device.
    """

    def __init__(self, recipe: Recipe, cfg: TrainConfig, trainable, frozen, batches: Callable[[int, Any], dict], *,
                 out_dir: str | Path, evaluate: Callable[[Any], dict] | None = None, identity: dict | None = None,
                 progress: bool = True, keep: int = 2, mesh=None, rules=None):
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            from decoding import sharding

            self.rules = sharding.DEFAULT_RULES if rules is None else rules
            trainable, frozen = sharding.on_mesh(trainable, mesh), sharding.on_mesh(frozen, mesh)
            raw = batches
            batches = lambda step, params: sharding.put_batch(raw(step, params), mesh, self.rules)  # noqa: E731
        self.recipe, self.cfg, self.frozen, self.batches, self.evaluate = recipe, cfg, frozen, batches, evaluate
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.progress = progress
        settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                    if k not in ("log_every", "eval_every", "checkpoint_every")}
        self.identity = dict(identity or {}, recipe=repr(recipe), train=settings,
                             trainable=ckpt.shape_signature(trainable))
        self.checkpoints = ckpt.Checkpoints(self.out_dir / "ckpt", identity=self.identity, keep=keep)
        self._step = _jitted_step
        if mesh is None:
            fresh = init_state(cfg, trainable)
        else:
            from decoding import sharding

            layout = sharding.like_params(jax.eval_shape(lambda t: init_state(cfg, t), trainable), trainable)
            fresh = jax.jit(init_state, static_argnums=0, out_shardings=layout)(cfg, trainable)
            self._step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=(2,),
                                 out_shardings=(layout, sharding.NamedSharding(mesh, sharding.PartitionSpec())))
        restored = self.checkpoints.restore_latest(fresh)
        self.state = restored if restored is not None else fresh
        self._trim_metrics(int(self.state.step))

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self):
        return self.state.params

    def _trim_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        rows = read_jsonl(self.metrics_path)
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows) or (rows and not self.metrics_path.read_text().endswith("\n")):
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def _log(self, row: dict) -> None:
        _append_jsonl(self.metrics_path, row)

    def _evaluate(self) -> dict | None:
        if self.evaluate is None:
            return None
        t0 = time.perf_counter()
        figures = self.evaluate(self.state.params)
        row = {"kind": "eval", "step": self.step, "eval_s": time.perf_counter() - t0, **figures}
        self._log(row)
        return row

    def run(self, steps: int | None = None, max_minutes: float | None = None) -> dict:
        """Train until `steps` (default cfg.steps) or the time budget; returns a summary."""
        from tqdm.auto import tqdm

        end = min(self.cfg.steps if steps is None else steps, self.cfg.steps)
        start_step, t_start = self.step, time.perf_counter()
        deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
        bar = tqdm(total=end, initial=start_step, desc=getattr(self.recipe, "name", "train"), disable=not self.progress,
                   dynamic_ncols=True)
        tokens_timed, time_timed, last = 0.0, 0.0, None
        pending_tokens, mark = 0.0, None  # tokens since the last host sync, and its time
        stopped = "steps"
        while self.step < end:
            step = self.step
            batch = self.batches(step, self.state.params)
            self.state, metrics = self._step(self.recipe, self.cfg, self.state, batch, self.frozen)
            pending_tokens += float(np.sum(np.asarray(batch["segments"]) > 0))
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == end or step == start_step:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                if mark is not None:  # the first step of a session includes compilation: not timed
                    tokens_timed += pending_tokens
                    time_timed += now - mark
                pending_tokens, mark = 0.0, now
                last = {"kind": "train", "step": step + 1, **metrics,
                        "tokens_per_s": tokens_timed / time_timed if time_timed else float("nan")}
                self._log(last)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            done = self.step
            paused = False  # evaluation and checkpoints are not training time
            if self.cfg.eval_every and done % self.cfg.eval_every == 0 and done < end:
                self._evaluate()
                paused = True
            if done % self.cfg.checkpoint_every == 0 or done == end:
                self.checkpoints.save(done, self.state)
                paused = True
            if paused and mark is not None:
                pending_tokens, mark = 0.0, time.perf_counter()
            if deadline is not None and time.perf_counter() > deadline and done < end:
                self.checkpoints.save(done, self.state)
                stopped = "time budget"
                break
        bar.close()
        final_eval = self._evaluate() if self.step == self.cfg.steps else None
        plot(self.metrics_path, self.out_dir / "plot.png")
        return {"step": self.step, "stopped": stopped, "session_steps": self.step - start_step,
                "session_s": time.perf_counter() - t_start,
                "tokens_per_s": tokens_timed / time_timed if time_timed else float("nan"),
                "last": last, "eval": final_eval}


def finite(x) -> float | None:
    """A float for JSON (None for NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None
