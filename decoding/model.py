"""The common model interface: every decoding algorithm talks to models only through it.

Legend: B batch, T new tokens, S cache capacity, D hidden, V vocab, L layers, K kv heads,
Dh head dim.

`forward(config, params, tokens[B,T], positions[B,T], cache, mask=None, ...)` runs T >= 1 new
tokens per row. Their keys/values are written to cache slots `cache.lengths[b] + t`, and the
returned cache has `lengths + T` (callers commit fewer with `KVCache.truncate` / `gather`).
Query t of row b sees every committed slot `s < cache.lengths[b]` and new slot
`lengths[b] + j` iff `mask[b, t, j]` (default: causal) — `decoding.numerics.attention_mask`.
A chain of candidates uses the default mask; a token tree passes its ancestor mask and
positions `prefix_len + depth`, so one call verifies the whole tree.

Pieces for algorithms that work inside the network: `embed`, `run_layers` over any range
`[start, end)` of layers (reading the residual stream after chosen layers, or starting from
injected hidden states), `final_norm`, `lm_head`, `unembed = lm_head(final_norm(.))`.
`hidden[i]` is the residual stream after i layers (`hidden[0]` = embeddings).

Parameters are a plain pytree (dict) with per-layer weights stacked on a leading L axis, so the
layer loop is one `lax.scan` (unrolled on accelerators); `split_layers` gives the same tree with
one array per layer (`params["layers"]` a tuple of L dicts), which every function here accepts. This module holds no architecture: each
function looks up the `decoding.architecture.Architecture` registered for the config's type
(`decoding.llama` for `ModelConfig`, `decoding.gemma3` for `Gemma3Config`) and calls its pieces.
docs/interface.md states the contract in full.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .architecture import LayerParams, for_config
from .cache import KVCache
from .config import ModelConfig
from .options import DEFAULT as DEFAULT_OPTIONS
from .options import Options


def param_shapes(config: ModelConfig) -> dict:
    """The expected parameter tree of `config`, as shapes (the one declaration of weights)."""
    return for_config(config).param_shapes(config)


def param_parts(config: ModelConfig) -> dict:
    """{fused layer parameter: ((part, width), ...)}: the blocks its last axis concatenates, in
    order (e.g. "wqkv": q, k, v). Loaders fill each block from its own checkpoint tensor;
    `decoding.numerics.split_parts` cuts an activation the same way."""
    return for_config(config).param_parts(config)


def check_params(config: ModelConfig, params: dict) -> None:
    """Raise a clear error if `params` does not match `config`'s parameter tree."""
    want = param_shapes(config)
    flat_want = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(v)
        for path, v in jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]
    }
    flat_have = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing = sorted(set(flat_want) - set(flat_have))
    extra = sorted(set(flat_have) - set(flat_want))
    wrong = sorted(k for k in set(flat_want) & set(flat_have) if flat_want[k] != flat_have[k])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if extra:
            details.append(f"unexpected {extra}")
        for k in wrong:
            details.append(f"{k}: expected shape {flat_want[k]}, got {flat_have[k]}")
        raise ValueError("parameters do not match the model config: " + "; ".join(details))


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters (unit tests and drafter initialisation); norms start at the identity
    scale of the architecture's norm (`Architecture.norm_unit`)."""
    arch = for_config(config)
    return random_params(arch.param_shapes(config), key, dtype, scale, norm_value=arch.norm_unit)


def random_params(shapes: dict, key: jax.Array, dtype, scale: float, *, norm_value: float) -> dict:
    """A parameter tree of `shapes` (name -> shape tuple, nested): weights ~ N(0, scale^2), the
    parameters whose names end in "norm" filled with `norm_value` (the unit scale of the
    architecture's norm: 1 for `x * w`, 0 for Gemma's `x * (1 + w)`)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("norm"):
            out.append(jnp.full(shape, norm_value, dtype))
        else:
            out.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """Result of a forward pass.

    logits: float32[B, N, V] (N = T, or the number of `logit_indices`), or None.
    hidden: {layer index: [B, T, D]} for the requested layers.
    cache: the updated cache (lengths advanced by T for `forward`).
    """

    logits: jax.Array | None
    hidden: dict
    cache: KVCache


def embed(config: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens: int32[B, T] -> hidden [B, T, D] (the parameters' dtype)."""
    return for_config(config).embed(config, params, tokens)


