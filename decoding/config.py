"""Static model configuration for the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).

`ModelConfig` is a frozen, hashable dataclass: it is passed to jitted functions as a static
argument, so two models with the same config share compiled code. It is built from a Hugging
Face `config.json` dict by `ModelConfig.from_hf`, which refuses architectures and config fields
that would change the computation but that this implementation does not model: a model is
never silently run with the wrong math.

Rope scaling is stored as a sorted tuple of (key, value) pairs so the config stays hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# HF `model_type` values served by the single Llama-family implementation.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# Config keys that do not change the forward computation (bookkeeping, tokenizer ids,
# generation defaults, training-only settings). Anything not listed here and not consumed by
# `from_hf` is rejected, so an unfamiliar field that changes the math cannot slip through.
IGNORED_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
        "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
        "attention_dropout", "use_mrope", "pretraining_tp", "_name_or_path",
        "is_llama_config", "rope_interleaved", "tokenizer_class", "auto_map", "quantization_config",
        "output_attentions", "output_hidden_states", "return_dict", "torchscript",
        "tie_encoder_decoder", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "finetuning_task",
        "task_specific_params", "cross_attention_hidden_size", "prefix", "sep_token_id",
        "decoder_start_token_id", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "tf_legacy_loss",
        "use_bfloat16", "pruned_heads", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
        "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "exponential_decay_length_penalty",
        "chat_template", "mlp_bias_is_false", "head_dim_is_default", "_attn_implementation_autoset",
        "output_router_logits", "router_aux_loss_coef",
    }
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A checkpoint's configuration cannot be served by this implementation."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (static, hashable).

    Shapes use: V vocab, D hidden, F ffn, L layers, H query heads, K kv heads, Dh head dim.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs each kv head to serve a whole group of query heads."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return thaw(self.rope_scaling)

    def param_count(self) -> int:
        """Number of parameters (embedding and head counted once each; once if tied)."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return decoder_param_count(self, per_layer_extra=bias, norms_per_layer=2)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict, refusing what we cannot compute."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture model_type={model_type!r} (architectures="
                f"{cfg.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
                "Convert the checkpoint to one of these or add the architecture (docs/interface.md)."
            )
        consumed = set()

        def take(key, default=dataclasses.MISSING):
            consumed.add(key)
            if key in cfg:
                return cfg[key]
            if default is dataclasses.MISSING:
                raise ConfigError(f"config.json lacks the required field {key!r} for {model_type}.")
            return default

        hidden = take("hidden_size")
        heads = take("num_attention_heads")
        head_dim = take("head_dim", None) or hidden // heads
        act = take("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={act!r} is not supported (the Llama family uses 'silu').")
        if take("mlp_bias", False):
            raise ConfigError("mlp_bias=True is not supported: Llama-family MLPs have no bias.")
        attention_bias = take("attention_bias", model_type == "qwen2")
        if model_type == "qwen2" and not attention_bias:
            attention_bias = True  # Qwen2 always carries q/k/v biases.
        if take("attention_bias_o", False):
            raise ConfigError("an output-projection bias is not supported.")
        rope_scaling = take("rope_scaling", None)
        rope_parameters = take("rope_parameters", None)
        rope_theta = take("rope_theta", None)
        if rope_parameters:  # transformers >= 5 folds theta and scaling into one dict
            rp = dict(rope_parameters)
            rope_theta = rp.pop("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = rp
        if rope_theta is None:
            rope_theta = 10000.0
        if rope_scaling:
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"rope_scaling type {rtype!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}."
                )
            rope_scaling.pop("type", None)
            rope_scaling["rope_type"] = rtype
            if rtype == "default":
                rope_scaling = None
            else:
                rope_scaling = tuple(sorted((k, freeze(v)) for k, v in rope_scaling.items()))
        use_sliding = take("use_sliding_window", model_type == "mistral")
        window = take("sliding_window", None)
        if not use_sliding:
            window = None
        layer_types = take("layer_types", None)
        max_window_layers = take("max_window_layers", None)
        if window is not None:
            if layer_types is None and model_type == "qwen2" and max_window_layers is not None:
                # transformers' Qwen2: layers below max_window_layers keep full attention
                layer_types = ["sliding_attention" if i >= max_window_layers else "full_attention"
                               for i in range(int(cfg["num_hidden_layers"]))]
            if layer_types is not None and set(layer_types) != {"sliding_attention"}:
                raise ConfigError(
                    f"mixed full / sliding-window attention layers (layer_types={layer_types}) are not "
                    "supported for this architecture; set use_sliding_window=false if the window is never "
                    "reached, or use a checkpoint with one attention kind."
                )
        max_pos = take("max_position_embeddings", 4096)
        if window is not None and window >= max_pos:
            window = None  # a window as long as the context never masks anything
        for key in ("num_key_value_heads", "intermediate_size", "num_hidden_layers", "vocab_size",
                    "rms_norm_eps", "tie_word_embeddings"):
            consumed.add(key)
        unknown = sorted(k for k in cfg if k not in consumed and k not in IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"config field(s) {unknown} of {model_type} are not understood by this implementation "
                "and may change the model's computation; refusing to guess. If a field is known to be "
                "harmless, add it to decoding.config.IGNORED_KEYS."
            )
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(hidden),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(heads),
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(attention_bias),
            max_position_embeddings=int(max_pos),
            sliding_window=None if window is None else int(window),
            model_type=model_type,
        )


def thaw(frozen) -> dict[str, Any] | None:
    """A config's frozen mapping (a sorted tuple of pairs, see `freeze`) as a dict; None stays None."""
    return None if frozen is None else dict(frozen)


def decoder_param_count(c, *, per_layer_extra: int, norms_per_layer: int) -> int:
    """Parameters of a decoder of pre-norm layers with grouped-query attention and a gated MLP
    (embedding and head counted once each; once if tied), for any architecture's config:
    `per_layer_extra` counts what a layer adds to q/k/v/o and the three MLP matrices (biases,
    q/k norms), `norms_per_layer` its [D] norm vectors; the final norm is counted once."""
    d, f, h, k, dh = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f + norms_per_layer * d + per_layer_extra
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.num_layers * per_layer + c.vocab_size * d + head + d


def freeze(v):
    """A config value made hashable: lists become tuples, dicts sorted tuples of (key, value)."""
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v
