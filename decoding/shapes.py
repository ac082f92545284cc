"""Static shapes: the one bucketing rule of the toolkit.

A jitted program is compiled once per input shape, so prompt lengths, capacities and batch
sizes are rounded up to a few buckets: `bucket(n)` is the next power of two >= max(n, minimum);
`round_up(n, m)` the next multiple of m. Every caller that pads to a compiled shape uses these.
"""

from __future__ import annotations


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power-of-two multiple of `minimum` that is >= n (`minimum` itself for n <= minimum)."""
    if minimum < 1:
        raise ValueError(f"bucket: minimum must be >= 1, got {minimum}.")
    b = minimum
    while b < n:
        b *= 2
    return b


def round_up(n: int, m: int) -> int:
    """The smallest multiple of m that is >= n."""
    if m < 1:
        raise ValueError(f"round_up: m must be >= 1, got {m}.")
    return (n + m - 1) // m * m


def prompt_bucket(n: int) -> int:
    """The padded prompt length `decoding.generate` compiles for: powers of two from 16 up to
    2048, multiples of 16 above (prompts of one bucket share a compiled program)."""
    return round_up(n, 16) if n > 2048 else bucket(n)
