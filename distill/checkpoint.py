"""Checkpoints of a training run (orbax) and trained drafters as loadable model directories.

`Checkpoints(directory, identity)` wraps an orbax `CheckpointManager`: each step directory holds
the train state (trainable parameters, optimizer state, step) and a JSON item with the data
position and the run's *identity* (model configs, parameter shapes, recipe). Saves are
synchronous and atomic (orbax writes to a temporary directory and renames it), so a run killed
at any moment leaves the previous complete checkpoint; restoring it and replaying the same
steps gives bitwise the same parameters (every batch and random key is a function of the step).
A checkpoint whose identity differs from the run's is refused (`CheckpointMismatch`), naming
what differs.

`export_drafter(config, params, directory, tokenizer)` writes a Hugging Face directory
(`config.json`, `model.safetensors`, tokenizer files) that `decoding.load` reads back, so a
trained drafter plugs into `Speculative` / `TreeDecoding` unchanged: `load_drafter(directory)`.
Only the Llama family (`decoding.ModelConfig`: Llama, Qwen2, Mistral) is exported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointMismatch(ValueError):
    """A checkpoint written for another model, shape or recipe."""


def shape_signature(tree) -> dict:
    """{path: "dtype[shape]"} of a pytree's leaves (part of a run's identity)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): f"{jnp.dtype(x.dtype).name}{list(np.shape(x))}" for p, x in flat}


def config_dict(config) -> dict:
    """A model config as plain JSON values (for identities and exports)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


class Checkpoints:
    """Orbax checkpoints of one run (see the module doc); `keep` newest steps are kept."""

    def __init__(self, directory: str | os.PathLike, identity: dict, keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).resolve()
        self.identity = json.loads(json.dumps(identity, default=str))
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_position: int | None = None) -> None:
        """Save `state` at `step` (data position: the next batch index, default `step`)."""
        ocp = self._ocp
        if step in self.manager.all_steps():
            return
        meta = {"identity": self.identity, "step": int(step),
                "data_position": int(step if data_position is None else data_position)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, like):
        """The latest state restored into the structure and layout of `like` (None when there is
        none): each array is read onto `like`'s sharding, whatever mesh saved it.

        Raises CheckpointMismatch when the checkpoint's identity differs from this run's.
        """
        ocp = self._ocp
        step = self.latest_step()
        if step is None:
            return None
        meta = self.meta(step)
        diffs = _differences(meta.get("identity", {}), self.identity)
        if diffs:
            raise CheckpointMismatch(
                f"the checkpoint in {self.directory} (step {step}) was written for another model, shape or recipe: "
                + "; ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")
                + ". Resume it with the settings it was trained with, or train into another output directory.")
        # each leaf restored in `like`'s layout: a checkpoint saved on one mesh restores onto another
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                               sharding=getattr(x, "sharding", None)), like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]


# --------------------------------------------------------------------------------------------
# Trained drafters as Hugging Face directories
# --------------------------------------------------------------------------------------------

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config(config) -> dict:
    """The Hugging Face `config.json` of a `decoding.ModelConfig`."""
    from decoding import ModelConfig

    if not isinstance(config, ModelConfig):
        raise TypeError(f"export supports Llama-family models (decoding.ModelConfig), not {type(config).__name__}.")
    if config.model_type not in _ARCHITECTURES:
        raise ValueError(f"cannot export model_type {config.model_type!r}; known: {sorted(_ARCHITECTURES)}.")
    out = {
        "architectures": [_ARCHITECTURES[config.model_type]], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu", "attention_bias": config.qkv_bias,
        "rope_scaling": config.rope_scaling_dict,
        "use_sliding_window": config.sliding_window is not None,
    }
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
        if config.model_type == "qwen2":
            out["max_window_layers"] = 0
    return out


def hf_tensors(config, params: dict) -> dict[str, np.ndarray]:
    """Our parameter tree as Hugging Face tensors (`[out, in]` linear weights, q/k/v and
    gate/up split out of the fused projections), float32 numpy."""
    h, k, d = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), params)
    out = {"model.embed_tokens.weight": host["embed"], "model.norm.weight": host["final_norm"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = host["lm_head"].T
    lay = host["layers"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        wqkv = lay["wqkv"][i]
        out[p + "self_attn.q_proj.weight"] = wqkv[:, :h].T
        out[p + "self_attn.k_proj.weight"] = wqkv[:, h:h + k].T
        out[p + "self_attn.v_proj.weight"] = wqkv[:, h + k:].T
        if config.qkv_bias:
            b = lay["bqkv"][i]
            out[p + "self_attn.q_proj.bias"], out[p + "self_attn.k_proj.bias"] = b[:h], b[h:h + k]
            out[p + "self_attn.v_proj.bias"] = b[h + k:]
        out[p + "self_attn.o_proj.weight"] = lay["wo"][i].T
        out[p + "input_layernorm.weight"] = lay["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = lay["mlp_norm"][i]
        gu = lay["w_gate_up"][i]
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gu[:, :d].T, gu[:, d:].T
        out[p + "mlp.down_proj.weight"] = lay["w_down"][i].T
    return {name: np.ascontiguousarray(x) for name, x in out.items()}


def export_drafter(config, params: dict, directory: str | os.PathLike, tokenizer=None, dtype="bfloat16") -> Path:
    """Write a trained drafter as a Hugging Face directory `decoding.load` reads (see module doc).

    The tokenizer is saved beside it when it can be (`save_pretrained`); otherwise pass it to
    `load_drafter(..., tokenizer=...)`.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config(config), torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = hf_tensors(config, params)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    elif dtype != "float32":
        raise ValueError(f"export dtype must be bfloat16 or float32, got {dtype!r}.")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_drafter(directory: str | os.PathLike, *, dtype=jnp.bfloat16, tokenizer=True):
    """A drafter written by `export_drafter`, as a `decoding.Model` (tokenizer: True reads the
    directory's own tokenizer files; or pass a tokenizer object)."""
    import decoding

    directory = Path(directory)
    if tokenizer is True and not (directory / "tokenizer_config.json").is_file():
        tokenizer = False
    if tokenizer is None or isinstance(tokenizer, (bool, str, os.PathLike)):
        return decoding.load(str(directory), dtype=dtype, tokenizer=tokenizer)
    model = decoding.load(str(directory), dtype=dtype, tokenizer=False)
    model.tokenizer = tokenizer  # any object with the tokenizer methods decoding uses
    return model
