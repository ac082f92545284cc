"""Sharding past one device: logical axes, one rules table, and the layouts they give.

GSPMD (Xu et al. 2021, "GSPMD: General and Scalable Parallelization for ML Computation
Graphs") partitions a jitted program from the shardings of its inputs and a few constraints;
this module only says where each array lies. The style is jax-llm-examples' and MaxText's,
smaller: every parameter is declared once with its *logical* axes (beside its shape, in the
family's module: `Architecture.param_axes`), the cache and the activations name theirs here,
and a small frozen `Rules` table maps logical axes to mesh axes. Tensor parallelism (heads,
kv heads, mlp and vocab over the mesh axis "model") and data parallelism (batch over "data")
are rule choices, not code paths.

    mesh = decoding.sharding.make_mesh(data=1, model=8)       # or any jax.sharding.Mesh
    model = decoding.load("qwen2.5-7b-instruct", mesh=mesh)   # loaded straight into its layout
    model = decoding.shard(model, mesh)                       # the same for an in-memory model
    decoding.generate(model, prompts)                         # runs sharded, same call

Logical axes (`LOGICAL_AXES`): batch, sequence, heads, kv_heads, head_dim, embed (the model
dimension D), mlp (F), vocab, layers (the stacked L axis), cache_slots (S), and fused_in (the
input axis D of a fused projection, see below). A rule that does not divide a dimension (12
heads over 8 devices) raises `ShardingError` naming the logical axis, the mesh axis and the
sizes; the count checked is that of the logical units (heads, not heads x head_dim), so a
merged `[H * Dh]` axis is never cut inside a head.

Choices the references leave open, as made here:
  * Fused projections (`wqkv: [L, D, (H + 2K) * Dh]`, `w_gate_up: [L, D, 2F]`, `bqkv`) are
    sharded on their input axis D (logical `fused_in`, over "model" by default), never on the
    output axis: cutting that axis into equal pieces would give device 0 all of q and device 7
    the v heads. Each device multiplies its D/n rows and one all-reduce sums the partial
    q/k/v (or gate/up) activations, which are then cut per head or per mlp column (a local
    slice: the cache and `wo`/`w_down` are sharded on heads and mlp). The weights are never
    gathered, the layer code is unchanged, and the extra cost is one activation all-reduce
    per fused matmul ([B, T, (H + 2K) Dh] and [B, T, 2F], small while decoding). A
    per-device-contiguous reordering of the fused columns would save those two all-reduces
    but changes the parameter layout every consumer reads; it is not done.
  * The norms and the residual stream are replicated over "model" (`embed` maps to nothing).
  * The KV cache `kv[2, B, K, S, Dh]` is sharded as (None, batch, kv_heads, cache_slots,
    head_dim). Caches a strategy creates inside its program (draft models, feature heads) are
    constrained by their shape with the same rules; a dimension those rules cannot divide
    there stays replicated (their models may be smaller than the target).
  * Models without logical axes (Medusa and EAGLE heads, whose configs register no family)
    are replicated over the mesh when they run beside a sharded target.
  * Random numbers follow `jax_threefry_partitionable` (on by default), so sampled outputs
    do not depend on the mesh.
  * The Pallas attention kernel needs per-device shapes: on a mesh it runs under
    `jax.shard_map` (`per_device_attention`), each device attending its own rows and heads.
  * Results: `generate`'s program returns everything but the caches replicated
    (`replicated_out`), and each process reads its own copy (`local_view`); tokenization,
    stop strings and texts are host work every process repeats identically.
  * Training (`distill.Trainer(mesh=)`): batches over "batch" (`put_batch`), optimizer state
    laid out like its parameters (`like_params`), leaves not on the mesh replicated (`on_mesh`).

Multi-host: call `jax.distributed.initialize()` first; the same mesh over `jax.devices()`
(every host's) and the same calls follow (docs/sharding.md).

Legend: B batch, T tokens, S cache slots, L layers, D hidden, F ffn, V vocab, H heads, K kv
heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .architecture import for_config
from .cache import KVCache

LOGICAL_AXES = ("batch", "sequence", "heads", "kv_heads", "head_dim", "embed", "mlp", "vocab", "layers",
                "cache_slots", "fused_in")
"""Every logical axis name a declaration may use."""

CACHE_AXES = (None, "batch", "kv_heads", "cache_slots", "head_dim")
"""Logical axes of one layer's cache buffer kv[2, B, K, S, Dh]."""
LENGTHS_AXES = ("batch",)
"""Logical axes of the cache cursor lengths[B]."""
ACTIVATION_AXES = {"hidden": ("batch", "sequence", "embed"), "logits": ("batch", "sequence", "vocab"),
                   "tokens": ("batch", "sequence")}
