"""Kernels: each a Pallas implementation beside a pure-jnp reference of the same signature.

`attention`: grouped-query attention for decoding and verification (T new query tokens
against a long cache), with FlashDecoding++'s unified-max softmax as an option; see
`decoding.kernels.attention`.
"""

from .attention import (
    UNIFIED_MAX_MARGIN,
    attention,
    attention_pallas,
    attention_pallas_prefix,
    attention_reference,
    prefix_visible,
)

__all__ = [
    "UNIFIED_MAX_MARGIN", "attention", "attention_pallas", "attention_pallas_prefix", "attention_reference",
    "prefix_visible",
]
