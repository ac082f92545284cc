"""What a model family declares to run behind the common model interface, and the registry.

`decoding.model`'s functions (`forward`, `embed`, `run_layers`, `param_shapes`, ...) hold no
architecture of their own: they look up the `Architecture` registered for the config's type
and call its pieces, so every decoding algorithm runs every registered family unchanged. The
loaders look families up by Hugging Face `model_type` or GGUF architecture name the same way.
A family is one module that defines its config (a frozen, hashable dataclass with at least
`num_layers`, `num_heads`, `num_kv_heads`, `head_dim`, `hidden_size`, `vocab_size`,
`model_type`, `param_count()`), one `Architecture` value and calls `register` on it
(docs/interface.md, "Adding an architecture"). `decoding.llama` and `decoding.gemma3` are the
two shipped; `decoding/__init__.py` imports both.

Legend: B batch, T new tokens, S cache capacity, D hidden, V vocab, L layers, K kv heads,
Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from .config import ConfigError


@dataclasses.dataclass(frozen=True, eq=False)
class Architecture:
    """One model family behind the common interface (each field a pure function or constant).

    name: a short label ("llama", "gemma3").
    config_type: the config class whose instances this family serves (looked up by exact type).
    model_types: the Hugging Face `model_type`s it accepts (`config_from_hf` turns such a
        `config.json` dict into a `config_type`, refusing fields it does not model).
    param_shapes(config) -> {name: shape, "layers": {name: (L, ...)}}: the one declaration of
        weights; param_parts(config) -> {fused layer parameter: ((part, width), ...)}.
    param_axes(config) -> the same tree with a tuple of logical axis names per dimension
        (`decoding.sharding.LOGICAL_AXES`), declared beside the shapes; None: not shardable.
    norm_unit: the norm weight that is the identity scale (1 for `x * w`, 0 for `x * (1 + w)`):
        random initialisation fills every parameter named "*norm" with it.
    embed(config, params, tokens[B, T]) -> x[B, T, D]; final_norm(config, params, x) -> [.., D];
        lm_head(config, params, normed[.., D]) -> float32 logits [.., V].
    prepare(config, positions[B, T], cache, mask, slot_mask, layers) -> setup: what every layer
        of one call shares (rotary tables, visibility masks), computed once per call.
    layer(config, setup, lp, x[B, T, D], kv[2, B, K, S, Dh], i, cursor[B], options) -> (x, kv):
        decoder layer i on its own cache buffer (keys kv[0], values kv[1]), writing its T new
        keys/values at slots `cursor[b] + t` (with `decoding.cache.write`). Unrolled,
        `i` is a Python int (a layer may branch on it) and `lp` a `LayerParams` (read like a
        dict); under `lax.scan` a traced int32 and a dict of slices.
    hf_names: the name map of Hugging Face safetensors tensors (`decoding.loading.NameMap`).
    gguf_arches: {GGUF `general.architecture`: Hugging Face model_type} it reads.
    gguf_names(gguf_arch) -> NameMap of that GGUF architecture's tensors.
    gguf_keys: `{arch}.` GGUF metadata keys it reads beyond the common ones.
    gguf_fields(gguf_arch, hf_config, get) -> dict: further `config.json` fields from GGUF
        metadata (`get(key, default)` reads `{arch}.{key}`), merged into the common ones.
    """

    name: str
    config_type: type
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    param_shapes: Callable[[Any], dict]
    param_parts: Callable[[Any], dict]
    norm_unit: float
    embed: Callable
    final_norm: Callable
    lm_head: Callable
    prepare: Callable
    layer: Callable
    hf_names: Any = None
    gguf_arches: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gguf_names: Callable[[str], Any] | None = None
    gguf_keys: frozenset = frozenset()
    gguf_fields: Callable[[str, dict, Callable], dict] = lambda arch, cfg, get: {}
    param_axes: Callable[[Any], dict] | None = None


class LayerParams(Mapping):
    """Layer i's parameters as views of the stacked `[L, ...]` arrays: `lp[name]` is
    `stacks[name][i]` (a static slice); `lp.stacks` and `lp.index` let a kernel read layer i of
    a stack where it lies (a slice passed to a custom call would cost a copy of the weight)."""

    def __init__(self, stacks: Mapping[str, Any], index: int):
        self.stacks, self.index = stacks, index

    def __getitem__(self, name: str):
        return jax.tree.map(lambda a: a[self.index], self.stacks[name])

    def __iter__(self):
        return iter(self.stacks)

    def __len__(self) -> int:
        return len(self.stacks)


_BY_CONFIG: dict[type, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}
_BY_GGUF_ARCH: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Make `arch` serve its config type, model_types and GGUF architectures; returns it.

    Registering another family for a config type, model_type or GGUF name already taken is an
    error (registering the same object again changes nothing)."""
    taken = [f"{kind} {key!r} (served by {table[key].name!r})"
             for kind, table, keys in (("config type", _BY_CONFIG, [arch.config_type]),
                                       ("model_type", _BY_MODEL_TYPE, arch.model_types),
                                       ("GGUF architecture", _BY_GGUF_ARCH, arch.gguf_arches))
             for key in keys if table.get(key, arch) is not arch]
    if taken:
        raise ValueError(f"architecture {arch.name!r} claims {', '.join(taken)}; give it its own config type "
                         "and names.")
    _BY_CONFIG[arch.config_type] = arch
    for t in arch.model_types:
        _BY_MODEL_TYPE[t] = arch
    for g in arch.gguf_arches:
        _BY_GGUF_ARCH[g] = arch
    return arch


