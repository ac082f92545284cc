"""Kernels: each a Pallas implementation beside a pure-jnp reference of the same signature.

`attention`: grouped-query attention for decoding and verification (T new query tokens
against a long cache), with FlashDecoding++'s unified-max softmax as an option; see
`decoding.kernels.attention`; its TPU (Mosaic) variant is `decoding.kernels.attention_tpu`, which
the dispatcher picks on TPUs.

`projection`: the fused projections of a decoder layer for few rows (norm + QKV + bias, output
projection + residual, norm + gate/up + activation, down projection + residual); see
`decoding.kernels.projection`.
"""

from .attention import (
    UNIFIED_MAX_MARGIN,
    attention,
    attention_pallas,
    attention_pallas_prefix,
    attention_reference,
    prefix_visible,
)
from .attention_tpu import attention_tpu, attention_tpu_prefix
from .projection import (
    Projections,
    matmul_residual,
    matmul_residual_reference,
    norm_gate_up,
    norm_gate_up_reference,
    norm_matmul,
    norm_matmul_reference,
)

__all__ = [
    "UNIFIED_MAX_MARGIN", "attention", "attention_pallas", "attention_pallas_prefix", "attention_reference",
    "attention_tpu", "attention_tpu_prefix", "prefix_visible", "Projections", "matmul_residual",
    "matmul_residual_reference", "norm_gate_up", "norm_gate_up_reference", "norm_matmul", "norm_matmul_reference",
]
