"""drafting: proposers for speculative and tree decoding, and where they plug in.

* `Proposer`, `View` (`drafting.proposer`): the contract a drafter implements; it then plugs
  into `decoding.Speculative` (chains) and, where it drafts trees, `decoding.TreeDecoding`.
* Draft shapes (`drafting.shapes`): `Chain`, a static `TreeTopology`, an EAGLE-2
  `DynamicTree`, and `chain_batch` / `topology_batch`, which build the `decoding.TreeBatch`
  the target verifies.
* `expand_and_rerank` (`drafting.tree_search`): EAGLE-2's dynamic tree search over any scorer
  of frontier nodes (a draft LM, a feature head, Medusa heads).
* Drafters: `DraftModel` (a small LM), `LayerSkip` (the target's first layers), `PromptLookup`
  (n-gram lookup in the context), `Medusa` (residual heads on the target's last hidden state,
  `drafting.medusa`: heads as the `draft=` model, `save_heads` / `load_heads`), `Eagle` (an
  EAGLE-3-style head: fused low/mid/high features, one decoder layer, its own KV cache;
  `drafting.eagle`), `HiddenTransfer` (the target drafts its own next tokens from pseudo
  hidden states riding along in the verify forward; `drafting.hidden_transfer`).
"""

from .eagle import Eagle, EagleConfig
from .hidden_transfer import HiddenTransfer, TransferConfig
from .medusa import HeadMismatch, Medusa, MedusaConfig
from .model_drafter import DraftModel, LayerSkip, ModelDrafter
from .prompt_lookup import PromptLookup, lookup
from .proposer import Proposer, View
from .shapes import Chain, DynamicTree, TreeError, TreeTopology, chain_batch, topology_batch
from .tree_search import Frontier, expand_and_rerank

__all__ = ["Chain", "DraftModel", "DynamicTree", "Eagle", "EagleConfig", "Frontier", "HeadMismatch", "HiddenTransfer", "LayerSkip", "Medusa", "MedusaConfig",
           "ModelDrafter", "PromptLookup", "Proposer", "TransferConfig", "TreeError", "TreeTopology", "View", "chain_batch",
           "expand_and_rerank", "lookup", "topology_batch"]
