"""drafting: proposers for speculative and tree decoding.

Every drafter implements `decoding.speculative.Proposer` and plugs into
`decoding.Speculative` (chains) and, where it can draft trees, `decoding.TreeDecoding`.
"""

from .model_drafter import DraftModel, LayerSkip, ModelDrafter
from .prompt_lookup import PromptLookup, lookup

__all__ = ["DraftModel", "LayerSkip", "ModelDrafter", "PromptLookup", "lookup"]
