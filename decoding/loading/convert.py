"""The conversion engine: checkpoint tensors, one at a time, into our parameter tree.

A family's name map (`NameMap`, declared by its `decoding.architecture.Architecture`) sends
every checkpoint tensor name to one parameter of `decoding.model.param_shapes` (plus a layer
index for per-layer weights, and for the fused projections the block of columns it fills:
q_proj -> the q columns of `wqkv`, see `decoding.model.param_parts`) with a transform (`Rule`):
`transpose` of a `[out, in]` linear weight to our `[in, out]`; for llama-arch GGUF files the
inverse of llama.cpp's rotary row permutation of Q and K; for Gemma 3 GGUF files `offset=-1`
on every norm weight (llama.cpp stores Gemma's `1 + w` where the Hugging Face checkpoint stores
`w`). Every transform applies to the checkpoint tensor on its own, before it is written into
its block of a fused parameter. Each tensor's shape is checked before it is transformed;
unknown names, missing tensors and wrong shapes are errors that name the checkpoint tensor.

Tensors are converted one at a time (float32 in numpy, then cast to the requested dtype into
their place in a preallocated stacked host buffer; a fused parameter's converted blocks are
written side by side, which concatenates them without a second copy), and each finished buffer
is moved to the device and freed (`to_device`), so the host never holds more than one full
copy of the model in the target dtype.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from ..model import param_parts, param_shapes


class LoadError(ValueError):
    """A checkpoint cannot be loaded (missing files, mismatched tensors, unreachable hub)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one checkpoint tensor becomes one of our parameters.

    param: key in `param_shapes` (top level or under "layers").
    part: for a fused parameter (`param_parts`), the block of its last axis this tensor fills
        ("q", "k", "v" of `wqkv`/`bqkv`; "gate", "up" of `w_gate_up`).
    transpose: the tensor is a `[out, in]` linear weight; ours is `[in, out]`.
    unpermute: "q" or "k" to undo llama.cpp's rotary row permutation (llama-arch GGUF only).
    offset: added to the tensor in float32 (-1 for the norm weights of Gemma GGUF files).
    """

    param: str
    part: str | None = None
    transpose: bool = False
    unpermute: str | None = None
    offset: float = 0.0

    def target(self, layer: int | None = None) -> str:
        """The parameter (and block) this rule fills, e.g. "layers.3.wqkv[k]"."""
        name = self.param if layer is None else f"layers.{layer}.{self.param}"
        return name if self.part is None else f"{name}[{self.part}]"

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(target)) if self.transpose else tuple(target)

    def apply(self, x: np.ndarray, config) -> np.ndarray:
        if self.unpermute is not None:
            heads = config.num_heads if self.unpermute == "q" else config.num_kv_heads
            x = unpermute_rotary_rows(x, heads)
        if self.offset:
            x = x + np.float32(self.offset)
        return x.T if self.transpose else x


HF_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")
HF_LAYER_NAME = "model.layers.{layer}.{name}"  # the inverse of HF_LAYER_PATTERN
HF_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")
GGUF_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
GGUF_LAYER_NAME = "blk.{layer}.{name}"


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A checkpoint format's tensor names for one family.

    top: {tensor name: Rule} of top-level tensors. layer: {name under a layer's prefix: Rule}.
    layer_pattern matches a per-layer name as (layer, name under it); layer_name is its inverse
    ("...{layer}...{name}"), used to name missing tensors. ignored: names dropped unread.
    renames: (pattern, replacement) prefixes substituted at the start of each name first.
    """

    top: dict
    layer: dict
    layer_pattern: re.Pattern
    layer_name: str
    ignored: re.Pattern | None = None
    renames: tuple[tuple[re.Pattern, str], ...] = ()

    @classmethod
    def hf(cls, top: dict, layer: dict, renames: tuple = ()) -> "NameMap":
        """Names of a Hugging Face safetensors checkpoint ("model.layers.{i}.<name>")."""
        return cls(top, layer, HF_LAYER_PATTERN, HF_LAYER_NAME, HF_IGNORED, renames)

    @classmethod
    def gguf(cls, top: dict, layer: dict) -> "NameMap":
        """Names of a GGUF file ("blk.{i}.<name>")."""
        return cls(top, layer, GGUF_LAYER_PATTERN, GGUF_LAYER_NAME)


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (`[heads*Dh, ...]`, interleaved -> rotate-half).

    llama.cpp's converter reorders each head's rows from the rotate-half layout (pairs i and
    i + Dh/2) to the interleaved one (pairs 2i and 2i + 1): `reshape(heads, 2, Dh/2, ...)`
    then swaps axes 1 and 2. This is the inverse.
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (the inverse of `unpermute_rotary_rows`)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Building the parameter tree tensor by tensor
# --------------------------------------------------------------------------------------------


