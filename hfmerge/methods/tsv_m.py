"""TSV-M: Task Singular Vectors merge (Gargiulo et al., CVPR 2025), and what the SVD-based merges share.

The SVD-based merges (TSV-M here, Iso-C and Iso-CTS in :mod:`hfmerge.methods.iso`)
treat each weight matrix of a task vector as a matrix, not as a flat vector:
the task matrix Δᵢ = θᵢ − θ_base of an ``nn.Linear`` weight, or of a
convolution kernel reshaped to (out, in·k·k)
(:func:`~hfmerge.methods.task_vectors.is_weight_matrix`). What they share lives
here: the orthogonalisation of concatenated singular vectors
(:func:`orthogonalise`), reading one weight's task matrices in float64
(:func:`task_matrices`), and the plan that sends weight matrices to the
method's operation and every other tensor to the mean of its task vectors
(:func:`plan_svd_merge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import TensorInfo
    from hfmerge.engine.ops import Loader, MergeOp, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan

MatrixOp = Callable[["TensorInfo", "TensorRef", "tuple[TensorRef, ...]"], "MergeOp"]
"""Builds a weight matrix's operation from (anchor's tensor info, base reference, source references)."""

SVD_CARD_NOTES = (
    "Weight matrices are the weights of linear layers and convolution kernels reshaped to (out, in·k·k); every "
    "other tensor the base has (biases, norms, embeddings, position tensors) becomes θ_base + λ · (1/N) Σᵢ τᵢ, the "
    "mean of its task vectors scaled by the same λ, as the paper's code does for its non-matrix tensors (that code "
    "also merges 2-D embeddings as matrices and averages convolution kernels; here embeddings are not matrices and "
    "kernels are). "
)
"""The card sentence every SVD-based merge adds before :data:`TASK_VECTOR_CARD_NOTES`."""

SVD_LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))
"""λ ∈ {0.1, 0.2, ..., 3.0}, searched with ``--param lambda=auto``: the grid the official code of TSV-M and of
Iso-C/CTS searches on validation data (``np.linspace(0, 3, 31)[1:]`` in their ``src/eval/eval.py``). hfmerge
scores every point; the Iso code stops after three points without improvement."""


def orthogonalise(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``matrix`` in Frobenius norm: P Qᵀ from its SVD P S Qᵀ.

    This is the orthogonal Procrustes solution TSV-M uses to decorrelate the
    singular vectors of different tasks (Gargiulo et al., TSV-Merge), and
    Iso-CTS to orthogonalise its common and task-specific directions (Marczak
    et al., Iso-CTS). ``matrix`` has at most as many columns as rows. The result is
    the same for a column and its negation (P Qᵀ changes the column's sign
    with it), so the sign SVD picks for each singular vector does not matter.
    """
    import torch

    left, _, right_t = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right_t


def task_matrices(load: Loader, base: torch.Tensor, sources: Iterable[TensorRef]) -> Iterator[torch.Tensor]:
    """Each source's task matrix Δᵢ = θᵢ − θ_base as a matrix, in float64, one at a time.

    ``base`` is the base weight already as a float64 matrix. Reading them one
    at a time keeps memory at a few matrices of one layer, whatever N is.
    """
    import torch

    from hfmerge.methods.task_vectors import as_matrix

    for ref in sources:
        yield as_matrix(load(ref).to(torch.float64)) - base