"""Logical axes of the key activations: the residual stream [B, T, D], logits [B, T, V], tokens [B, T]."""


class ShardingError(ValueError):
    """A rule, a mesh and a model that do not fit together (the message says how)."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axis (a name, a tuple of names, or None: replicated), frozen and
    hashable. Axes not listed are replicated. `Rules.of({...})` builds one from a mapping."""

    table: tuple = ()

    def __post_init__(self):
        unknown = [k for k, _ in self.table if k not in LOGICAL_AXES]
        if unknown:
            raise ShardingError(f"rules name unknown logical axes {unknown}; the logical axes are {LOGICAL_AXES}.")

    @classmethod
    def of(cls, mapping: Mapping) -> "Rules":
        return cls(tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in mapping.items())))

    def mesh_axes(self, logical: str | None):
        if logical is None:
            return None
        return dict(self.table).get(logical)

    def replace(self, **changes) -> "Rules":
        """These rules with some logical axes mapped elsewhere (None: replicated)."""
        return Rules.of({**dict(self.table), **changes})


DEFAULT_RULES = Rules.of({"batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model",
                          "vocab": "model", "fused_in": "model"})
"""Tensor parallel over "model" (heads, kv heads, mlp, vocab; fused projections on their input
axis) and data parallel over "data" (batch)."""
REPLICATED = Rules()
"""Every array whole on every device."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules laying a model out on it (hashable: part of compile keys)."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh of `data * model` devices (model defaults to all the others)."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        if len(devices) % data:
            raise ShardingError(f"data={data} does not divide the {len(devices)} devices.")
        model = len(devices) // data
    if data * model > len(devices):
        raise ShardingError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} are visible "
                            "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax).")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def param_axes(config) -> dict:
    """The logical axes of every parameter of `config`: the tree of `param_shapes(config)` with
    a tuple of logical names (or None) per dimension, as its family declares them."""
    arch = for_config(config)
    if arch.param_axes is None:
        raise ShardingError(f"architecture {arch.name!r} declares no logical axes (Architecture.param_axes); "
                            "declare them beside param_shapes to shard it.")
    return arch.param_axes(config)


def logical_units(config) -> dict:
    """How many indivisible units each logical axis of `config` counts (heads, not H * Dh)."""
    return {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "embed": config.hidden_size, "fused_in": config.hidden_size,
            "mlp": getattr(config, "intermediate_size", None), "vocab": config.vocab_size,
            "layers": config.num_layers}


def mesh_size(mesh: Mesh, axes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    missing = [a for a in names if a not in mesh.shape]
    if missing:
        raise ShardingError(f"the rules name mesh axes {missing}, which this mesh lacks (its axes: "
                            f"{dict(mesh.shape)}); map those logical axes to {tuple(mesh.shape)} or None.")
    return int(np.prod([mesh.shape[a] for a in names]))


def spec(axes, shape, mesh: Mesh, rules: Rules, units: Mapping | None = None, *, where: str = "array",
         strict: bool = True) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` with logical `axes` under `rules`.

    A mesh axis of size 1 is dropped. The size checked against the mesh is `units[logical]`
    when given (e.g. 12 heads for a [12 * 64] axis), else the dimension. Not dividing raises
    `ShardingError` (strict) or leaves that dimension replicated (not strict). A mesh axis
    may shard only one dimension of an array (the later one is left replicated)."""
    if len(axes) != len(shape):
        raise ShardingError(f"{where}: {len(axes)} logical axes {axes} for a {len(shape)}-d shape {shape}.")
    out, used = [], set()
    for logical, dim in zip(axes, shape):
        target = rules.mesh_axes(logical)
        if target is None:
            out.append(None)
            continue
        size = mesh_size(mesh, target)
        names = (target,) if isinstance(target, str) else tuple(target)
        if size == 1 or used & set(names):
            out.append(None)
            continue
        count = (units or {}).get(logical) or dim
        if count % size or dim % size:
            if not strict:
                out.append(None)
                continue
            raise ShardingError(
                f"{where}: logical axis {logical!r} has {count} {'units' if count != dim else 'entries'} "
                f"(dimension {dim}), which mesh axis {target!r} of size {size} does not divide. Use a mesh "
                f"whose {target!r} size divides {count}, or map {logical!r} elsewhere, e.g. "
                f"rules=DEFAULT_RULES.replace({logical}=None).")
        used |= set(names)
        out.append(target)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def param_specs(config, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """PartitionSpecs of `config`'s parameter tree (checked: indivisible rules raise)."""
    from .model import param_shapes

    shapes, axes, units = param_shapes(config), param_axes(config), logical_units(config)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731

    def one(path, shape, ax):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return spec(ax, shape, mesh, rules, units, where=f"parameter {name!r} {tuple(shape)}")

    return jax.tree_util.tree_map_with_path(one, shapes, axes, is_leaf=is_shape)


def param_shardings(config, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """NamedShardings of `config`'s parameter tree on `mesh` under `rules`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def cache_spec(config, mesh: Mesh, rules: Rules, batch_size: int, capacity: int, *, strict: bool = True):
    """(spec of each kv[2, B, K, S, Dh] buffer, spec of lengths[B])."""
    units = {**logical_units(config), "batch": batch_size}
    shape = (2, batch_size, config.num_kv_heads, capacity, config.head_dim)
    return (spec(CACHE_AXES, shape, mesh, rules, units, where="KV cache buffer", strict=strict),
            spec(LENGTHS_AXES, (batch_size,), mesh, rules, where="KV cache lengths", strict=strict))


def cache_shardings(config, mesh: Mesh, rules: Rules, batch_size: int, capacity: int) -> KVCache:
    """A KVCache-shaped tree of NamedShardings (one per layer buffer, one for lengths)."""
    kv, lengths = cache_spec(config, mesh, rules, batch_size, capacity)
    return KVCache(tuple(NamedSharding(mesh, kv) for _ in range(config.num_layers)), NamedSharding(mesh, lengths))


def init_cache(config, batch_size: int, capacity: int, mesh: Mesh, rules: Rules = DEFAULT_RULES,
               dtype=None) -> KVCache:
    """An empty KVCache created directly in its sharded layout (never whole on one device)."""
    import jax.numpy as jnp

    out = cache_shardings(config, mesh, rules, batch_size, capacity)
    make = jax.jit(lambda: KVCache.init(config, batch_size, capacity, dtype or jnp.bfloat16), out_shardings=out)
    return make()


def put_params(params: dict, config, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, consume: bool = False) -> dict:
    """Place a parameter tree (numpy or jax arrays) in its sharded layout, one leaf at a time:
    each device receives only its own slice (`jax.make_array_from_callback`), so the whole
    model never sits on one device. `consume` pops each leaf from `params` (a host tree the
    caller drops) as soon as it is placed, freeing host memory as loading goes."""
    if isinstance(params["layers"], (tuple, list)):
        raise ShardingError("these parameters have their layers split into one array per layer "
                            "(decoding.model.split_layers); sharding places stacked [L, ...] weights: "
                            "pass decoding.model.stack_layers(params), or the model before split_layers().")
    shardings = param_shardings(config, mesh, rules)

    def place(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    take = (lambda d, k: d.pop(k)) if consume else (lambda d, k: d[k])  # noqa: E731
    out = {"layers": {}}
    for name in list(params["layers"]):
        out["layers"][name] = place(take(params["layers"], name), shardings["layers"][name])
    for name in [k for k in params if k != "layers"]:
        out[name] = place(take(params, name), shardings[name])
    return out


def replicate(tree, mesh: Mesh):
    """Every leaf of `tree` whole on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard(model, mesh: Mesh, rules: Rules | None = None):
    """`model` (a `decoding.Model`) with its parameters laid out on `mesh` under `rules`
    (default `DEFAULT_RULES`) and `model.layout` recording both; `decoding.generate` then runs
    every strategy sharded. Models of configs without logical axes are replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    try:
        arch = for_config(model.config)
    except TypeError:
        arch = None
    if arch is None or arch.param_axes is None:
        params = replicate(model.params, mesh)
        rules = REPLICATED
    else:
        params = put_params(model.params, model.config, mesh, rules)
    return dataclasses.replace(model, params=params, layout=Layout(mesh, rules))


def constrain(x: jax.Array, axes, layout: Layout, units: Mapping | None = None) -> jax.Array:
    """`x` constrained (inside jit) to the layout of logical `axes`; dimensions the rules do not
    divide stay replicated."""
    s = spec(axes, x.shape, layout.mesh, layout.rules, units, where="activation", strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, s))


def constrain_caches(tree, layout: Layout | None):
    """Every `KVCache` in `tree` (a strategy's state) constrained to the cache layout, by its
    buffers' shapes; anything else unchanged. A no-op without a layout."""
    if layout is None:
        return tree

    def one(node):
        if not isinstance(node, KVCache):
            return node
        kv = tuple(constrain(buf, CACHE_AXES, layout) for buf in node.layers)
        return KVCache(kv, constrain(node.lengths, LENGTHS_AXES, layout))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))


def describe(tree) -> dict:
    """{path: PartitionSpec string} of a tree of sharded arrays (for reports and tests)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        sh = getattr(x, "sharding", None)
        out[name] = str(getattr(sh, "spec", sh))
    return out


def replicated_out(state, layout: Layout):
    """`state` with everything but its KV caches (the committed tokens, counters and the small
    per-row buffers a strategy's `stats` reads) whole on every device, so that the host of any
    process reads the results without a gather of its own; the caches keep their layout."""
    whole = NamedSharding(layout.mesh, PartitionSpec())

    def one(node):
        if isinstance(node, KVCache):
            return node
        return jax.lax.with_sharding_constraint(node, whole)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, KVCache))


def local_view(state):
    """`state`'s replicated arrays as this process's own copy (a one-device array), so host code
    (`np.asarray`) reads them in a multi-process run, where a global array is not fully
    addressable; KV caches and arrays this process holds whole are returned as they are."""

    def one(node):
        if isinstance(node, KVCache) or not isinstance(node, jax.Array) or node.is_fully_addressable:
            return node
        if not node.is_fully_replicated:
            raise ShardingError(f"an output of shape {node.shape} is split over processes; it must be replicated "
                                "to be read on the host (decoding.sharding.replicated_out).")
        return node.addressable_data(0)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, KVCache))


def per_device_attention(attend, layout: Layout, q: jax.Array, kv: jax.Array, visible: jax.Array) -> jax.Array:
    """`attend(q[B, T, H, Dh], kv[2, B, K, S, Dh], visible) -> [B, T, H, Dh]` (a Pallas kernel,
    which needs per-device shapes) run under `jax.shard_map`: each device attends its own batch
    rows and heads. `visible` is split by rows only: the mask bool[B, T, S] or the prefix
    lengths int32[B]. Heads are split only where the query heads and the kv heads split
    over the same mesh axis (then each device's query heads read exactly its kv heads: the
    groups are contiguous); otherwise the heads stay whole on every device."""
    mesh, rules = layout.mesh, layout.rules
    q_spec = tuple(spec(("batch", None, "heads", None), q.shape, mesh, rules, strict=False)) + (None,) * 4
    kv_spec = tuple(spec(CACHE_AXES, kv.shape, mesh, rules, strict=False)) + (None,) * 5
    rows = q_spec[0] if q_spec[0] == kv_spec[1] else None
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    fn = jax.shard_map(attend, mesh=mesh, in_specs=(PartitionSpec(rows, None, heads), PartitionSpec(None, rows, heads),
                                                    PartitionSpec(rows)),
                       out_specs=PartitionSpec(rows, None, heads), check_vma=False)
    return fn(q, kv, visible)


# --------------------------------------------------------------------------------------------
# Training (distill.Trainer): data parallel batches, optimizer state laid out like its params
# --------------------------------------------------------------------------------------------


def on_mesh(tree, mesh: Mesh):
    """`tree` on `mesh`: leaves already laid out on it (`decoding.shard(...).params`) keep their
    layout, every other leaf is replicated."""
    whole = NamedSharding(mesh, PartitionSpec())

    def one(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh == mesh:
            return x
        return jax.device_put(x, whole)

    return jax.tree.map(one, tree)


def like_params(tree, params):
    """NamedShardings for `tree` (e.g. an optimizer state, abstract or concrete) where every leaf
    whose path ends with a parameter's path and has its shape takes that parameter's sharding
    (Adam's moments are sharded like their weights); other leaves are replicated."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mesh = next(x.sharding.mesh for _, x in flat if isinstance(getattr(x, "sharding", None), NamedSharding))
    by_path = sorted(((jax.tree_util.keystr(p), x) for p, x in flat), key=lambda kv: -len(kv[0]))  # longest first
    whole = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for pkey, p in by_path:
            if key.endswith(pkey) and tuple(np.shape(leaf)) == tuple(p.shape):
                return p.sharding
        return whole

    return jax.tree_util.tree_map_with_path(one, tree)


def put_batch(batch: dict, mesh: Mesh, rules: Rules = DEFAULT_RULES, axis: int = 1) -> dict:
    """Training batches {key: [A, B, T]} with B (dimension `axis`) over the rules' batch axis
    (data parallel); each device receives only its rows."""
    out = {}
    for k, x in batch.items():
        x = np.asarray(x)
        axes = [None] * x.ndim
        axes[axis] = "batch"
        s = NamedSharding(mesh, spec(tuple(axes), x.shape, mesh, rules, where=f"training batch {k!r}"))
        out[k] = jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
    return out