def registered() -> tuple[Architecture, ...]:
    """Every registered family, in registration order."""
    return tuple(dict.fromkeys(_BY_CONFIG.values()))


def for_config(config) -> Architecture:
    """The family serving `config` (by its exact type)."""
    arch = _BY_CONFIG.get(type(config))
    if arch is None:
        known = ", ".join(a.config_type.__name__ for a in registered())
        raise TypeError(f"no architecture is registered for a config of type {type(config).__name__}; registered "
                        f"config types: {known}. Pass one of those, or define and register an Architecture "
                        "(decoding.architecture.register; see docs/interface.md, 'Adding an architecture').")
    return arch


def model_types() -> tuple[str, ...]:
    """Every Hugging Face model_type some registered family accepts."""
    return tuple(_BY_MODEL_TYPE)


def for_model_type(model_type: str, architectures=None) -> Architecture:
    """The family accepting a Hugging Face `model_type` (ConfigError naming the supported ones)."""
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ConfigError(
            f"unknown architecture model_type={model_type!r} (architectures={architectures}); supported: "
            f"{', '.join(_BY_MODEL_TYPE)}. Convert the checkpoint to one of "
            "these or add the architecture (docs/interface.md, 'Adding an architecture')."
        )
    return arch


def gguf_arches() -> tuple[str, ...]:
    """Every GGUF `general.architecture` some registered family reads."""
    return tuple(_BY_GGUF_ARCH)


def for_gguf_arch(gguf_arch: str, where: str = "GGUF file") -> Architecture:
    """The family reading GGUF files of `general.architecture = gguf_arch`."""
    arch = _BY_GGUF_ARCH.get(gguf_arch)
    if arch is None:
        raise ConfigError(f"{where}: GGUF architecture {gguf_arch!r} is not supported; supported: "
                          f"{', '.join(_BY_GGUF_ARCH)}. Other families need their own model code first.")
    return arch


def config_from_hf(cfg: Mapping[str, Any]):
    """The config object of a Hugging Face `config.json` dict, by its `model_type`; an unknown
    type is refused with the list of supported ones."""
    return for_model_type(cfg.get("model_type"), cfg.get("architectures")).config_from_hf(cfg)
