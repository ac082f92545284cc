"""Low-rank adapters (LoRA, Hu et al. 2022) on the projection weights of a decoder.

For a linear weight W: [in, out] (the toolkit stores `x @ W`), an adapter is A: [in, r] and
B: [r, out] with the update `x @ W + (alpha / r) * (x @ A) @ B`, i.e. the merged weight
`W + (alpha / r) A @ B`. Per-layer weights are stacked on a leading L axis, so are adapters:
A: [L, in, r], B: [L, r, out].

Choices: targets are the fused projections `wqkv`, `wo`, `w_gate_up`, `w_down` by default
(LoRA on every projection, as QLoRA recommends); A starts Gaussian with std 1/sqrt(in) and B at
zero, so an untrained adapter leaves the model unchanged. The train step merges adapters into
the frozen base once per step (`merge`) and runs the common `forward` on the result: merged
and applied are the same function, and a trained drafter is exported merged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DEFAULT_TARGETS = ("wqkv", "wo", "w_gate_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapter settings: rank r, scale alpha (update scaled by alpha / r), target weights."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_adapters(lora: LoRA, params: dict, key: jax.Array) -> dict:
    """{target: {"a": f32[L, in, r], "b": f32[L, r, out]}} for the base `params`."""
    layers = params["layers"]
    missing = [t for t in lora.targets if t not in layers or jnp.ndim(layers[t]) != 3]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not stacked [L, in, out] projection weights of this model; "
                         f"choose among {sorted(k for k, v in layers.items() if jnp.ndim(v) == 3)}.")
    out = {}
    for name, k in zip(lora.targets, jax.random.split(key, len(lora.targets))):
        n_layers, d_in, d_out = layers[name].shape
        out[name] = {"a": jax.random.normal(k, (n_layers, d_in, lora.rank), jnp.float32) / jnp.sqrt(d_in),
                     "b": jnp.zeros((n_layers, lora.rank, d_out), jnp.float32)}
    return out


def delta(lora: LoRA, adapter: dict) -> jax.Array:
    """The weight update (alpha / r) A @ B: f32[L, in, out]."""
    return lora.scale * jnp.einsum("lir,lro->lio", adapter["a"].astype(jnp.float32),
                                   adapter["b"].astype(jnp.float32))


def merge(lora: LoRA, params: dict, adapters: dict) -> dict:
    """The base parameters with every adapter merged in (each weight keeps its dtype)."""
    layers = dict(params["layers"])
    for name, adapter in adapters.items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(lora, adapter)).astype(w.dtype)
    return {**params, "layers": layers}


def apply(lora: LoRA, x: jax.Array, weight: jax.Array, adapter: dict) -> jax.Array:
    """x @ W + (alpha / r) (x @ A) @ B for one layer: x [..., in], W [in, out], A [in, r], B [r, out]."""
    return x @ weight + lora.scale * ((x @ adapter["a"]) @ adapter["b"])
