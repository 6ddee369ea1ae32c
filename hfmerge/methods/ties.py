"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method
from hfmerge.methods.stages import Analyse

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.methods.stages import Stage

TIES_LAMBDA_GRID = tuple(round(0.8 + 0.1 * i, 1) for i in range(18))
"""λ ∈ {0.8, 0.9, ..., 2.5}: the official code's TIES search (README, ``--scale linear+0.8+2.51+0.1``)."""
TIES_DENSITY_GRID = (0.1, 0.2, 0.3)
"""k ∈ {10, 20, 30}%: the densities around the paper's k = 20% (its README's ``topk20`` and minimal notebook's
``K = 20``, which fix it) that the search chooses among."""


@register_method
class Ties(MergeMethod):
    """θ = θ_base + λ τ_m, with τ_m from the task vectors τ_i = θ_i − θ_base in three steps (§3, Algorithm 1).

    1. Trim: keep the largest magnitudes of each τ_i, giving τ̂_i; the rest is
       zero. ``trim=tensor`` (the default, as mergekit does) keeps the
       k = ⌊density · numel⌋ largest of each tensor. ``trim=global`` keeps the
       top density fraction of the whole task vector, as the paper (§3, "top-k%
       of the parameters") and its code do: over every tensor merged as a task
       vector, the entries of magnitude at least the (d − ⌊density·d⌋)-th
       smallest of d, which is ⌊density·d⌋ + 1 entries, the official
       ``topk_values_mask``'s count (:func:`~hfmerge.methods.task_vectors.global_trim_thresholds`).
       The official code flattens the whole state dict but the tied embedding
       copies; here the tensors it flattens are those merged as task vectors:
       not BatchNorm statistics (averaged), integer buffers or heads the head
       policy takes.
    2. Elect: γ_m = sgn(Σ_i τ̂_i) per entry, the sign with the larger total
       magnitude across models.
    3. Disjoint merge: τ_m = (1/|A|) Σ_{i∈A} τ̂_i with A = {i : sgn(τ̂_i) = γ_m},
       zeros excluded; an entry no task vector keeps stays θ_base. (The
       official code gives an entry whose Σ_i τ̂_i is exactly zero the majority
       sign of the whole model, ``resolve_zero_signs``; here it stays θ_base.
       They differ only where kept entries cancel exactly.)

    BatchNorm statistics are averaged and heads the base lacks follow the head
    policy, as in task arithmetic (:mod:`hfmerge.methods.task_vectors`).
    """

    name = "ties"
    title = "TIES-Merging (trim, elect sign, disjoint merge)"
    reference = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
    reference_url = "https://arxiv.org/abs/2306.01708"
    parameters = (
        ParamSpec("density", float, 0.2, "fraction of each task vector's entries kept, by magnitude (default: "
                  "the official code's k = 20%)", minimum=0.0, maximum=1.0, search=TIES_DENSITY_GRID),
        ParamSpec("lambda", float, 1.0, "scale λ of the merged task vector (default: the official code's 1, "
                  "used without validation data)", minimum=0.0, search=TIES_LAMBDA_GRID),
        ParamSpec("trim", str, "tensor", "where the top density fraction is taken: per tensor (tensor, as "
                  "mergekit) or over each whole task vector (global, as the paper's code)",
                  choices=("tensor", "global")),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "{% if details.trim == 'global' %}Over the whole model, each task vector τ_i = θ_i − θ_base (its "
        "{{ details.trim_entries }} entries in the {{ details.trim_tensors }} tensors merged as task vectors, "
        "flattened together as the paper's code does) keeps the entries whose magnitude is at least its "
        "(d − ⌊{{ details.density }} · d⌋)-th smallest, ⌊{{ details.density }} · d⌋ + 1 entries as the paper's "
        "`topk_values_mask` keeps (τ̂_i)"
        "{% else %}Per tensor, each task vector τ_i = θ_i − θ_base keeps its ⌊{{ details.density }} · numel⌋ "
        "entries of largest magnitude (τ̂_i){% endif %}; each entry's sign is elected as γ = sgn(Σ_i τ̂_i); the "
        "merged task vector is the mean of the τ̂_i whose sign is γ (zeros excluded), and θ = θ_base + λ · τ_m "
        "with λ = {{ details[\"lambda\"] }}{% if base %}, base model `{{ base.name }}`{% endif %}. "
    ) + TASK_VECTOR_CARD_NOTES

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """``trim=global``: one streamed analysis before the plan finds each source's threshold over the model."""
        return [Analyse(self._global_trim)] if ctx.params.get("trim") == "global" else []

    def _global_trim(self, ctx: MergeContext) -> dict[str, Any]:
        from hfmerge.methods.task_vectors import DisjointMerge, global_trim_thresholds

        def load(ref: TensorRef) -> torch.Tensor:
            index, key = ref
            return ctx.models[int(index)].reader.get(key)

        per_tensor = self.plan(dataclasses.replace(ctx, params={**ctx.params, "trim": "tensor"}))
        ops = [entry.op for entry in per_tensor.tensors if isinstance(entry.op, DisjointMerge)]
        return {"global_trim": global_trim_thresholds(ops, load, float(ctx.params["density"]))}

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_vectors import DisjointMerge, plan_task_vectors

        density, scale, trim = float(ctx.params["density"]), float(ctx.params["lambda"]), str(ctx.params["trim"])
        found = (ctx.analysis or {}).get("global_trim") if trim == "global" else None
        # () when the analysis could not run (a dry run over Hub sources): such a plan is shown, never executed
        thresholds = (found.thresholds if found is not None else ()) if trim == "global" else None
        details: dict[str, Any] = {"density": density, "lambda": scale, "trim": trim}
        if found is not None:
            details.update(trim_entries=found.entries, trim_tensors=found.tensors, trim_kept=list(found.kept))
        group = "TIES: base + λ·disjoint mean" + (" (trimmed over the whole model)" if trim == "global" else "")
        return plan_task_vectors(
            ctx, self.name,
            lambda info, base, sources: DisjointMerge(base, sources, scale, "trim", "ties", density=density,
                                                      key=info.key, group=group, thresholds=thresholds),
            details,
        )

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        if plan.details.get("trim") != "global":
            return []
        if "trim_entries" not in plan.details:
            return ["trim: over each whole task vector; the thresholds are found when the merge reads the weights"]
        kept = ", ".join(f"{k:,}" for k in plan.details["trim_kept"])
        return [f"trim: over each whole task vector ({plan.details['trim_entries']:,} entries in "
                f"{plan.details['trim_tensors']} tensors), entries kept per source: {kept}"]
