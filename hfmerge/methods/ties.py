"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergeContext, MergePlan


@register_method
class Ties(MergeMethod):
    """θ = θ_base + λ τ_m, with τ_m from the task vectors τ_i = θ_i − θ_base in three steps (§3, Algorithm 1).

    1. Trim: keep the k = ⌊density · numel⌋ largest magnitudes of each τ_i,
       tensor by tensor (as mergekit does; the paper's top-k% is over the whole
       model), giving τ̂_i; the rest is zero.
    2. Elect: γ_m = sgn(Σ_i τ̂_i) per entry, the sign with the larger total
       magnitude across models.
    3. Disjoint merge: τ_m = (1/|A|) Σ_{i∈A} τ̂_i with A = {i : sgn(τ̂_i) = γ_m},
       zeros excluded; an entry no task vector keeps stays θ_base.

    BatchNorm statistics are averaged and heads the base lacks follow the head
    policy, as in task arithmetic (:mod:`hfmerge.methods.task_vectors`).
    """

    name = "ties"
    title = "TIES-Merging (trim, elect sign, disjoint merge)"
    reference = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
    reference_url = "https://arxiv.org/abs/2306.01708"
    parameters = (
        ParamSpec("density", float, 0.2, "fraction of each task vector's entries kept, by magnitude, per tensor",
                  minimum=0.0, maximum=1.0),
        ParamSpec("lambda", float, 1.0, "scale λ of the merged task vector", minimum=0.0),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "Per tensor, each task vector τ_i = θ_i − θ_base keeps its ⌊{{ details.density }} · numel⌋ entries of "
        "largest magnitude (τ̂_i); each entry's sign is elected as γ = sgn(Σ_i τ̂_i); the merged task vector is the "
        "mean of the τ̂_i whose sign is γ (zeros excluded), and θ = θ_base + λ · τ_m with λ = {{ details[\"lambda\"] }}"
        "{% if base %}, base model `{{ base.name }}`{% endif %}. "
    ) + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_vectors import DisjointMerge, plan_task_vectors

        density, scale = float(ctx.params["density"]), float(ctx.params["lambda"])
        return plan_task_vectors(
            ctx, self.name,
            lambda info, base, sources: DisjointMerge(base, sources, scale, "trim", "ties", density=density,
                                                      key=info.key, group="TIES: base + λ·disjoint mean"),
            {"density": density, "lambda": scale},
        )