def final_norm(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """Residual stream [..., D] -> the normalised stream the head reads."""
    return for_config(config).final_norm(config, params, hidden)


def lm_head(config: ModelConfig, params: dict, normed: jax.Array) -> jax.Array:
    """Normalised hidden [..., D] -> float32 logits [..., V]."""
    return for_config(config).lm_head(config, params, normed)


def unembed(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """Residual stream [..., D] -> float32 logits [..., V] (final norm, then the head)."""
    return lm_head(config, params, final_norm(config, params, hidden))


def run_layers(
    config: ModelConfig,
    params: dict,
    x: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    mask: jax.Array | None = None,
    slot_mask: jax.Array | None = None,
    layers: tuple[int, int] | None = None,
    return_hidden: Sequence[int] = (),
    options: Options | None = None,
):
    """Run decoder layers `[start, end)` on hidden states `x: [B, T, D]`.

    Writes the T new keys/values of those layers at `cache.lengths[b] + t` (the cursor is not
    moved: `forward` does that once all layers ran). Returns `(x, hidden, cache)` where
    `hidden[i]` (for i in `return_hidden`, start < i <= end) is the stream after layer i.
    Injecting hidden states at layer `start` is calling this with them as `x`.
    `slot_mask: bool[B, T, S]` replaces the prefix + block-mask rule (`decoding.numerics.attention_mask`):
    drafters that grow a tree over several calls use it to show each node only its ancestors.
    """
    arch = for_config(config)
    options = (options or DEFAULT_OPTIONS).resolved()
    setup = arch.prepare(config, positions, cache, mask, slot_mask, layers)
    cursor = cache.lengths

    def layer(lp, x, kv, i):
        return arch.layer(config, setup, lp, x, kv, i, cursor, options)

    return layer_range(config, params, x, cache, layer, layers=layers, return_hidden=return_hidden,
                       options=options)


def layer_range(config, params: dict, x: jax.Array, cache: KVCache, layer, *,
                layers: tuple[int, int] | None = None, return_hidden: Sequence[int] = (),
                options: Options | None = None):
    """Drive decoder layers `[start, end)` of any architecture: check the range, run
    `layer(lp, x, kv, i) -> (x, kv)` on each layer's parameters `lp` and its own cache buffer
    `kv: [2, B, K, S, Dh]`, and collect the hidden states asked for. Returns
    `(x, hidden, cache)` (cursor not moved).

    Unrolled (`options.unroll_layers`, resolved by backend when None), `i` is a Python int, so a
    layer may branch on it statically, and each layer updates its own buffers in place. Under
    `lax.scan` `i` is a traced int32: the range's buffers are stacked into `[n, 2, B, K, S, Dh]`
    for the scan and split again after it (two copies of those layers' cache per call: the
    scan serves fast compiles on CPU, the unrolled loop is the in-place one). A range of one
    layer always runs unrolled.
    """
    start, end = (0, config.num_layers) if layers is None else layers
    if not 0 <= start <= end <= config.num_layers:
        raise ValueError(f"layers={layers} is not a range within [0, {config.num_layers}].")
    bad = [i for i in return_hidden if not start < i <= end and i != start]
    if bad:
        raise ValueError(f"return_hidden={tuple(return_hidden)} asks for layers outside ({start}, {end}].")
    hidden = {}
    if start in return_hidden:
        hidden[start] = x
    kvs = list(cache.layers)
    if (options or DEFAULT_OPTIONS).resolved().unroll_layers or end - start <= 1:
        # Straight-line layers: no per-layer loop predicate round trip on GPUs, static slices.
        for i in range(start, end):
            x, kvs[i] = layer(layer_params(params["layers"], i), x, kvs[i], i)
            if i + 1 in return_hidden:
                hidden[i + 1] = x
        return x, hidden, cache.with_layers(kvs)
    stacked = layer_slice(params["layers"], start, end)
    want_hidden = bool([i for i in return_hidden if i != start])

    def body(x, inputs):
        lp, kv, i = inputs
        x, kv = layer(lp, x, kv, i)
        return x, (kv, x if want_hidden else None)

    idx = jnp.arange(start, end, dtype=jnp.int32)
    x, (kv_out, trace) = jax.lax.scan(body, x, (stacked, jnp.stack(kvs[start:end]), idx))
    kvs[start:end] = [kv_out[j] for j in range(end - start)]
    for i in return_hidden:
        if i != start:
            hidden[i] = trace[i - start - 1]
    return x, hidden, cache.with_layers(kvs)


def layer_params(layers, i: int):
    """Layer i's weights from `params["layers"]`: from a split tree (a tuple of L per-layer dicts,
    `split_layers`) its own dict; from stacked weights (`{name: [L, ...]}`) a
    `decoding.architecture.LayerParams`, which reads like that dict (`lp[name]` is the static
    slice) and lets a kernel read layer i of a stack where it lies."""
    if isinstance(layers, (tuple, list)):
        return layers[i]
    return LayerParams(layers, i)


def layer_slice(layers, start: int, end: int) -> dict:
    """Layers [start, end) stacked on a leading axis (`{name: [end - start, ...]}`), from either
    form; the split form is stacked here (a copy: the scan path, used on CPU)."""
    if isinstance(layers, (tuple, list)):
        return jax.tree.map(lambda *w: jnp.stack(w), *layers[start:end])
    return jax.tree.map(lambda w: w[start:end], layers)


def split_layers(params: dict) -> dict:
    """`params` with its per-layer weights split into one array per layer: `params["layers"]`
    becomes a tuple of L dicts `{name: [...]}` (each `[...]` the stacked `[L, ...]` without L).

    Every function of this module takes either form and computes the same values. The split
    form gives an unrolled layer loop its weights as separate buffers, so no layer reads a
    slice of a stacked array (on GPUs a slice the compiler does not fuse into its consumer is a
    device copy per layer per step; `experiments.profile_step --layer-weights` compares the
    two). The stacked form is what loaders, checkpoints, sharding and the trainers use;
    `stack_layers` turns a split tree back. Splitting copies each weight once; the stacked
    arrays are freed when nothing else holds them.
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = {w.shape[0] for w in jax.tree.leaves(layers)}
    if len(n) != 1:
        raise ValueError(f"params['layers'] holds arrays with different leading (layer) sizes {sorted(n)}; "
                         "split_layers needs every per-layer weight stacked on one L axis.")
    split = tuple(jax.tree.map(lambda w: w[i], layers) for i in range(n.pop()))
    return {**params, "layers": split}


def stack_layers(params: dict) -> dict:
    """The inverse of `split_layers`: per-layer weights stacked on a leading L axis again."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    return {**params, "layers": layer_slice(layers, 0, len(layers))}


def forward(
    config: ModelConfig,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    mask: jax.Array | None = None,
    slot_mask: jax.Array | None = None,
    layers: tuple[int, int] | None = None,
    return_hidden: Sequence[int] = (),
    logit_indices: jax.Array | None = None,
    compute_logits: bool = True,
    options: Options | None = None,
) -> Output:
    """Full forward over `tokens: int32[B, T]` at `positions: int32[B, T]` (see module doc).

    `logit_indices: int32[B, N]` restricts the (expensive, [.., V]) logits to chosen new-token
    indices, e.g. the last real token of each right-padded prompt. `layers=(0, k)` runs only
    the first k layers and applies the final norm and head to their output (layer-skip
    self-drafting); only those layers' cache entries are written. `options` (`decoding.Options`)
    picks the attention implementation and whether the layer loop is unrolled.
    """
    # One body for every architecture: embed, run_layers and unembed reach its pieces.
    x = embed(config, params, tokens)
    x, hidden, cache = run_layers(config, params, x, positions, cache, mask=mask, slot_mask=slot_mask,
                                  layers=layers, return_hidden=return_hidden, options=options)
    logits = None
    if compute_logits:
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[..., None].astype(jnp.int32), axis=1)
        logits = unembed(config, params, x)
    return Output(logits=logits, hidden=hidden, cache=cache.truncate(cache.lengths + tokens.shape[1]))


@dataclasses.dataclass
class Model:
    """A loaded model: static config + parameter pytree (+ tokenizer and provenance).

    Not a pytree itself: algorithms take `model.config` (static) and `model.params` (traced)
    separately. `source` records where the weights came from (path, registry name, hub id).
    `layout` (a `decoding.sharding.Layout`: mesh + rules) is set when the parameters are
    sharded (`decoding.shard`, `decoding.load(..., mesh=...)`); None: one device.
    """

    config: ModelConfig
    params: dict
    tokenizer: object = None
    source: str = ""
    layout: object = None

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def forward(self, tokens, positions, cache, **kwargs) -> Output:
        return forward(self.config, self.params, tokens, positions, cache, **kwargs)

    def split_layers(self) -> "Model":
        """This model with one weight array per layer (`decoding.model.split_layers`): same
        outputs; an unrolled decode loop reads no slices of stacked weights. One device only."""
        if self.layout is not None:
            raise ValueError("split_layers works on one device; this model is sharded over a mesh "
                             "(model.layout is set). Load it without mesh= to split its layers.")
        return dataclasses.replace(self, params=split_layers(self.params))

    def init_cache(self, batch_size: int, capacity: int, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch_size, capacity, dtype or self.dtype)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_layers}, d={c.hidden_size}, "
                f"params={c.param_count() / 1e6:.1f}M, dtype={self.dtype}, source={self.source!r})")
