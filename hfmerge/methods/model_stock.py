"""Model Stock: interpolate between the fine-tuned models' average and the pre-trained model by their angle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, register_method

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan

NORM_PRODUCT_FLOOR = 1e-6
"""mergekit's floor under ‖τᵢ‖·‖τⱼ‖ in the cosine: a zero task vector has cosine 0 with every other."""


def interpolation_ratio(mean_cosine: float, k: int) -> float:
    """t = k·c / (1 + (k − 1)·c) (Jang et al., §3, the ratio for k fine-tuned models, with c for cos θ).

    The denominator is N·‖Σᵢ τᵢ/‖τᵢ‖‖² / N² ≥ 0 for a mean of pairwise cosines, zero only when the unit
    task vectors cancel; t is then 0 (the pre-trained weight) instead of mergekit's ±inf.
    """
    denominator = 1.0 + (k - 1) * mean_cosine
    if denominator <= 0.0:
        return 0.0
    return k * mean_cosine / denominator


def mean_pairwise_cosine(task_vectors: torch.Tensor) -> float:
    """The mean over pairs i < j of cos(τᵢ, τⱼ) = ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6), clamped to [−1, 1], as mergekit.

    ``task_vectors`` has one flattened task vector per row; the products are taken in float64.
    """
    import torch

    flat = task_vectors.to(torch.float64)
    dots = flat @ flat.T
    norms = dots.diagonal().clamp(min=0.0).sqrt()
    upper = torch.triu_indices(len(flat), len(flat), offset=1)
    products = (norms[:, None] * norms[None, :]).clamp(min=NORM_PRODUCT_FLOOR)
    cosines = (dots / products).clamp(-1.0, 1.0)[upper[0], upper[1]]
    return float(cosines.mean())


@dataclass(frozen=True)
class ModelStockTensor:
    """θ = t·θ̄ + (1 − t)·θ_base, t from the mean pairwise cosine of the task vectors τᵢ = θᵢ − θ_base.

    The N task vectors of the tensor are held at once (the pairwise cosines need them all).
    """

    base: TensorRef
    sources: tuple[TensorRef, ...]
    group: str = "Model Stock: lerp(base, average, t)"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        base = load(self.base).to(torch.float32)
        sources = torch.stack([load(ref).to(torch.float32).reshape(-1) for ref in self.sources])
        ratio = interpolation_ratio(mean_pairwise_cosine(sources - base.reshape(-1)), len(self.sources))
        average = sources.mean(dim=0).reshape(base.shape)
        return torch.lerp(base, average, ratio)


@register_method
class ModelStock(MergeMethod):
    """θ = t·θ̄ + (1 − t)·θ_base per tensor, t = k·c / (1 + (k − 1)·c).

    Jang et al., "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024), §3: the
    fine-tuned weights lie on a sphere around a centre that the pre-trained weight helps locate; the
    merged weight is the point of the segment from θ_base to the average θ̄ of the k fine-tuned models
    closest to that centre, with t from the angle θ between their task vectors τᵢ = θᵢ − θ_base. The
    paper assumes one angle; as mergekit (``mergekit/merge_methods/model_stock.py``), c = cos θ is the
    mean of the pairwise cosines, each ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped to [−1, 1], per whole tensor
    (mergekit's default; its ``filter_wise`` option takes one per output row instead). FusionBench
    (``fusion_bench/method/model_stock``) averages the pairwise angles instead of their cosines for k > 2,
    which gives another t; for k = 2 the two agree up to their epsilons.

    Where this and mergekit part: a zero denominator 1 + (k − 1)c, possible only when the unit task
    vectors sum to zero, gives t = 0 (θ_base) instead of an infinite t. Like mergekit, nothing else is
    filtered: c < 0 gives t < 0 (past θ_base, away from θ̄), and the 1e-6 floor makes the cosine of
    task vectors whose norms multiply to less than 1e-6 smaller than their true cosine (t towards 0).

    Every float tensor is merged this way, biases and norms included, as in mergekit; BatchNorm running
    statistics are averaged, integer buffers copied, and heads the base lacks follow the head policy
    (:mod:`hfmerge.methods.task_vectors`).
    """

    name = "model_stock"
    title = "Model Stock"
    reference = "Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024"
    reference_url = "https://arxiv.org/abs/2403.19522"
    needs_base = True
    min_sources = 2
    card_template = (
        "Per tensor, with the task vectors τᵢ = θᵢ − θ_base of the k = {{ sources | length }} models, c is the mean "
        "over pairs of cos(τᵢ, τⱼ) = ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6), t = k·c / (1 + (k − 1)·c) (§3 of the paper, "
        "with c for cos θ, as mergekit computes it), and θ = t·θ̄ + (1 − t)·θ_base, θ̄ the average of the "
        "models{% if base %} and θ_base the pre-trained model `{{ base.name }}`{% endif %}. Integer buffers are "
        "the anchor's. "
    ) + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_vectors import plan_task_vectors

        return plan_task_vectors(ctx, self.name, lambda info, base, sources: ModelStockTensor(base, sources), {})
