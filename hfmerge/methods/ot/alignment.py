"""Optimal-transport alignment of neurons, one layer at a time (OTFusion).

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020
(arXiv:1910.05653), Algorithm 1; CLAFusion (``clafusion.txt``) §2.3 summarises
it. Two networks trained from different seeds hold the same features in other
orders, so layer ℓ of model A is first matched to the anchor B's layer ℓ:

1. Ŵ_A^(ℓ) = W_A^(ℓ) M^(ℓ-1): the incoming dimension follows the previous
   layer's alignment (the identity at the input).
2. C^(ℓ)[i, j] = d(unit i of A, unit j of B): the ground cost between units,
   from their incoming weights (rows of Ŵ_A, of W_B) or from their
   pre-activations over the same t samples.
3. T^(ℓ) = argmin_{T ≥ 0, T 1 = α, Tᵀ 1 = β} ⟨T, C^(ℓ)⟩ with uniform
   marginals α = 1/n_A, β = 1/n_B (exact ``ot.emd``, or entropic
   ``ot.sinkhorn``).
4. M^(ℓ) = T^(ℓ) diag(1/β), so that the aligned layer is
   W̃_A^(ℓ) = diag(1/β) T^(ℓ)ᵀ Ŵ_A^(ℓ) = M^(ℓ)ᵀ Ŵ_A^(ℓ): n_B rows, each a
   convex combination of A's rows. When A's units are a permutation P of B's
   (n_A = n_B = n), T = P/n and M = P: the alignment undoes the permutation.

The fused layer is then an average of W̃_A and W_B: :class:`AlignedAverage`, the
operation of OTFusion's and CLAFusion's plans, weighs them as the method says.
Everything here is pure maths on tensors, in float64 inside; nothing reads a
file or knows a model family.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ot
import torch
from torch import Tensor

from hfmerge.errors import TransportError

if TYPE_CHECKING:
    from hfmerge.engine.ops import Loader, TensorRef

logger = logging.getLogger(__name__)

SOLVERS = ("emd", "sinkhorn")
METRICS = ("euclidean", "sqeuclidean")

# The network simplex counts pivots; a 4096 × 4096 problem needs a few million.
_EMD_MAX_ITER = 100_000_000
_SINKHORN_MAX_ITER = 10_000
# Sinkhorn's plan may miss its marginals by this much (L1, relative to the total mass) before we refuse it.
_MARGINAL_TOLERANCE = 1e-3
# Below this many multiply-adds, distances are computed pair by pair (exact: a unit and its copy are at
# distance 0); above it through matrix products (fast; a copy is at ~1e-8 of the rows' norm).
_EXACT_DISTANCE_WORK = 50_000_000


def unit_features(activation: Tensor, dim: int, unit: int = 1) -> Tensor:
    """Each unit's entries along ``dim`` as one feature vector, for the activation-based cost.

    Args:
        activation: the outputs of a module, ``[t, ...]``, with ``size * unit`` entries on ``dim``
            (units of ``unit`` consecutive entries, e.g. attention heads of ``head_dim``).
        dim: the dimension that indexes the units (1 for ``[t, C, H, W]``, -1 for ``[t, tokens, features]``).
        unit: entries per unit.

    Returns:
        ``[size, features]`` float64: unit k's entries over samples, positions and its ``unit``
        sub-entries, flattened in one fixed order (the same for both models, which is all the cost needs).
    """
    entries = activation.shape[dim]
    if unit < 1 or entries % unit:
        raise TransportError(f"dimension {dim} of shape {tuple(activation.shape)} is not a whole number of units of {unit}")
    moved = activation.detach().to(torch.float64).movedim(dim, 0)
    return moved.reshape(entries // unit, unit, -1).reshape(entries // unit, -1)


def pairwise_cost(x: Tensor, y: Tensor, metric: str = "euclidean") -> Tensor:
    """Ground cost C[i, j] = ‖x_i − y_j‖ (``euclidean``) or ‖x_i − y_j‖² (``sqeuclidean``), float64.

    Args:
        x: ``[n_A, features]``, model A's units.
        y: ``[n_B, features]``, the anchor's units.
        metric: ``euclidean`` (OTFusion's default ground metric) or ``sqeuclidean``.

    Returns:
        ``[n_A, n_B]`` float64.
    """
    if metric not in METRICS:
        raise TransportError(f"unknown cost metric {metric!r}: use one of {', '.join(METRICS)}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise TransportError(
            f"units of shapes {tuple(x.shape)} and {tuple(y.shape)} cannot be compared: "
            "both must be [units, features] with the same number of features"
        )
    x64 = x.detach().to(torch.float64)
    y64 = y.detach().to(device=x.device, dtype=torch.float64)
    exact = x.shape[0] * y.shape[0] * x.shape[1] <= _EXACT_DISTANCE_WORK
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    distance = torch.cdist(x64, y64, compute_mode=mode)
    return distance.square() if metric == "sqeuclidean" else distance


def transport_plan(
    cost: Tensor,
    *,
    solver: str = "emd",
    reg: float = 0.01,
    a: Tensor | None = None,
    b: Tensor | None = None,
) -> Tensor:
    """The optimal transport plan T = argmin ⟨T, C⟩ subject to T 1 = a, Tᵀ 1 = b, T ≥ 0 (Alg. 1, step 3).

    Args:
        cost: ``[n_A, n_B]`` ground cost.
        solver: ``emd``, the exact network simplex (``ot.emd``), or ``sinkhorn``, the entropic
            approximation (``ot.sinkhorn`` on C / max C, so that ``reg`` means the same at any scale).
        reg: sinkhorn's entropic regularisation; ignored by emd.
        a: source marginal, default uniform 1/n_A.
        b: target marginal, default uniform 1/n_B.

    Returns:
        ``[n_A, n_B]`` float64 plan on the cost's device.

    Raises:
        TransportError: an unknown solver, a cost that is not finite, marginals that do not fit, emd
            stopped before optimality, or sinkhorn whose plan is not finite or misses its marginals by
            more than 0.1 % (raise ``reg`` or use emd).
    """
    if solver not in SOLVERS:
        raise TransportError(f"unknown transport solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if cost.dim() != 2 or 0 in cost.shape:
        raise TransportError(f"a transport cost must be a non-empty [n_A, n_B] matrix, got shape {tuple(cost.shape)}")
    costs = cost.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(costs).all():
        raise TransportError("the transport cost is not finite: the models' weights or activations hold NaN or inf")
    n_a, n_b = costs.shape
    source = _marginal(a, n_a, "a")
    target = _marginal(b, n_b, "b")
    if abs(source.sum() - target.sum()) > 1e-9 * max(source.sum(), target.sum()):
        raise TransportError(f"the marginals carry different mass ({source.sum()} and {target.sum()}): make them equal")
    costs = np.ascontiguousarray(costs)
    if solver == "emd":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns and returns; its result code is checked below
            plan, log = ot.emd(source, target, costs, numItermax=_EMD_MAX_ITER, log=True)
        if log["result_code"] != 1:
            raise TransportError(f"exact optimal transport failed on a {n_a} x {n_b} problem: {log['warning']}")
    else:
        if not reg > 0:
            raise TransportError(f"sinkhorn needs reg > 0, got {reg}: raise reg or use solver=emd")
        scale = costs.max()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns on underflow and non-convergence; the plan is checked below
            plan = ot.sinkhorn(source, target, costs / scale if scale > 0 else costs, reg, numItermax=_SINKHORN_MAX_ITER)
        if not np.isfinite(plan).all() or _marginal_error(plan, source, target) > _MARGINAL_TOLERANCE:
            raise TransportError(
                f"sinkhorn did not converge with reg={reg} on a {n_a} x {n_b} problem: raise reg or use solver=emd"
            )
    return torch.from_numpy(np.asarray(plan, dtype=np.float64)).to(cost.device)


def _marginal(weights: Tensor | None, n: int, name: str) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    values = weights.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    if values.shape[0] != n or not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise TransportError(f"marginal {name} must hold {n} finite non-negative weights with a positive sum")
    return values


def _marginal_error(plan: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The plan's L1 violation of both marginals, relative to the total mass."""
    missed = np.abs(plan.sum(axis=1) - a).sum() + np.abs(plan.sum(axis=0) - b).sum()
    return float(missed / a.sum())


def alignment_matrix(plan: Tensor) -> Tensor:
    """M = T diag(1/β), β = Tᵀ 1 the plan's column sums (Alg. 1: the aligned layer is Mᵀ Ŵ).

    Each column of M sums to 1, so aligned unit j is a convex combination of A's units; for a plan
    P/n (A a permutation P of the anchor) M is P exactly.

    Returns:
        ``[n_A, n_B]`` float64.
    """
    plan64 = plan.to(torch.float64)
    beta = plan64.sum(dim=0)
    if not bool((beta > 0).all()):
        raise TransportError("the transport plan leaves a unit of the anchor without mass; it cannot be normalised")
    return plan64 / beta


def align_dim(tensor: Tensor, matrix: Tensor, dim: int, unit: int = 1) -> Tensor:
    """Move ``tensor``'s dimension ``dim`` from A's units onto the anchor's with M.

    out[..., j·unit + u, ...] = Σ_a M[a, j] · tensor[..., a·unit + u, ...]: for output channels
    (dim 0) this is Mᵀ W, for input channels (dim 1) W M — one formula for both. Whole units of
    ``unit`` entries move together (attention heads).

    Args:
        tensor: a member of the group, with ``n_A * unit`` entries on ``dim``.
        matrix: ``[n_A, n_B]`` alignment matrix (:func:`alignment_matrix`).
        dim: the dimension to align.
        unit: entries per unit.

    Returns:
        The tensor with ``n_B * unit`` entries on ``dim``, in the input's dtype (computed in float64).
    """
    n_a, n_b = matrix.shape
    if tensor.shape[dim] != n_a * unit:
        raise TransportError(
            f"dimension {dim} of shape {tuple(tensor.shape)} has {tensor.shape[dim]} entries, "
            f"not the {n_a} units of {unit} the alignment matrix maps"
        )
    moved = tensor.detach().to(torch.float64).movedim(dim, 0)
    rest = moved.shape[1:]
    units = moved.reshape(n_a, unit, -1)
    aligned = torch.einsum("aur,ab->bur", units, matrix.to(device=tensor.device, dtype=torch.float64))
    return aligned.reshape(n_b * unit, *rest).movedim(0, dim).to(tensor.dtype)


@dataclass(frozen=True)
class LayerAlignment:
    """One layer of model A aligned to the anchor.

    Attributes:
        plan: T, ``[n_A, n_B]`` float64, the optimal transport plan.
        matrix: M = T diag(1/β), ``[n_A, n_B]`` float64; pass it as ``previous`` to the next layer and to
            :func:`align_dim` for every other member of the group.
        aligned: Mᵀ Ŵ_A, A's weight with the anchor's units on dimension 0, in the input's dtype.
        cost_before: mean_j C[j, j], the mean distance of units paired by index before alignment
            (None when the widths differ).
        cost_after: ⟨T, C⟩, the mean distance of the units matched by the plan.
    """

    plan: Tensor
    matrix: Tensor
    aligned: Tensor
    cost_before: float | None
    cost_after: float


def align_layer(
    weight: Tensor,
    anchor_weight: Tensor,
    *,
    previous: Tensor | None = None,
    activations: tuple[Tensor, Tensor] | None = None,
    unit: int = 1,
    solver: str = "emd",
    reg: float = 0.01,
) -> LayerAlignment:
    """Align one layer of model A to the anchor B with optimal transport (OTFusion, Alg. 1).

    Ŵ_A = W_A M_prev (dimension 1 follows the previous layer's alignment, when given);
    C[i, j] = ‖f_i^A − f_j^B‖ with f a unit's incoming weights (rows of Ŵ_A and W_B, weight-based)
    or its pre-activations over the same samples (``activations``, activation-based);
    T = argmin ⟨T, C⟩ with uniform marginals 1/n_A, 1/n_B; M = T diag(1/β);
    aligned = Mᵀ Ŵ_A = diag(1/β) Tᵀ Ŵ_A.

    Args:
        weight: A's incoming weight, ``[n_A * unit, in_A, ...]`` (a linear or convolution weight).
        anchor_weight: the anchor's, ``[n_B * unit, in_B, ...]``.
        previous: M of the layer feeding this one, ``[in_A, in_B]``; without it ``in_A`` must equal ``in_B``.
        activations: (A's, the anchor's) unit features ``[n, features]`` from :func:`unit_features`;
            without them the cost is weight-based.
        unit: entries per unit on dimension 0 (``head_dim`` for attention heads).
        solver: ``emd`` (exact) or ``sinkhorn`` (entropic, with ``reg``).
        reg: sinkhorn's regularisation.

    Returns:
        The plan, the alignment matrix, the aligned weight and the cost before and after.

    Raises:
        TransportError: shapes that do not fit, a cost that is not finite, or a solver that fails.
    """
    if weight.dim() < 1 or weight.shape[0] % unit or anchor_weight.shape[0] % unit:
        raise TransportError(
            f"weights of shapes {tuple(weight.shape)} and {tuple(anchor_weight.shape)} are not whole numbers of units of {unit}"
        )
    n_a, n_b = weight.shape[0] // unit, anchor_weight.shape[0] // unit
    incoming = weight.detach().to(torch.float64)
    if previous is not None:
        incoming = align_dim(incoming, previous, dim=1)
    if activations is None:
        if incoming.shape[1:] != anchor_weight.shape[1:]:
            raise TransportError(
                f"the weight {tuple(weight.shape)} cannot be compared with the anchor's {tuple(anchor_weight.shape)}: "
                "pass the previous layer's alignment matrix as previous="
            )
        cost = pairwise_cost(unit_features(incoming, 0, unit), unit_features(anchor_weight, 0, unit))
    else:
        features, anchor_features = activations
        if features.shape[0] != n_a or anchor_features.shape[0] != n_b:
            raise TransportError(
                f"activations for {features.shape[0]} and {anchor_features.shape[0]} units do not fit layers of "
                f"{n_a} and {n_b} units"
            )
        cost = pairwise_cost(features, anchor_features)
    plan = transport_plan(cost, solver=solver, reg=reg)
    matrix = alignment_matrix(plan)
    aligned = align_dim(incoming, matrix, dim=0, unit=unit).to(weight.dtype)
    cost_before = float(torch.diagonal(cost).mean()) if n_a == n_b else None
    cost_after = float((plan * cost).sum())
    logger.debug("aligned %d units to %d: cost %s -> %.6g", n_a, n_b, cost_before, cost_after)
    return LayerAlignment(plan=plan, matrix=matrix, aligned=aligned, cost_before=cost_before, cost_after=cost_after)


@dataclass(frozen=True)
class AlignedAverage:
    """θ = Σ_i c_i · align_i(θ_i): each source's tensor moved onto the anchor's neurons, then averaged (OTFusion).

    ``alignments[i]`` lists, for source i, the (dimension, map reference, unit) of every dimension of the
    tensor that indexes a neuron group; the map is the group's alignment matrix M = T diag(1/β)
    (n_i × n_anchor, columns summing to one; :func:`hfmerge.methods.ot.alignment.align_dim`), so the dimension
    becomes the anchor's width. The anchor's entry is empty: its neurons are the target. Singh & Jaggi
    (2020), Algorithm 1: W̃ = diag(1/β) Tᵀ W M_prev for a layer's output and input neurons, then
    W_F = Σ_i c_i W̃_i.
    """

    sources: tuple[TensorRef, ...]
    alignments: tuple[tuple[tuple[int, TensorRef, int], ...], ...]
    coefficients: tuple[float, ...]
    group: str = "aligned by optimal transport, then averaged"

    def apply(self, load: Loader) -> torch.Tensor:
        total: torch.Tensor | None = None
        for ref, dims, coefficient in zip(self.sources, self.alignments, self.coefficients):
            if coefficient == 0.0:
                continue
            tensor = load(ref).to(torch.float32)
            for dim, map_ref, unit in dims:
                tensor = align_dim(tensor, load(map_ref), dim, unit).to(torch.float32)
            term = tensor * coefficient
            total = term if total is None else total.add_(term)
        if total is None:
            raise ValueError("an aligned average needs at least one non-zero coefficient")
        return total
