"""A roofline cost model of decoding: time per forward, and predicted speedups.

Everything here is a *lower bound on time* (an upper bound on speed): a forward can never be
faster than moving its bytes through memory at full bandwidth or doing its FLOPs at the peak
rate, and the model takes the larger of the two, ignoring launch overheads, kernel
inefficiency, activations, sampling and host work. Its use is to compare strategies and to
choose their settings, and to say how far a measurement is from the hardware's limit.

One forward of a Llama-family model over T new tokens per row, B rows, S tokens already in
the KV cache (legend: P parameters read, L layers, H query heads, K kv heads, Dh head dim,
V vocab, D hidden):
  * weight bytes   = P * bytes_per_param, with P = all parameters except the input embedding
                     table when the head is untied (a forward gathers B*T of its rows, which is
                     negligible); a tied table is read whole as the LM head;
  * KV read bytes  = B * L * S * 2*K*Dh * bytes_per_kv   (every layer reads the cached keys
                     and values once);
  * KV write bytes = B * L * T * 2*K*Dh * bytes_per_kv;
  * FLOPs          = 2 * P * B * T                       (every weight is a multiply-add per
                                                          token)
                   + 4 * B * L * H * Dh * T * (S + T)     (QK^T and AV; a dense block over the
                                                          T new tokens is computed, as
                                                          chain/tree verification kernels do);
  * time           = max(bytes / bandwidth, FLOPs / peak FLOP/s).

Predicted speedup of speculative strategies over autoregressive decoding (Leviathan et al.
2023, sec. 3.4; tokens per target call include the bonus token):
  * chain (draft gamma tokens, verify gamma+1): with acceptance rate a, the expected tokens
    per target call is E = (1 - a^(gamma+1)) / (1 - a); from measured per-position reach
    probabilities r_i (the fraction of rounds that accept at least i draft tokens),
    E = 1 + sum_i r_i. One round costs gamma draft forwards of one token plus one target
    forward of gamma+1 tokens; speedup = E * t_target(1) / t_round.
  * tree (N draft nodes, verified as N+1 tokens with the root): with p(n) the probability
    that node n is accepted given that its parent was, reach(n) = product of p along the
    path, and E = 1 + sum over nodes of reach(n) = 1 + sum over depth d of P(reaching d).
    One round costs `depth` draft forwards (each over the frontier, e.g. top_k tokens) plus
    one target forward of N+1 tokens.
A drafter's cost is a draft model's forward (its `ModelConfig`), a fixed number of seconds,
zero (prompt lookup: host-side n-gram matching) or a truncated target (layer-skip: the first
k layers, see `truncated`).

Tensor parallelism over n devices (Shoeybi et al. 2019, "Megatron-LM"): each device reads and
multiplies 1/n of the weights (and of the KV cache when n divides K), and every layer adds its
all-reduces, alpha + 2 (n-1)/n * bytes / beta each on a ring (`LinkProfile`); see
`tensor_parallel_cost` and `tensor_parallel_breakeven_bytes`.

`decoding.autotune` uses these predictions to choose gamma or a tree's shape;
`python -m experiments.roofline` prints them for a model on a device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence, Union

# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) of one accelerator."""

    name: str
    memory_bandwidth: float
    peak_flops: float
    source: str = "datasheet"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES = {
    "h100-sxm": DeviceProfile("NVIDIA H100 SXM", 3.35e12, 989e12),
    "h200": DeviceProfile("NVIDIA H200", 4.8e12, 989e12),
    "a100-80gb": DeviceProfile("NVIDIA A100 80GB", 2.0e12, 312e12),
    "tpu-v5e": DeviceProfile("TPU v5e", 819e9, 197e12),
}

# (substring of jax's device_kind, lower case) -> profile name. H100 PCIe/NVL differ from SXM
# and are left to measurement.
_KIND_MATCH = (
    ("h100 80gb hbm3", "h100-sxm"),
    ("h100 sxm", "h100-sxm"),
    ("h200", "h200"),
    ("a100-sxm4-80gb", "a100-80gb"),
    ("a100 80gb", "a100-80gb"),
    ("tpu v5 lite", "tpu-v5e"),
    ("tpu v5e", "tpu-v5e"),
)


