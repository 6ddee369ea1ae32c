"""Task arithmetic: add scaled task vectors to the pre-trained model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan


@dataclass(frozen=True)
class TaskArithmeticOp:
    """θ = θ_base + λ Σ_i (θ_i − θ_base)  (Ilharco et al., 2023, task vectors)."""

    base: TensorRef
    sources: tuple[TensorRef, ...]
    scale: float
    group: str = "base + λ·Σ task vectors"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        base = load(self.base).to(torch.float32)
        task_sum = torch.zeros_like(base)
        for ref in self.sources:
            task_sum.add_(load(ref).to(torch.float32) - base)
        return base + self.scale * task_sum


@register_method
class TaskArithmetic(MergeMethod):
    """θ = θ_base + λ Σ_i (θ_i − θ_base).

    Ilharco et al., "Editing models with task arithmetic" (ICLR 2023), §2:
    a task vector is τ_i = θ_i − θ_base; the merge adds their sum scaled by λ.
    The base may be a headless backbone; BatchNorm running statistics are
    averaged, integer buffers copied from the anchor, and heads the base lacks
    follow the head policy (:mod:`hfmerge.methods.task_vectors`).
    """

    name = "task_arithmetic"
    title = "Task arithmetic"
    reference = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
    reference_url = "https://arxiv.org/abs/2212.04089"
    parameters = (ParamSpec("lambda", float, 0.3, "scale λ of the summed task vectors", minimum=0.0),)
    needs_base = True
    min_sources = 1
    card_template = (
        "θ = θ_base + λ · Σᵢ (θᵢ − θ_base), with λ = {{ details['lambda'] }} and the sum over the "
        "{{ sources | length }} source model{{ 's' if sources | length != 1 }}; θ_base is the pre-trained model "
        "{% if base.url %}[{{ base.name }}]({{ base.url }}){% else %}`{{ base.name }}`{% endif %}. "
        "Each τᵢ = θᵢ − θ_base is the task vector of source i (§2 of the paper). "
        "{% if batch_norm %}Integer buffers (BatchNorm's `num_batches_tracked`) are the anchor's. {% endif %}"
    ) + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_vectors import plan_task_vectors

        scale = float(ctx.params["lambda"])
        return plan_task_vectors(
            ctx, self.name, lambda info, base, sources: TaskArithmeticOp(base, sources, scale), {"lambda": scale}
        )
