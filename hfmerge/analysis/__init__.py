"""Analysis stage: facts read from the sources' weights before planning, streamed (DESIGN.md, Stages)."""

from __future__ import annotations

from hfmerge.analysis.similarity import LayerSimilarity, layer_similarity, select_gated, similarity_svg

__all__ = ["LayerSimilarity", "layer_similarity", "select_gated", "similarity_svg"]