def profile(name: str) -> DeviceProfile:
    """A datasheet profile by name (see `PROFILES`)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(PROFILES)}, "
                         "or measure one with measure_profile().") from None


def profile_for_device(device_kind: str) -> DeviceProfile | None:
    """The datasheet profile matching a JAX `device_kind`, or None when there is none."""
    kind = device_kind.lower()
    for needle, name in _KIND_MATCH:
        if needle in kind:
            return PROFILES[name]
    return None


def measure_profile(*, copy_bytes: int | None = None, matmul_size: int | None = None,
                    repeats: int = 5) -> DeviceProfile:
    """Time a large on-device copy and a large bf16 matmul on JAX's first device.

    Bandwidth = (bytes read + bytes written) / best time of `y = x + 1` over `copy_bytes`;
    peak = 2 n^3 / best time of an n x n bf16 matmul. Defaults: 2 GiB and n = 8192 on an
    accelerator, 64 MiB and n = 1024 on CPU. Measured figures are what this device achieves
    with XLA, below the datasheet.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    cpu = dev.platform == "cpu"
    copy_bytes = copy_bytes or (1 << 26 if cpu else 1 << 31)
    n = matmul_size or (1024 if cpu else 8192)

    def best(fn, *args):
        jax.block_until_ready(fn(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return min(times)

    x = jnp.zeros((copy_bytes // 2,), jnp.bfloat16)
    t_copy = best(jax.jit(lambda v: v + 1), x)
    del x
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    t_mm = best(jax.jit(lambda p, q: p @ q), a, b)
    return DeviceProfile(f"{dev.device_kind} (measured)", 2 * copy_bytes / t_copy, 2 * n**3 / t_mm, "measured")


# --------------------------------------------------------------------------------------------
# One forward
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForwardCost:
    """Bytes, FLOPs and roofline time of one forward (times are lower bounds, in seconds)."""

    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    linear_flops: float
    attention_flops: float
    memory_s: float
    compute_s: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops

    @property
    def time_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def weight_params(config) -> int:
    """Parameters a forward reads (and multiplies): all but an untied input embedding table."""
    embed = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
    return config.param_count() - embed


def truncated(config, layers: int):
    """`config` with only its first `layers` layers (a layer-skip self-draft's cost)."""
    if not 1 <= layers <= config.num_layers:
        raise ValueError(f"layers must be in [1, {config.num_layers}], got {layers}.")
    if hasattr(config, "layer_types"):  # Gemma 3: one attention kind per layer
        return dataclasses.replace(config, num_layers=layers, layer_types=tuple(config.layer_types[:layers]))
    return dataclasses.replace(config, num_layers=layers)


def forward_cost(config, device: DeviceProfile, *, new_tokens: int = 1, context: float = 0, batch: int = 1,
                 bytes_per_param: float = 2, bytes_per_kv: float = 2) -> ForwardCost:
    """Roofline cost of one forward over `new_tokens` per row at `context` cached tokens."""
    if new_tokens < 1 or batch < 1 or context < 0:
        raise ValueError(f"need new_tokens >= 1, batch >= 1, context >= 0; got {new_tokens}, {batch}, {context}.")
    t, s, b = new_tokens, context, batch
    kv_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * bytes_per_kv
    p = weight_params(config)
    weight_bytes = p * bytes_per_param
    kv_read = b * s * kv_per_token
    kv_write = b * t * kv_per_token
    linear = 2.0 * p * b * t
    attention = 4.0 * b * config.num_layers * config.num_heads * config.head_dim * t * (s + t)
    return ForwardCost(
        weight_bytes=weight_bytes,
        kv_read_bytes=kv_read,
        kv_write_bytes=kv_write,
        linear_flops=linear,
        attention_flops=attention,
        memory_s=(weight_bytes + kv_read + kv_write) / device.memory_bandwidth,
        compute_s=(linear + attention) / device.peak_flops,
    )


def forward_time(config, device: DeviceProfile, **kwargs) -> float:
    """`forward_cost(...).time_s`."""
    return forward_cost(config, device, **kwargs).time_s


# --------------------------------------------------------------------------------------------
# Tensor parallelism
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """The interconnect between the devices of one host, as an alpha-beta model of a collective.

    `bandwidth` is the bus bandwidth a ring collective reaches per device and direction (bytes/s);
    `latency` the fixed cost of one collective inside a compiled program (seconds: the launch,
    the synchronisation between devices and the protocol's small-message time). A decode step's
    messages are a few kB, so the latency dominates; it is the figure to measure.
    """

    name: str
    bandwidth: float
    latency: float
    source: str = "assumed"

    def all_reduce_s(self, nbytes: float, devices: int) -> float:
        """Ring all-reduce of `nbytes` per device over `devices`: alpha + 2 (n - 1) / n * m / beta."""
        if devices <= 1:
            return 0.0
        return self.latency + 2 * (devices - 1) / devices * nbytes / self.bandwidth

    def all_gather_s(self, nbytes: float, devices: int) -> float:
        """Ring all-gather of a result of `nbytes` (each device holds 1/n): alpha + (n - 1) / n * m / beta."""
        if devices <= 1:
            return 0.0
        return self.latency + (devices - 1) / devices * nbytes / self.bandwidth


LINKS = {
    # NVLink 4 of H100/H200 SXM boards: 450 GB/s per direction per GPU on the datasheet, of which
    # NCCL's ring reaches about 360-370 GB/s bus bandwidth for large messages. The 10 us latency
    # is an assumption for a small all-reduce issued from a compiled XLA program (NCCL's LL
    # protocol alone takes a few us); `experiments.sharding_check` on several GPUs measures it.
    "nvlink4": LinkProfile("NVLink 4 (H100/H200 SXM)", 360e9, 10e-6, "assumed (datasheet bandwidth, guessed latency)"),
    # PCIe Gen5 x16 between two cards: 64 GB/s per direction on paper, about 50 achieved.
    "pcie5": LinkProfile("PCIe Gen5 x16", 50e9, 20e-6, "assumed"),
}

# Collectives of one decode forward under `decoding.sharding.DEFAULT_RULES`, per layer:
#   "fused_in"   (this toolkit's layout) the fused q/k/v and gate/up projections are sharded on
#                their input axis D, so each needs an all-reduce of its partial sums, and so do
#                the row-parallel output and down projections: 4 per layer;
#   "contiguous" (Megatron-style column parallel q/k/v and gate/up, possible only with a
#                per-device-contiguous order of the fused columns, not implemented): 2 per layer.
# Outside the layers: the vocabulary-sharded embedding lookup (one all-reduce of [B, T, D]) and
# the vocabulary-sharded head's logits gathered for sampling (one all-gather of [B, T, V], f32).
TP_LAYOUTS = {"fused_in": 4, "contiguous": 2}


@dataclasses.dataclass(frozen=True)
class TensorParallelCost:
    """One forward on `devices` tensor-parallel devices: the per-device roofline plus collectives."""

    devices: int
    layout: str
    per_device: ForwardCost
    collectives: int
    collective_s: float

    @property
    def time_s(self) -> float:
        """Per-device roofline time plus the collectives, which sit on the critical path of a
        decode step (each layer waits for its sums), so they are added, not overlapped."""
        return self.per_device.time_s + self.collective_s

    @property
    def collective_share(self) -> float:
        return self.collective_s / self.time_s


def tensor_parallel_cost(config, device: DeviceProfile, devices: int, *, link: LinkProfile | None = None,
                         layout: str = "fused_in", new_tokens: int = 1, context: float = 0, batch: int = 1,
                         bytes_per_param: float = 2, bytes_per_kv: float = 2,
                         bytes_per_activation: float = 4) -> TensorParallelCost:
    """Roofline cost of one forward split over `devices` by heads, MLP width and vocabulary.

    Each device reads 1/n of the weights, does 1/n of the FLOPs and, when n divides the kv
    heads, reads 1/n of the KV cache (otherwise the cache is replicated: every device reads it
    all). The collectives are `TP_LAYOUTS[layout]` all-reduces per layer of the projections'
    outputs (in `bytes_per_activation`: GSPMD sums in f32), one for the embedding lookup and one
    all-gather of the logits. With n = 1 this is `forward_cost` and no collective.

    Where it wins at batch 1 (memory-bound, latency-dominated collectives): splitting saves
    W (1 - 1/n) / bandwidth of weight reading and costs about C * latency, with C the number
    of collectives; see `tensor_parallel_breakeven_bytes`.
    """
    link = link or LINKS["nvlink4"]
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}.")
    if layout not in TP_LAYOUTS:
        raise ValueError(f"unknown tensor-parallel layout {layout!r}; known: {', '.join(TP_LAYOUTS)}.")
    one = forward_cost(config, device, new_tokens=new_tokens, context=context, batch=batch,
                       bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)
    n = devices
    kv_split = n if config.num_kv_heads % n == 0 else 1
    weight = one.weight_bytes / n
    kv_read, kv_write = one.kv_read_bytes / kv_split, one.kv_write_bytes / kv_split
    linear, attention = one.linear_flops / n, one.attention_flops / n
    per_device = ForwardCost(weight, kv_read, kv_write, linear, attention,
                             memory_s=(weight + kv_read + kv_write) / device.memory_bandwidth,
                             compute_s=(linear + attention) / device.peak_flops)
    if n == 1:
        return TensorParallelCost(1, layout, per_device, 0, 0.0)
    rows = batch * new_tokens * bytes_per_activation
    c = config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_layer = ([qkv, c.hidden_size, 2 * c.intermediate_size, c.hidden_size] if layout == "fused_in"
                 else [c.hidden_size, c.hidden_size])
    seconds = c.num_layers * sum(link.all_reduce_s(rows * width, n) for width in per_layer)
    seconds += link.all_reduce_s(rows * c.hidden_size, n) + link.all_gather_s(rows * c.vocab_size, n)
    count = c.num_layers * len(per_layer) + 2
    return TensorParallelCost(n, layout, per_device, count, seconds)


def tensor_parallel_breakeven_bytes(config, device: DeviceProfile, devices: int, *,
                                    link: LinkProfile | None = None, layout: str = "fused_in") -> float:
    """Weight bytes above which a batch-1 decode step on `devices` beats one device (roofline,
    collectives as pure latency): W (1 - 1/n) / bandwidth = C * latency, so
    W* = C * latency * bandwidth * n / (n - 1), with C = per-layer collectives * L + 2 of
    `config`'s depth. A model of that depth with more weight bytes gains from splitting."""
    link = link or LINKS["nvlink4"]
    if devices < 2:
        raise ValueError(f"a break-even needs at least 2 devices, got {devices}.")
    if layout not in TP_LAYOUTS:
        raise ValueError(f"unknown tensor-parallel layout {layout!r}; known: {', '.join(TP_LAYOUTS)}.")
    count = TP_LAYOUTS[layout] * config.num_layers + 2
    return count * link.latency * device.memory_bandwidth * devices / (devices - 1)


# --------------------------------------------------------------------------------------------
# Expected tokens per target call
# --------------------------------------------------------------------------------------------


def expected_tokens_chain(alpha: float, gamma: int) -> float:
    """E = (1 - a^(gamma+1)) / (1 - a): tokens per target call of a gamma-token chain."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {alpha}.")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def alpha_from_expected_tokens(expected: float, gamma: int) -> float:
    """The acceptance rate a with expected_tokens_chain(a, gamma) == expected (bisection)."""
    if not 1.0 <= expected <= gamma + 1 + 1e-9:
        raise ValueError(f"tokens per call must be in [1, gamma+1] = [1, {gamma + 1}], got {expected}.")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if expected_tokens_chain(mid, gamma) < expected:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def reach_from_conditional(conditional: Sequence[float]) -> list[float]:
    """Per-position conditional acceptance -> probability of reaching each position."""
    out, acc = [], 1.0
    for p in conditional:
        acc *= float(p)
        out.append(acc)
    return out


def expected_tokens_from_reach(reach: Sequence[float]) -> float:
    """E = 1 + sum of the probabilities of accepting at least i draft tokens, i = 1..gamma."""
    return 1.0 + float(sum(reach))


def _node_reach(parents: Sequence[int], accept: Sequence[float]) -> list[float]:
    if len(parents) != len(accept):
        raise ValueError(f"parents ({len(parents)}) and accept ({len(accept)}) differ in length.")
    reach: list[float] = []
    children_mass: dict[int, float] = {}
    for i, (parent, p) in enumerate(zip(parents, accept)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"node {i}: acceptance {p} is not a probability.")
        if parent >= i:
            raise ValueError(f"node {i}: parent {parent} must come before it (topological order).")
        children_mass[parent] = children_mass.get(parent, 0.0) + p
        reach.append(p * (1.0 if parent < 0 else reach[parent]))
    over = {k: v for k, v in children_mass.items() if v > 1.0 + 1e-9}
    if over:
        raise ValueError(f"siblings' acceptance probabilities sum above 1 under parent(s) {sorted(over)}: "
                         "at most one child of a node can be accepted.")
    return reach


def tree_expected_tokens(parents: Sequence[int], accept: Sequence[float]) -> float:
    """E = 1 + sum over nodes of P(node reached), for a tree in topological order.

    parents[i]: index of node i's parent (-1: a child of the root, the last committed token);
    accept[i]: probability that node i is accepted given that its parent was.
    """
    return 1.0 + sum(_node_reach(parents, accept))


def tree_reach_per_depth(parents: Sequence[int], accept: Sequence[float]) -> list[float]:
    """P(the accepted path reaches depth d), d = 1..max depth."""
    reach = _node_reach(parents, accept)
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    out = [0.0] * (max(depth) if depth else 0)
    for d, r in zip(depth, reach):
        out[d - 1] += r
    return out


# --------------------------------------------------------------------------------------------
# Predicted speedup
# --------------------------------------------------------------------------------------------

Draft = Union[None, float, object]  # None: free; float: seconds per draft forward; else a ModelConfig


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A roofline prediction: tokens per target call, one round's and one AR step's time."""

    expected_tokens: float
    round_s: float
    autoregressive_s: float
    batch: int = 1

    @property
    def speedup(self) -> float:
        return self.expected_tokens * self.autoregressive_s / self.round_s

    @property
    def tokens_per_s(self) -> float:
        """Upper bound on tokens/s over all rows."""
        return self.batch * self.expected_tokens / self.round_s

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(speedup=self.speedup, tokens_per_s=self.tokens_per_s)
        return d


def draft_forward_s(draft: Draft, device: DeviceProfile, *, new_tokens: int = 1, context: float = 0,
                    batch: int = 1, bytes_per_param: float = 2, bytes_per_kv: float = 2) -> float:
    """Seconds of one draft forward: 0 for None, the number itself, or a model's roofline time."""
    if draft is None:
        return 0.0
    if isinstance(draft, (int, float)):
        if draft < 0:
            raise ValueError(f"a draft forward cannot take negative time ({draft}).")
        return float(draft)
    return forward_time(draft, device, new_tokens=new_tokens, context=context, batch=batch,
                        bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)


def autoregressive_prediction(target, device: DeviceProfile, *, context: float = 0, batch: int = 1,
                              bytes_per_param: float = 2, bytes_per_kv: float = 2) -> Prediction:
    t1 = forward_time(target, device, new_tokens=1, context=context, batch=batch,
                      bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)
    return Prediction(1.0, t1, t1, batch)


def chain_prediction(target, device: DeviceProfile, *, gamma: int, expected_tokens: float | None = None,
                     alpha: float | None = None, draft: Draft = None, context: float = 0, batch: int = 1,
                     bytes_per_param: float = 2, bytes_per_kv: float = 2) -> Prediction:
    """Speculative decoding with a gamma-token chain (give `expected_tokens` or `alpha`)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}.")
    if (expected_tokens is None) == (alpha is None):
        raise ValueError("give exactly one of expected_tokens (measured tau) or alpha (acceptance rate).")
    if expected_tokens is None:
        expected_tokens = expected_tokens_chain(alpha, gamma)
    kw = dict(context=context, batch=batch, bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)
    t1 = forward_time(target, device, new_tokens=1, **kw)
    round_s = gamma * draft_forward_s(draft, device, new_tokens=1, **kw) + forward_time(
        target, device, new_tokens=gamma + 1, **kw)
    return Prediction(float(expected_tokens), round_s, t1, batch)


def tree_prediction(target, device: DeviceProfile, *, nodes: int, depth: int, expected_tokens: float,
                    draft: Draft = None, draft_tokens_per_step: int = 1, context: float = 0, batch: int = 1,
                    bytes_per_param: float = 2, bytes_per_kv: float = 2) -> Prediction:
    """Tree decoding: `depth` draft forwards of `draft_tokens_per_step` tokens, then one target
    forward over the N = `nodes` draft tokens plus the root."""
    if nodes < 1 or depth < 1 or draft_tokens_per_step < 1:
        raise ValueError(f"need nodes, depth, draft_tokens_per_step >= 1; "
                         f"got {nodes}, {depth}, {draft_tokens_per_step}.")
    kw = dict(context=context, batch=batch, bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)
    t1 = forward_time(target, device, new_tokens=1, **kw)
    round_s = depth * draft_forward_s(draft, device, new_tokens=draft_tokens_per_step, **kw) + forward_time(
        target, device, new_tokens=nodes + 1, **kw)
    return Prediction(float(expected_tokens), round_s, t1, batch)


def resolve_draft(spec, target, draft_config=None) -> Draft:
    """A method's declared drafter cost -> a `Draft`.

    spec: "free" / None (no model forward, e.g. prompt lookup), "model" (the run's draft
    model), {"layers": k} (the target's first k layers), or a number of seconds.
    """
    if spec in (None, "free"):
        return None
    if spec == "model":
        if draft_config is None:
            raise ValueError("the method drafts with a draft model, but no draft config was given.")
        return draft_config
    if isinstance(spec, dict) and "layers" in spec:
        return truncated(target, int(spec["layers"]))
    if isinstance(spec, (int, float)):
        return float(spec)
    raise ValueError(f"unknown drafter cost {spec!r}: use 'free', 'model', {{'layers': k}} or seconds.")


def predict(cost: dict, *, target, device: DeviceProfile, expected_tokens: float, draft_config=None,
            context: float = 0, batch: int = 1, bytes_per_param: float = 2,
            bytes_per_kv: float = 2) -> Prediction | None:
    """Prediction for a method's cost description (as the method registry declares it).

    cost: {"kind": "ar"} | {"kind": "chain", "gamma": g, "draft": ...} |
          {"kind": "tree", "nodes": N, "depth": D, "draft_tokens_per_step": k, "draft": ...}.
    Returns None for unknown kinds (e.g. a peer whose drafting schedule is adaptive).
    """
    kw = dict(context=context, batch=batch, bytes_per_param=bytes_per_param, bytes_per_kv=bytes_per_kv)
    kind = cost.get("kind")
    if kind == "ar":
        return autoregressive_prediction(target, device, **kw)
    if kind == "chain":
        draft = resolve_draft(cost.get("draft"), target, draft_config)
        gamma = int(cost["gamma"])
        e = min(max(float(expected_tokens), 1.0), gamma + 1.0)
        return chain_prediction(target, device, gamma=gamma, expected_tokens=e, draft=draft, **kw)
    if kind == "tree":
        draft = resolve_draft(cost.get("draft"), target, draft_config)
        return tree_prediction(target, device, nodes=int(cost["nodes"]), depth=int(cost["depth"]),
                               expected_tokens=float(expected_tokens), draft=draft,
                               draft_tokens_per_step=int(cost.get("draft_tokens_per_step", 1)), **kw)
    return None


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name ('bfloat16' -> 2)."""
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "float8_e4m3fn": 1}
    key = str(dtype).replace("jnp.", "").replace("torch.", "")
    if key not in sizes:
        raise ValueError(f"unknown dtype {dtype!r} for the cost model; known: {', '.join(sizes)}.")
    return sizes[key]


def format_rate(value: float, unit: str) -> str:
    """1.2e12 B/s -> '1.20 TB/s' (for reports)."""
    if value <= 0 or not math.isfinite(value):
        return f"{value} {unit}"
    prefixes = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
    for scale, p in prefixes:
        if value >= scale:
            return f"{value / scale:.3g} {p}{unit}"
    return f"{value:.3g} {unit}"