class ParamBuilder:
    """Collects converted tensors into stacked host buffers of the target dtype.

    sources: {(parameter, part, per-layer?): checkpoint tensor name, with "{layer}" in per-layer
    names}, to name what is missing in the checkpoint's own terms.
    """

    def __init__(self, config, dtype, where: str, sources: dict | None = None):
        self.config = config
        self.dtype = np.dtype(jnp.dtype(dtype))
        self.where = where
        self.sources = sources or {}
        self.shapes = param_shapes(config)
        self.parts = param_parts(config)  # fused layer parameter -> ((part, width), ...)
        # (fused parameter, part) -> its columns [start, stop) along the last axis
        self.columns: dict[tuple[str, str], tuple[int, int]] = {}
        for param, parts in self.parts.items():
            start = 0
            for part, width in parts:
                self.columns[(param, part)] = (start, start + width)
                start += width
        self.top: dict[str, np.ndarray] = {}
        self.layers: dict[str, np.ndarray] = {}
        self.filled: set[tuple[str, str | None, int | None]] = set()

    def put(self, name: str, rule: Rule, layer: int | None, tensor: np.ndarray) -> None:
        """Check `tensor`'s shape against the parameter's (block's), transform it and store it."""
        if layer is None:
            if rule.param not in self.shapes:  # e.g. lm_head of a tied model
                return
            target = self.shapes[rule.param]
        else:
            if rule.param not in self.shapes["layers"]:
                bias = f" with qkv_bias={self.config.qkv_bias}" if hasattr(self.config, "qkv_bias") else ""
                raise LoadError(
                    f"{self.where}: tensor {name!r} maps to {rule.target()!r}, which a "
                    f"{self.config.model_type} config{bias} does not have. "
                    "The config and the weights disagree; check config.json / the GGUF metadata."
                )
            if not 0 <= layer < self.config.num_layers:
                raise LoadError(f"{self.where}: tensor {name!r} is for layer {layer}, but the config "
                                f"has {self.config.num_layers} layers.")
            target = self.shapes["layers"][rule.param][1:]
        parts = self.parts.get(rule.param) if layer is not None else None
        columns = self.columns.get((rule.param, rule.part))
        if (parts is None) != (rule.part is None) or (parts is not None and columns is None):
            raise LoadError(f"{self.where}: the name map sends tensor {name!r} to {rule.target(layer)!r}, "
                            f"but that parameter's blocks are {parts}.")  # a name map bug, not a file's
        if columns is not None:
            target = (*target[:-1], columns[1] - columns[0])
        expected = rule.source_shape(target)
        if tuple(tensor.shape) != expected:
            raise LoadError(
                f"{self.where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} "
                f"for parameter {rule.target()!r} of config {describe(self.config)}. The checkpoint does "
                "not match its config (or was converted with a different layout)."
            )
        key = (rule.param, rule.part, layer)
        if key in self.filled:
            raise LoadError(f"{self.where}: tensor {name!r} appears twice (parameter {rule.target(layer)}).")
        value = rule.apply(np.asarray(tensor, dtype=np.float32), self.config)
        if layer is None:  # C order: a transposed view would otherwise stay Fortran-ordered
            self.top[rule.param] = np.ascontiguousarray(value, dtype=self.dtype)
        else:
            if rule.param not in self.layers:
                self.layers[rule.param] = np.empty(self.shapes["layers"][rule.param], self.dtype)
            if columns is None:
                self.layers[rule.param][layer] = value  # cast on assignment
            else:  # its block of the fused parameter: the blocks side by side are the concatenation
                self.layers[rule.param][layer, ..., columns[0]:columns[1]] = value
        self.filled.add(key)

    def missing(self) -> list[str]:
        """Every parameter (block) not filled yet, named by its checkpoint tensor when known."""
        want = [(p, None, None) for p in self.shapes if p != "layers"]
        want += [(p, part, i) for p in self.shapes["layers"] for i in range(self.config.num_layers)
                 for part, _ in self.parts.get(p, ((None, 0),))]
        out = []
        for p, part, i in want:
            if (p, part, i) in self.filled:
                continue
            ours = Rule(p, part).target(i)
            source = self.sources.get((p, part, i is not None))
            out.append(ours if source is None else f"{source.format(layer=i)} (-> {ours})")
        return out

    def host_params(self) -> dict:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
            raise LoadError(f"{self.where}: the checkpoint lacks tensors for: {shown}.")
        return {**self.top, "layers": self.layers}


