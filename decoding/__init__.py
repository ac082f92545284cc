"""decoding: the core of the toolkit — model interface, models, cache, sampling, the shared
jitted loop and every decoding algorithm.

Quick start::

    import decoding
    model = decoding.load("qwen2.5-coder-1.5b-instruct")
    out = decoding.generate(model, ["Write a haiku about caches."], max_new_tokens=64)
    print(out.texts[0], out.stats.summary())
"""

from .autoregressive import Autoregressive
from .cache import KVCache
from .config import ConfigError, ModelConfig
from . import llama  # noqa: F401  (registers the Llama family)
from .gemma3 import Gemma3Config
from .generation import Result, Stats, check_same_tokenizer, generate, stream
from .options import Options
from .model import (Model, Output, embed, final_norm, forward, init_params, lm_head, run_layers, split_layers,
                    stack_layers, unembed)
from .sampling import Greedy, Sampling, make_sampling
from .entropy_adaptive import EntropyAdaptive
from .speculative import DynamicGamma, Speculative, TreeDecoding
from .strategy import Context, Strategy
from .tree import Accepted, TreeBatch


def load(source, **kwargs):
    """Load a model by registry name, local HF directory, GGUF file or hub id (see decoding.loading);
    `mesh=` (and `rules=`) load it straight into a sharded layout (decoding.sharding)."""
    from .loading import load as _load

    return _load(source, **kwargs)


def shard(model, mesh, rules=None):
    """`model` with its parameters laid out on `mesh` under `rules` (decoding.sharding.shard)."""
    from .sharding import shard as _shard

    return _shard(model, mesh, rules)


__all__ = [
    "Accepted", "Autoregressive", "ConfigError", "DynamicGamma", "EntropyAdaptive", "Gemma3Config", "Speculative",
    "Strategy", "TreeBatch", "TreeDecoding", "Context", "Greedy", "KVCache", "Model", "ModelConfig", "Options",
    "Output", "Result", "Sampling", "Stats", "check_same_tokenizer", "embed", "final_norm", "forward", "generate",
    "init_params", "lm_head", "load", "shard", "make_sampling", "run_layers", "split_layers", "stack_layers", "stream",
    "unembed",
]
