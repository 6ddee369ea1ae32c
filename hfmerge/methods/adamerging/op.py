"""AdaMerging's tensor operation and the names it shares with its training stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import Loader, TensorRef

STAGE = "adamerging"
"""The name of the training stage, and of its table of learned coefficients (``(STAGE, COEFFICIENTS)``)."""
COEFFICIENTS = "coefficients"
"""The table's key: a float32 tensor of shape (rows, N sources), one row per task-vector tensor for
``granularity=layer``, a single row for ``granularity=task``."""
COEFFICIENTS_JSON = "adamerging_coefficients.json"
COEFFICIENTS_SVG = "adamerging_coefficients.svg"


@dataclass(frozen=True)
class AdaMergingOp:
    """θ = θ_base + Σᵢ λᵢ τᵢ for one tensor, τᵢ = θᵢ − θ_base, with λ the learned row ``row`` of ``coefficients``.

    The row is read from the table the training stage writes (:mod:`hfmerge.methods.adamerging.training`),
    so the plan is made before anything is learned; the sum runs in float32, one source at a time.
    """

    base: TensorRef
    sources: tuple[TensorRef, ...]
    coefficients: TensorRef
    row: int
    group: str = "base + Σ λᵢ·task vectors (λ learned)"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        lambdas = load(self.coefficients)[self.row].tolist()
        base = load(self.base).to(torch.float32)
        merged = base.clone()
        for ref, coefficient in zip(self.sources, lambdas):
            merged.add_(load(ref).to(torch.float32) - base, alpha=coefficient)
        return merged