def to_device(host: dict, config=None, layout=None) -> dict:
    """Move a host parameter tree to the default device, freeing each host buffer as it goes;
    with a `layout` (`decoding.sharding.Layout`), straight into its sharded layout (each device
    receives only its slice: `decoding.sharding.put_params`)."""
    if layout is not None:
        from ..sharding import put_params

        return put_params(host, config, layout.mesh, layout.rules, consume=True)
    out = {"layers": {}}
    for name in list(host["layers"]):
        out["layers"][name] = jnp.asarray(host["layers"].pop(name))
    for name in [k for k in host if k != "layers"]:
        out[name] = jnp.asarray(host.pop(name))
    return out


def describe(c) -> str:
    return (f"({c.model_type}: L={c.num_layers}, D={c.hidden_size}, F={c.intermediate_size}, "
            f"H={c.num_heads}, K={c.num_kv_heads}, Dh={c.head_dim}, V={c.vocab_size})")


def convert(config, tensors: Iterator[tuple[str, Callable[[], np.ndarray]]], names: NameMap, dtype,
            where: str) -> dict:
    """Convert `(name, read)` pairs with a name map into a host parameter tree (numpy, `dtype`).

    All names are matched before any tensor is read, so an unknown name fails fast.
    """
    top, layer_rules, layer_pattern, layer_name = names.top, names.layer, names.layer_pattern, names.layer_name
    ignored, renames = names.ignored, names.renames
    plan, unknown = [], []
    for name, read in tensors:
        if ignored is not None and ignored.fullmatch(name):
            continue
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name, count=1) if pattern.match(name) else name
        m = layer_pattern.fullmatch(name)
        if name in top:
            plan.append((name, top[name], None, read))
        elif m and m.group(2) in layer_rules:
            plan.append((name, layer_rules[m.group(2)], int(m.group(1)), read))
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise LoadError(
            f"{where}: tensor name(s) not in the {config.model_type} name map: {shown}. The checkpoint "
            "holds weights this implementation does not model; refusing to drop them silently."
        )
    sources = {(r.param, r.part, False): name for name, r in top.items()}
    sources.update({(r.param, r.part, True): layer_name.format(layer="{layer}", name=name)
                    for name, r in layer_rules.items()})
    builder = ParamBuilder(config, dtype, where, sources)
    for name, rule, layer, read in plan:
        builder.put(name, rule, layer, read())
    return builder.host_params()
