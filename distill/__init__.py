"""distill: training drafters for speculative decoding.

Data (`distill.data`: chat-template rendering, assistant-only loss masks, packing, resumable
batches), losses (`distill.losses`: FKL, RKL, JSD, TVD), LoRA adapters (`distill.lora`), the
shared trainer (`distill.trainer`: one jitted pure train step, optax, checkpoints, metrics,
evaluation), checkpoints and drafter export (`distill.checkpoint`), and one recipe per method:
DistillSpec (`distill.distillspec`), Medusa heads (`distill.medusa`), the EAGLE-3-style head with training-time test (`distill.eagle`),
hidden-transfer maps (`distill.hidden_transfer`). See docs/distill.md and
docs/drafters.md.
"""

from .checkpoint import CheckpointMismatch, Checkpoints, export_drafter, load_drafter
from .data import Batches, DataError, load_conversations, pack, regenerate, render
from .distillspec import DistillSpec, OnPolicy, TokenizerMismatch, batch_source, check_pair
from .eagle import EagleRecipe
from .evaluation import acceptance
from .hidden_transfer import HiddenTransferRecipe
from .lora import LoRA
from .medusa import MedusaRecipe
from .losses import DIVERGENCES, Divergence, UnknownLoss, forward_kl, jsd, reverse_kl, token_divergence, tvd
from .trainer import Recipe, TrainConfig, Trainer, TrainState, init_state, train_step

__all__ = [
    "Batches", "CheckpointMismatch", "Checkpoints", "DIVERGENCES", "DataError", "DistillSpec", "Divergence",
    "EagleRecipe", "HiddenTransferRecipe", "LoRA", "MedusaRecipe", "OnPolicy", "Recipe", "TokenizerMismatch", "TrainConfig", "TrainState",
    "Trainer", "UnknownLoss", "acceptance", "batch_source", "check_pair", "export_drafter", "forward_kl", "init_state",
    "jsd", "load_conversations", "load_drafter", "pack", "regenerate", "render", "reverse_kl", "token_divergence",
    "train_step", "tvd",
]
