"""Options: the switches that change a traced program, as one static, hashable value.

Every jitted program of the toolkit (`decoding.generate`, the trainers, nudging's per-model
steps) takes an `Options` as a static argument, so a program traced with one value is never
reused for another: the value is part of the compile key. Nothing here is a module global set
at run time.

    opts = decoding.Options(attention="pallas")
    decoding.generate(model, prompts, options=opts)
    decoding.forward(config, params, tokens, positions, cache, options=opts)

Fields:
  attention: "xla" (the jnp reference, `decoding.attention.reference`) or "pallas"
      (`decoding.kernels.attention`; where the layer index is static and the head dim a power
      of two, else the reference; the Mosaic variant `decoding.kernels.attention_tpu` on TPUs,
      the Triton kernel on GPUs, the Triton kernel interpreted elsewhere, for tests).
  projections: "xla" (jnp: `jnp.dot` with the norm, bias, activation and residual as XLA
      compiles them) or "pallas" (`decoding.kernels.projection`: norm + QKV (+ bias), output
      projection + residual, norm + gate/up + activation, down projection + residual, one
      kernel each; for calls of at most `MAX_ROWS` (16) rows B * T on one device, the Triton
      kernels on GPUs, interpreted on CPUs for tests; TPUs, meshes and longer calls, prefill
      included, keep the jnp path).
  unroll_layers: True unrolls the layer loop into straight-line code (no per-layer loop
      predicate on GPUs), False runs it as one `lax.scan` (fast compiles on CPU); None picks
      by backend (`resolved()`).
  command_buffers: XLA:GPU command buffers (CUDA graphs) for the whole-generation program: ""
      keeps XLA's default; "while" adds WHILE and CONDITIONAL to the default kinds (the decode
      loop stays on the device); any other value is XLA's `xla_gpu_enable_command_buffer`
      list. Other backends ignore it.
  layout: a `decoding.sharding.Layout` (mesh + rules) when the program runs on a mesh; set by
      `decoding.generate` from a sharded model (`model.layout`), None on one device. The Pallas
      attention then runs per device under `jax.shard_map` (a kernel needs per-device shapes).

`Options.from_env()` reads DECODING_ATTENTION, DECODING_PROJECTIONS, DECODING_UNROLL_LAYERS and
DECODING_COMMAND_BUFFERS once, for command lines; library code never reads the environment.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ATTENTION_IMPLS = ("xla", "pallas")
PROJECTION_IMPLS = ("xla", "pallas")
#: the kinds XLA's `xla_gpu_enable_command_buffer` accepts
COMMAND_BUFFER_KINDS = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "COLLECTIVES", "CONDITIONAL", "WHILE",
                        "DYNAMIC_SLICE_FUSION")
COMMAND_BUFFER_PRESETS = {"while": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"}


@dataclasses.dataclass(frozen=True)
class Options:
    """Static switches of a traced program (see the module doc). Hashable; part of every
    compile key."""

    attention: str = "xla"
    projections: str = "xla"
    unroll_layers: bool | None = None
    command_buffers: str = ""
    layout: object = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"Options.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}.")
        if self.projections not in PROJECTION_IMPLS:
            raise ValueError(f"Options.projections must be one of {PROJECTION_IMPLS}, got {self.projections!r}: "
                             "'xla' for the jnp projections, 'pallas' for the fused kernels of "
                             "decoding.kernels.projection.")
        if self.unroll_layers not in (None, True, False):
            raise ValueError(f"Options.unroll_layers must be True, False or None (by backend), "
                             f"got {self.unroll_layers!r}.")
        value = self.command_buffers.strip()
        if value and value.lower() not in COMMAND_BUFFER_PRESETS and value != "default":
            bad = [k for k in value.split(",") if k.strip().upper() not in COMMAND_BUFFER_KINDS]
            if bad:
                raise ValueError(f"Options.command_buffers={self.command_buffers!r}: {bad} are not XLA command "
                                 f"buffer kinds. Use '', 'while' or a comma-separated list of {COMMAND_BUFFER_KINDS}.")

    def resolved(self) -> Options:
        """These options with `unroll_layers` decided for the current backend (unrolled on
        accelerators, a scan on CPU). Compile keys use the resolved value."""
        if self.unroll_layers is not None:
            return self
        return dataclasses.replace(self, unroll_layers=jax.default_backend() != "cpu")

    def compiler_options(self) -> dict | None:
        """The XLA compile options `command_buffers` asks for (None: XLA's defaults)."""
        value = self.command_buffers.strip()
        if not value or value == "default":
            return None
        return {"xla_gpu_enable_command_buffer": COMMAND_BUFFER_PRESETS.get(value.lower(), value)}

    @classmethod
    def from_env(cls, environ=None) -> Options:
        """Options from DECODING_ATTENTION, DECODING_PROJECTIONS, DECODING_UNROLL_LAYERS (1/0) and
        DECODING_COMMAND_BUFFERS, for command lines and benchmark scripts."""
        env = os.environ if environ is None else environ
        unroll = env.get("DECODING_UNROLL_LAYERS", "").strip().lower()
        if unroll not in ("", "1", "0", "true", "false"):
            raise ValueError(f"DECODING_UNROLL_LAYERS must be 1, 0 or unset, got {unroll!r}.")
        return cls(attention=env.get("DECODING_ATTENTION", "xla") or "xla",
                   projections=env.get("DECODING_PROJECTIONS", "xla") or "xla",
                   unroll_layers=None if not unroll else unroll in ("1", "true"),
                   command_buffers=env.get("DECODING_COMMAND_BUFFERS", ""))


DEFAULT = Options()
