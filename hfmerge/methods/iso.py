"""Iso-C and Iso-CTS: isotropic merging in the common and task-specific subspaces (Marczak et al., ICML 2025).

Summing task matrices (task arithmetic) gives a spectrum with a few dominant
singular values: the directions most tasks share drown the rest. Both methods
keep the singular vectors of the merge and make its spectrum flat (isotropic),
every direction scaled by the mean singular value σ̄.

- Iso-C: Δ = Σᵢ Δᵢ = U Σ Vᵀ, Δ_iso = σ̄ U Vᵀ (:func:`iso_c_merge`).
- Iso-CTS: the top directions of Δ (the common subspace) plus each task's own
  top directions outside it, orthogonalised, then the same flat spectrum
  (:func:`iso_cts_merge`).

θ = θ_base + λ Δ_iso for weight matrices; every other tensor is the mean of
its task vectors, scaled by λ (:func:`~hfmerge.methods.tsv_m.plan_svd_merge`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method
from hfmerge.methods.tsv_m import SVD_CARD_NOTES, SVD_LAMBDA_GRID, WeightMatrixMerge, orthogonalise, plan_svd_merge

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.plan import MergeContext, MergePlan

LAMBDA_HELP = ("scale λ of the isotropic task matrices and mean task vectors (default 1.0: FusionBench's; the paper's "
               "code picks it on validation data from 0.1..3.0)")


def iso_c_merge(total: torch.Tensor) -> torch.Tensor:
    """Iso-C's task matrix σ̄ U Vᵀ from the summed task matrix Δ = Σᵢ Δᵢ = U Σ Vᵀ.

    σ̄ is the mean of all r = min(out, in) singular values of Δ, zeros
    included, as the official code (danielm1405/iso-merging,
    ``src/utils/iso.py::iso_c``) computes it. A zero Δ gives exactly zero.
    """
    import torch

    left, singular, right_t = torch.linalg.svd(total, full_matrices=False)
    return singular.mean() * (left @ right_t)


def common_and_task_ranks(rank: int, count: int, common_fraction: float) -> tuple[int, int]:
    """(c, s): Iso-CTS's c common directions and s directions per task, with c + N·s = r.

    As the official code (``src/utils/iso.py::iso_cts``): c starts at
    ⌊common_fraction · r⌋, then s = round((r − c) / N) (Python's round, half
    to even) and c = r − N·s, so the task-specific part divides evenly by N.
    hfmerge also caps s at ⌊r/N⌋, so that c is never negative (the official
    code's c goes negative when the fraction is near 0 and r is small, and the
    last task's block then overruns the r columns: a shape error).
    """
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / count), rank // count)
    return rank - count * per_task, per_task


def iso_cts_merge(total: torch.Tensor, deltas: Iterable[torch.Tensor], count: int,
                  common_fraction: float) -> torch.Tensor:
    """Iso-CTS's task matrix σ̄ U⊥ V⊥ᵀ (Marczak et al., Iso-CTS).

    1. Common subspace: the top c singular triplets of Δ = Σᵢ Δᵢ = U Σ Vᵀ
       (:func:`common_and_task_ranks`).
    2. Task-specific subspaces: each Δᵢ projected off the common left
       subspace, Δᵢ − U_c U_cᵀ Δᵢ, keeps its top s singular triplets.
    3. The N·s task-specific and c common left (right) singular vectors are
       concatenated and orthogonalised (:func:`~hfmerge.methods.tsv_m.orthogonalise`).
    4. Every direction gets σ̄, the mean of the c + N·s kept singular values.

    ``deltas`` are the N task matrices again (the second pass; not read when
    s = 0, which makes the result Iso-C's).
    """
    import torch

    common, per_task = common_and_task_ranks(min(total.shape), count, common_fraction)
    left, singular, right_t = torch.linalg.svd(total, full_matrices=False)
    common_left = left[:, :common]
    lefts, values, rights = [common_left], [singular[:common]], [right_t[:common].T]
    if per_task:
        for delta in deltas:
            specific = delta - common_left @ (common_left.T @ delta)
            task_left, task_singular, task_right_t = torch.linalg.svd(specific, full_matrices=False)
            lefts.append(task_left[:, :per_task])
            values.append(task_singular[:per_task])
            rights.append(task_right_t[:per_task].T)
    mean = torch.cat(values).mean()
    return mean * (orthogonalise(torch.cat(lefts, dim=1)) @ orthogonalise(torch.cat(rights, dim=1)).T)


def _summed(deltas: Iterator[torch.Tensor]) -> torch.Tensor:
    total = next(deltas).clone()
    for delta in deltas:
        total.add_(delta)
    return total


@dataclass(frozen=True)
class IsoCOp(WeightMatrixMerge):
    """Iso-C for one weight matrix: θ_base + λ σ̄ U Vᵀ (:func:`iso_c_merge`)."""

    group: str = "Iso-C: base + λ·isotropic summed task matrix"

    def merged_delta(self, deltas: Callable[[], Iterator[torch.Tensor]], count: int) -> torch.Tensor:
        return iso_c_merge(_summed(deltas()))


@dataclass(frozen=True)
class IsoCtsOp(WeightMatrixMerge):
    """Iso-CTS for one weight matrix: θ_base + λ σ̄ U⊥ V⊥ᵀ, two passes over the sources (:func:`iso_cts_merge`)."""

    common_fraction: float = 0.8
    group: str = "Iso-CTS: base + λ·isotropic common and task-specific directions"

    def merged_delta(self, deltas: Callable[[], Iterator[torch.Tensor]], count: int) -> torch.Tensor:
        return iso_cts_merge(_summed(deltas()), deltas(), count, self.common_fraction)


@register_method
class IsoC(MergeMethod):
    """Iso-C: per weight matrix, the summed task matrix with a flat spectrum, θ = θ_base + λ σ̄ U Vᵀ.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
    and Task-Specific Subspaces" (ICML 2025), Iso-C. Δ = Σᵢ Δᵢ = U Σ Vᵀ is task
    arithmetic's task matrix; its dominant singular values make the merge
    serve the tasks that share those directions and neglect the others, so
    every singular value is replaced by their mean σ̄ (:func:`iso_c_merge`).

    As the official code (danielm1405/iso-merging, ``src/utils/iso.py``):
    σ̄ is the mean of all min(out, in) singular values; tensors that are not
    weight matrices get the mean of their task vectors, also scaled by λ.
    λ defaults to 1.0, FusionBench's default (``ISO_C_Merge``,
    ``scaling_factor: 1.0``); the official code picks λ on validation data
    from 0.1, 0.2, …, 3.0 (``src/eval/eval.py``). hfmerge takes convolution
    kernels as (out, in·k·k) matrices (the official code and FusionBench take
    every 2-D tensor and average the rest) and runs the SVDs in float64.

    Cost: one SVD per weight matrix, after summing its N task matrices read
    one at a time; memory holds one layer's sum.
    """

    name = "iso_c"
    title = "Iso-C (isotropic merging in the common subspace)"
    reference = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
                 "Subspaces, ICML 2025")
    reference_url = "https://arxiv.org/abs/2502.04959"
    parameters = (ParamSpec("lambda", float, 1.0, LAMBDA_HELP, minimum=0.0, search=SVD_LAMBDA_GRID),)
    needs_base = True
    min_sources = 1
    card_template = (
        "Per weight matrix, the task matrices Δᵢ = θᵢ − θ_base are summed, Δ = Σᵢ Δᵢ = U Σ Vᵀ, and every singular "
        "value is replaced by their mean σ̄ (an isotropic spectrum): θ = θ_base + λ · σ̄ U Vᵀ with "
        "λ = {{ details['lambda'] }}{% if base %}, base model `{{ base.name }}`{% endif %}. "
    ) + SVD_CARD_NOTES + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        scale = float(ctx.params["lambda"])
        return plan_svd_merge(ctx, self.name, lambda info, base, sources: IsoCOp(base, sources, scale), scale, {})


@register_method
class IsoCts(MergeMethod):
    """Iso-CTS: Iso-C's common directions plus each task's own, orthogonalised, with a flat spectrum.

    Marczak et al. (ICML 2025), Iso-CTS. Iso-C keeps only the directions of the
    summed task matrix, where tasks with little in common with the others have
    no room; Iso-CTS keeps the top c directions of Δ = Σᵢ Δᵢ and gives the
    remaining r − c to the tasks, s = (r − c)/N each: the top directions of
    Δᵢ projected off the common subspace. The concatenated directions are
    orthogonalised and scaled by their mean singular value
    (:func:`iso_cts_merge`); θ = θ_base + λ σ̄ U⊥ V⊥ᵀ.

    As the official code (``src/utils/iso.py::iso_cts``, ``config/method/iso_cts.yaml``):
    ``common_fraction`` defaults to 0.8 (also FusionBench's
    ``common_space_fraction``), c is adjusted so r − c divides by N
    (:func:`common_and_task_ranks`), σ̄ is the mean of the kept singular
    values (the common ones of Δ and the task-specific ones), and tensors that
    are not weight matrices get their mean task vector scaled by λ. λ defaults
    to 1.0, FusionBench's default; the official code picks it on validation
    data from 0.1, 0.2, …, 3.0. Convolution kernels are (out, in·k·k)
    matrices here; the SVDs run in float64.

    Cost: per weight matrix, one SVD of the sum, one per task (skipped when
    s = 0) and two to orthogonalise; two passes over the sources, memory
    about three matrices of one layer whatever N is.
    """

    name = "iso_cts"
    title = "Iso-CTS (isotropic merging in common and task-specific subspaces)"
    reference = IsoC.reference
    reference_url = IsoC.reference_url
    parameters = (
        ParamSpec("lambda", float, 1.0, LAMBDA_HELP, minimum=0.0, search=SVD_LAMBDA_GRID),
        ParamSpec("common_fraction", float, 0.8, "fraction of each matrix's rank kept for the common subspace of the "
                  "summed task matrices (default 0.8, the paper's code)", minimum=0.0, maximum=1.0),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "Per weight matrix of rank r, the top c singular vectors of the summed task matrix Δ = Σᵢ (θᵢ − θ_base) "
        "span the common subspace (c from ⌊{{ details.common_fraction }} · r⌋, adjusted so that r − c divides by "
        "the {{ sources | length }} tasks, and (r − c) / N at most ⌊r / N⌋); each task matrix projected off it gives its top (r − c) / "
        "{{ sources | length }} singular vectors; the concatenated left and right singular vectors are "
        "orthogonalised (U⊥ = P Qᵀ from U = P S Qᵀ) and every direction is scaled by the mean σ̄ of the kept "
        "singular values: θ = θ_base + λ · σ̄ U⊥ V⊥ᵀ with λ = {{ details['lambda'] }}"
        "{% if base %}, base model `{{ base.name }}`{% endif %}. "
    ) + SVD_CARD_NOTES + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        scale, fraction = float(ctx.params["lambda"]), float(ctx.params["common_fraction"])
        return plan_svd_merge(
            ctx, self.name, lambda info, base, sources: IsoCtsOp(base, sources, scale, fraction), scale,
            {"common_fraction": fraction},
        )
