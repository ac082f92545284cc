"""What every benchmark method is: the `Method` base class, the `Generation` it returns, and
`MethodUnavailable` (a method that cannot run here).

The method registry (`experiments.methods`) and the transformers peers (`experiments.hf_peers`)
both build on these; keeping them apart from the registry keeps the two from importing each other.
"""

from __future__ import annotations

import abc
import dataclasses
import time


class MethodUnavailable(RuntimeError):
    """A method cannot be built here (its strategy or library is missing)."""


@dataclasses.dataclass
class Generation:
    """What one batched call produced. tokens/texts per row; times in seconds.

    target_forwards: batched target calls (prefill included); row_forwards: each row's own
    target calls (those made while the row was still generating, or its own calls when rows
    were run separately); without it every row counts the batched calls;
    tau: tokens per target call (mean over rows); extra: method-specific figures (e.g.
    acceptance_per_position).
    """

    tokens: list
    texts: list
    run_s: float
    compile_s: float = 0.0
    target_forwards: int = 0
    tau: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    row_forwards: list | None = None


class Method(abc.ABC):
    """Base class of a built method. Subclasses set `cost` and implement `generate`."""

    #: roofline cost description (see `decoding.roofline.predict`), or None
    cost: dict | None = None
    #: warm up once per prompt-shape bucket (programs compiled per shape) instead of once
    warmup_per_shape: bool = True

    def __init__(self, label: str, name: str, options: dict):
        self.label, self.name, self.options = label, name, dict(options)

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], seed: int) -> Generation:
        """Generate for a batch of token-id prompts; the seed drives sampling."""

    def warmup(self, prompts: list[list[int]], seed: int) -> float:
        """Run once untimed, so that what needs compiling is compiled before timing.

        Returns the seconds spent: the compile time where it is known apart (the JAX methods),
        else the warm-up's wall time."""
        t0 = time.perf_counter()
        self.generate(prompts, seed)
        return time.perf_counter() - t0

    def info(self) -> dict:
        """Settings to record with the results."""
        return {"name": self.name, "options": self.options, "cost": self.cost}

    def close(self) -> None:
        """Free what the method holds (models on the device)."""