def tsv_merge(deltas: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """TSV-M's merged task matrix of one layer (Gargiulo et al., the TSV-Merge algorithm).

    Each task matrix Δᵢ = Uᵢ Σᵢ Vᵢᵀ keeps its top k = ⌊r / N⌋ singular
    triplets, r = min(out, in) (the 1/N fraction of the paper; the official
    code's ``int(r * (1 / N))``, which equals ⌊r/N⌋ for every r < 5000 and
    N ≤ 32). The kept vectors are concatenated, U = [U₁,k … U_N,k] and
    V = [V₁,k … V_N,k], orthogonalised (:func:`orthogonalise`), and the matrix
    rebuilt as U⊥ Σ V⊥ᵀ with Σ = diag(σ₁,₁..σ₁,k, …, σ_N,1..σ_N,k).

    A layer whose r = min(out, in) is below N keeps no triplet (k = 0): its merged task
    matrix is zero, as in the official code. With N = 1, k = r and the result
    is Δ₁ itself.

    Args:
        deltas: the N task matrices of one weight (out × in), in float64.
        count: N, the number of task matrices.
    """
    import torch

    lefts, values, rights = [], [], []
    shape: tuple[int, ...] = ()
    for delta in deltas:
        shape = tuple(delta.shape)
        kept = min(shape) // count
        left, singular, right_t = torch.linalg.svd(delta, full_matrices=False)
        lefts.append(left[:, :kept])
        values.append(singular[:kept])
        rights.append(right_t[:kept].T)
    if not values or not sum(len(v) for v in values):
        return torch.zeros(shape, dtype=torch.float64)
    left, right = orthogonalise(torch.cat(lefts, dim=1)), orthogonalise(torch.cat(rights, dim=1))
    return (left * torch.cat(values)) @ right.T


@dataclass(frozen=True)
class WeightMatrixMerge:
    """θ = θ_base + λ · merge(Δ₁..Δ_N) for one weight matrix; subclasses say what ``merge`` is (:meth:`merged_delta`).

    The task matrices are read in float64, one at a time, as often as the
    method needs them; a convolution kernel is merged as its (out, in·k·k)
    matrix and reshaped back.
    """

    base: TensorRef
    sources: tuple[TensorRef, ...]
    scale: float

    def merged_delta(self, deltas: Callable[[], Iterator[torch.Tensor]], count: int) -> torch.Tensor:
        """The merged task matrix from ``deltas()`` (a fresh iterator over the N task matrices each call)."""
        raise NotImplementedError

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        from hfmerge.methods.task_vectors import as_matrix

        original = load(self.base)
        base = as_matrix(original.to(torch.float64))
        delta = self.merged_delta(lambda: task_matrices(load, base, self.sources), len(self.sources))
        return (base + self.scale * delta).reshape(original.shape).to(torch.float32)


@dataclass(frozen=True)
class TsvMergeOp(WeightMatrixMerge):
    """TSV-M for one weight matrix: θ_base + λ · U⊥ Σ V⊥ᵀ (:func:`tsv_merge`)."""

    group: str = "TSV-M: base + λ·orthogonalised task singular vectors"

    def merged_delta(self, deltas: Callable[[], Iterator[torch.Tensor]], count: int) -> torch.Tensor:
        return tsv_merge(deltas(), count)


def plan_svd_merge(ctx: MergeContext, method: str, matrix_op: MatrixOp, scale: float,
                   details: dict[str, Any]) -> MergePlan:
    """Plan an SVD-based merge: ``matrix_op`` for weight matrices, the mean task vector for the other tensors.

    Every tensor the base has that is not a weight matrix (biases, norms,
    embeddings, position tensors) becomes θ_base + λ · (1/N) Σᵢ τᵢ: the mean
    of its task vectors, scaled by the same λ, as the official TSV-M and
    Iso-C/CTS code do (their ``apply_to`` scales the whole merged vector).
    Two differences from that code, which selects matrices by dimension: it
    also SVD-merges 2-D embeddings (CLIP's position embedding), which are not
    weight matrices here, and it averages 4-D convolution kernels, which are
    matrices here (neither paper treats convolutions).
    BatchNorm statistics, integer buffers and heads follow
    :func:`~hfmerge.methods.task_vectors.plan_task_vectors`.
    """
    from hfmerge.methods.task_arithmetic import TaskArithmeticOp
    from hfmerge.methods.task_vectors import is_weight_matrix, plan_task_vectors

    count = len(ctx.sources)

    def make_op(info: TensorInfo, base: TensorRef, sources: tuple[TensorRef, ...]) -> MergeOp:
        if is_weight_matrix(ctx.anchor, info):
            return matrix_op(info, base, sources)
        return TaskArithmeticOp(base, sources, scale / count, group="base + λ·mean task vector (not a weight matrix)")

    return plan_task_vectors(ctx, method, make_op, {**details, "lambda": scale})


@register_method
class TsvM(MergeMethod):
    """TSV-M: per weight matrix, each task's top 1/N singular vectors, decorrelated, rebuilt, added to the base.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
    Model Merging" (CVPR 2025), the TSV-Merge method. Task matrices are
    low-rank, so each task keeps k = ⌊r/N⌋ singular triplets of Δᵢ
    (r = min(out, in)); the singular vectors of different tasks overlap, which
    is the interference the paper measures, so the concatenated U and V are
    replaced by the nearest orthonormal matrices (orthogonal Procrustes:
    U⊥ = P Qᵀ from U = P S Qᵀ) and the merged task matrix is U⊥ Σ V⊥ᵀ
    (:func:`tsv_merge`); θ = θ_base + λ · (U⊥ Σ V⊥ᵀ).

    Choices, each as the official code (AntoAndGar/task_singular_vectors,
    ``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``) makes it:

    - Tensors that are not weight matrices get the mean of their task vectors,
      and λ scales them too (``apply_to`` scales the whole merged vector).
    - A matrix whose min(out, in) is below N keeps nothing (k = 0) and stays θ_base; the dry
      run lists such matrices.
    - λ defaults to 1.0, FusionBench's default (``TaskSingularVectorMerging``,
      ``alpha: 1``); the official code picks λ on validation data from
      0.1, 0.2, …, 3.0 (``src/eval/eval.py``).

    Where hfmerge differs from that code: it treats convolution kernels as
    (out, in·k·k) matrices, while the official code and FusionBench take every
    2-D tensor (so also CLIP's position embedding) and average 4-D kernels (a
    CLIP ViT's patch embedding); and the SVDs run in float64, not float32.

    Cost: per weight matrix, N + 2 SVDs (one per task, two to orthogonalise),
    each O(out · in · min(out, in)); memory holds one layer's kept singular
    vectors, about one matrix, whatever N is.
    """

    name = "tsv_m"
    title = "TSV-M (Task Singular Vectors merge)"
    reference = ("Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, "
                 "CVPR 2025")
    reference_url = "https://arxiv.org/abs/2412.00081"
    parameters = (
        ParamSpec("lambda", float, 1.0, "scale λ of the merged task matrices and mean task vectors (default 1.0: "
                  "FusionBench's; the paper's code picks it on validation data from 0.1..3.0)", minimum=0.0,
                  search=SVD_LAMBDA_GRID),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "Per weight matrix, each task matrix Δᵢ = θᵢ − θ_base = Uᵢ Σᵢ Vᵢᵀ keeps its top k = ⌊r / "
        "{{ sources | length }}⌋ singular triplets (r = min(out, in)); the kept left and right singular vectors of "
        "all tasks are concatenated and orthogonalised (U⊥ = P Qᵀ from the SVD U = P S Qᵀ, likewise V), and "
        "θ = θ_base + λ · U⊥ Σ V⊥ᵀ with λ = {{ details['lambda'] }}"
        "{% if base %}, base model `{{ base.name }}`{% endif %}"
        "{% if details.get('unmerged') %}; {{ details.unmerged | length }} matrix(es) with min(out, in) below "
        "{{ sources | length }} keep no triplet and stay the base's{% endif %}. "
    ) + SVD_CARD_NOTES + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        scale = float(ctx.params["lambda"])
        plan = plan_svd_merge(ctx, self.name, lambda info, base, sources: TsvMergeOp(base, sources, scale), scale, {})
        count = len(ctx.sources)
        unmerged = [entry.name for entry in plan.tensors
                    if isinstance(entry.op, TsvMergeOp) and min(entry.shape[0], math.prod(entry.shape[1:])) < count]
        if unmerged:
            plan.details["unmerged"] = unmerged
        return plan

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        unmerged = plan.details.get("unmerged", [])
        if not unmerged:
            return []
        return [f"  {len(unmerged)} weight matrix(es) with min(out, in) below N = {len(ctx.sources)} keep no singular triplet "
                f"and stay the base's: {', '.join(unmerged[:5])}{', …' if len(unmerged) > 5 else ''}"]
