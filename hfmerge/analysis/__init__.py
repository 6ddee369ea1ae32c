"""Analysis stage: facts read from the sources' weights before planning, streamed (DESIGN.md, Stages)."""

from __future__ import annotations

from hfmerge.analysis.similarity import (
    LayerSimilarity,
    TransformerBlock,
    gated_keys,
    layer_similarity,
    select_gated,
    similarity_svg,
    transformer_blocks,
)

__all__ = [
    "LayerSimilarity", "TransformerBlock", "gated_keys", "layer_similarity", "select_gated", "similarity_svg",
    "transformer_blocks",
]
