"""The tensor operations merge plans are made of.

Each operation names its inputs as :data:`TensorRef` pairs and pulls them one
at a time through a ``load`` callable, accumulating in float32. That keeps the
maths free of I/O (tests call these with a dict) and keeps peak memory at a few
tensors however many sources there are.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hfmerge.errors import MergeNumericError

logger = logging.getLogger(__name__)

TensorRef = tuple[int | str, str]
"""(a table of the merge, key in that table): a model's checkpoint tensor, a statistic, a stage's tensor.

Models are numbered: 0..M-1 the sources, M the base model when there is one. The
tables the stages make are named: each source's statistics (see
:meth:`hfmerge.engine.plan.MergeContext.statistics_index`), a stage's own table by
the stage's name (``derive``, ``gate``)."""

Loader = Callable[[TensorRef], torch.Tensor]


@dataclass(frozen=True)
class Copy:
    """Take one model's tensor as it is (heads kept from the anchor, integer buffers)."""

    source: TensorRef
    group: str = "kept from anchor"

    def apply(self, load: Loader) -> torch.Tensor:
        return load(self.source)


@dataclass(frozen=True)
class LinearCombination:
    """θ = Σ_i c_i θ_i, computed in float32; inputs with c_i = 0 are not read.

    When the coefficients sum to one (every averaging method) the sum is a
    running weighted mean, m_k = lerp(m_{k−1}, θ_k, c_k / Σ_{i≤k} c_i), starting
    from the largest coefficient: the same number mathematically, one fused
    in-place pass per source, and exact where it should be — identical sources
    merge to themselves bit for bit, and a layer whose anchor weight is one is
    the anchor's.
    """

    sources: tuple[TensorRef, ...]
    coefficients: tuple[float, ...]
    group: str = "averaged"

    def apply(self, load: Loader) -> torch.Tensor:
        terms = [(r, c) for r, c in zip(self.sources, self.coefficients) if c != 0.0]
        if not terms:
            raise ValueError("a linear combination needs at least one non-zero coefficient")
        if abs(sum(self.coefficients) - 1.0) < 1e-9:
            terms.sort(key=lambda term: -term[1])
            first_ref, seen = terms[0]
            first = load(first_ref).to(torch.float32)
            if len(terms) == 1:
                return first.clone()
            ref, coefficient = terms[1]
            seen += coefficient
            acc = torch.lerp(first, load(ref).to(torch.float32), coefficient / seen)  # a new tensor we own
            for ref, coefficient in terms[2:]:
                seen += coefficient
                acc.lerp_(load(ref).to(torch.float32), coefficient / seen)
            return acc
        acc = load(terms[0][0]).to(torch.float32) * terms[0][1]
        for ref, coefficient in terms[1:]:
            acc.add_(load(ref).to(torch.float32), alpha=coefficient)
        return acc


@dataclass(frozen=True)
class TaskArithmetic:
    """θ = θ_base + λ Σ_i (θ_i − θ_base)  (Ilharco et al., 2023, task vectors)."""

    base: TensorRef
    sources: tuple[TensorRef, ...]
    scale: float
    group: str = "base + λ·Σ task vectors"

    def apply(self, load: Loader) -> torch.Tensor:
        base = load(self.base).to(torch.float32)
        task_sum = torch.zeros_like(base)
        for ref in self.sources:
            task_sum.add_(load(ref).to(torch.float32) - base)
        return base + self.scale * task_sum


def top_magnitude_threshold(task_vector: torch.Tensor, density: float) -> float | None:
    """The k-th largest magnitude of ``task_vector``, k = ⌊density · numel⌋ (TIES, §3 "Trim"), per tensor as mergekit does.

    ``None`` when every entry is kept (k = numel); ``inf`` when none is (k = 0).
    """
    k = int(density * task_vector.numel())
    if k >= task_vector.numel():
        return None
    if k == 0:
        return float("inf")
    return float(torch.kthvalue(task_vector.abs().reshape(-1), task_vector.numel() - k + 1).values)


def trim_to_threshold(task_vector: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries whose magnitude is below ``threshold`` (from :func:`top_magnitude_threshold`).

    Exactly the top k entries are kept unless several share the k-th magnitude,
    which continuous weights practically never do; zeros kept change nothing.
    """
    if threshold is None:
        return task_vector
    return torch.where(task_vector.abs() >= threshold, task_vector, 0.0)


def dare_generator(seed: int, key: str, source: int) -> torch.Generator:
    """The random generator for one (tensor, source) pair, derived from (seed, key, source index).

    Deriving it from a hash rather than drawing from one stream makes every
    tensor's mask independent of the order tensors and sources are visited in.
    """
    digest = hashlib.sha256(f"{seed}\0{key}\0{source}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def drop_and_rescale(task_vector: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., 2024, §3, Eq. 2): drop each entry with probability p, rescale the rest by 1/(1 − p)."""
    keep = torch.rand(task_vector.shape, generator=generator) >= drop_rate
    return task_vector * keep / (1.0 - drop_rate)


@dataclass(frozen=True)
class DisjointMerge:
    """θ = θ_base + λ · merge(τ̂_1..τ̂_N) over task vectors τ_i = θ_i − θ_base made sparse first.

    ``sparsify`` turns τ_i into τ̂_i: ``"trim"`` keeps the top ⌊density·numel⌋
    magnitudes (TIES), ``"drop"`` drops entries at random with probability
    ``drop_rate`` and rescales the rest (DARE). ``sign`` combines them:
    ``"sum"`` adds them (task arithmetic), ``"ties"`` elects each entry's sign
    γ = sgn(Σ_i τ̂_i) and takes the mean of the τ̂_i whose sign is γ, zeros
    excluded (TIES §3, "Elect" and "Disjoint merge").

    Memory stays flat in N: the TIES path makes two passes over the sources,
    recomputing τ̂_i (same magnitude threshold, same seeded mask) instead of holding N of them.
    """

    base: TensorRef
    sources: tuple[TensorRef, ...]
    scale: float
    sparsify: str
    sign: str = "ties"
    density: float = 1.0
    drop_rate: float = 0.0
    seed: int = 0
    key: str = ""
    group: str = "base + λ·merged sparse task vectors"

    def _sparse_task_vector(self, load: Loader, index: int, base: torch.Tensor,
                            thresholds: list[float | None]) -> torch.Tensor:
        """τ̂_i; the trim's threshold is found on the first pass and reused on the second (no second top-k)."""
        task_vector = load(self.sources[index]).to(torch.float32) - base
        if self.sparsify == "trim":
            if len(thresholds) <= index:
                thresholds.append(top_magnitude_threshold(task_vector, self.density))
            return trim_to_threshold(task_vector, thresholds[index])
        return drop_and_rescale(task_vector, self.drop_rate, dare_generator(self.seed, self.key, index))

    def apply(self, load: Loader) -> torch.Tensor:
        base = load(self.base).to(torch.float32)
        total = torch.zeros_like(base)
        thresholds: list[float | None] = []
        for index in range(len(self.sources)):
            total.add_(self._sparse_task_vector(load, index, base, thresholds))
        if self.sign == "sum":
            return base + self.scale * total
        elected = torch.sign(total)
        del total
        agreeing_sum = torch.zeros_like(base)
        agreeing_count = torch.zeros_like(base)
        for index in range(len(self.sources)):
            sparse = self._sparse_task_vector(load, index, base, thresholds)
            agrees = (torch.sign(sparse) == elected) & (sparse != 0)
            agreeing_sum.add_(torch.where(agrees, sparse, 0.0))
            agreeing_count.add_(agrees.to(torch.float32))
        return base + self.scale * (agreeing_sum / agreeing_count.clamp(min=1.0))


@dataclass(frozen=True)
class ConcatHeads:
    """Stack classifier heads along the output dimension (parameter fusion, §III).

    Rows ``[0, n_i)`` of source i are its label rows and are stacked in source
    order; ``null_rows`` trailing rows (a "no object" class) exist once in the
    result and are the weighted average of the sources' null rows.
    """

    sources: tuple[TensorRef, ...]
    label_rows: tuple[int, ...]
    null_rows: int = 0
    null_weights: tuple[float, ...] | None = None
    group: str = "concatenated"

    def apply(self, load: Loader) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        null: torch.Tensor | None = None
        weights = self.null_weights or tuple(1.0 / len(self.sources) for _ in self.sources)
        for ref, rows, weight in zip(self.sources, self.label_rows, weights):
            tensor = load(ref).to(torch.float32)
            parts.append(tensor[:rows].clone())
            if self.null_rows:
                tail = tensor[rows : rows + self.null_rows] * weight
                null = tail if null is None else null + tail
        if null is not None:
            parts.append(null)
        return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class Stack:
    """Keep every source's tensor, stacked on a new leading dimension: (N, *shape).

    For an output model that holds one copy of a module per source (the gated
    layers of the gating merge, whose weights are mixed per input at run time,
    vit-gating-merge Eq. 2), so the merge itself computes nothing.
    """

    sources: tuple[TensorRef, ...]
    group: str = "stacked per source"

    def apply(self, load: Loader) -> torch.Tensor:
        first = load(self.sources[0]).to(torch.float32)
        out = torch.empty((len(self.sources), *first.shape), dtype=torch.float32)
        out[0] = first
        for i, ref in enumerate(self.sources[1:], start=1):
            out[i] = load(ref)
        return out


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
        from hfmerge.methods.ot.alignment import align_dim

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


def regularised_sum_of_grams(grams: Sequence[torch.Tensor], alpha: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """G̃_i = α G_i + (1 − α) diag(G_i) for each Gram matrix, in float64, and their sum.

    RegMean's regularisation (Jin et al., 2023, §3.2; the ViT paper's appendix A):
    the off-diagonal entries of every Gram matrix are scaled by α, which keeps
    Σ G̃_i positive definite whenever every input feature was seen (α < 1).
    """
    scaled = []
    for gram in grams:
        g = gram.to(torch.float64)
        scaled.append(alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g)))
    total = scaled[0].clone()
    for g in scaled[1:]:
        total.add_(g)
    return total, scaled


def solve_gram_system(total: torch.Tensor, rhs: torch.Tensor, *, name: str = "") -> torch.Tensor:
    """X with (Σ G̃_i) X = rhs, by a Cholesky factorisation (never an explicit inverse).

    A singular Σ G̃_i (an input feature no sample ever excited, or α = 1 with
    fewer rows than features) is regularised with a ridge of 1e-6 of its mean
    diagonal, retried with larger ridges until the factorisation succeeds; a
    warning says so. The result is never NaN.
    """
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        scale = float(torch.diagonal(total).abs().mean()) or 1.0
        ridge = 1e-6 * scale
        eye = torch.eye(total.shape[0], dtype=total.dtype)
        for _ in range(12):
            factor, info = torch.linalg.cholesky_ex(total + ridge * eye)
            if int(info) == 0:
                break
            ridge *= 10.0
        else:
            raise MergeNumericError(
                f"RegMean: the summed Gram matrix{f' of {name}' if name else ''} is not finite or not positive "
                "semi-definite; check the sources' outputs on the data for NaN/inf"
            )
        logger.warning(
            "RegMean: the summed Gram matrix%s is singular (an input feature the data never excited); "
            "regularised with a ridge of %.3g",
            f" of {name}" if name else "", ridge,
        )
    return torch.cholesky_solve(rhs, factor)


@dataclass(frozen=True)
class RegMeanLinear:
    """RegMean (Jin et al., 2023, Eq. 5; the ViT paper's appendix A) for one ``nn.Linear`` weight.

    W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ in the x·W orientation, i.e. for PyTorch's
    ``Linear.weight`` (out × in): W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹, with G_i the
    Gram matrix of the layer's inputs on source i's data (a statistics
    reference) and G̃_i its α-regularised form. Sources are accumulated one at
    a time, so memory holds two in×in matrices whatever their number.
    """

    sources: tuple[TensorRef, ...]
    grams: tuple[TensorRef, ...]
    alpha: float
    group: str = "RegMean (linear layers)"

    def apply(self, load: Loader) -> torch.Tensor:
        total: torch.Tensor | None = None
        rhs: torch.Tensor | None = None
        for weight_ref, gram_ref in zip(self.sources, self.grams):
            _, (g,) = regularised_sum_of_grams([load(gram_ref)], self.alpha)
            product = g @ load(weight_ref).to(torch.float64).T  # G̃_i W_iᵀ: in × out
            total = g if total is None else total.add_(g)
            rhs = product if rhs is None else rhs.add_(product)
        assert total is not None and rhs is not None
        return solve_gram_system(total, rhs, name=self.sources[0][1]).T.to(torch.float32).contiguous()


@dataclass(frozen=True)
class FisherWeighted:
    """Fisher merging (Matena & Raffel, 2022, Eq. 2) with the diagonal Fisher.

    θ = Σ_i w_i F̂_i θ_i / Σ_i w_i F̂_i, entry by entry, where F̂_i = F_i / n_i + ε
    is source i's mean per-sample Fisher (a statistics sum ``F_i`` over ``n_i``
    samples) and w_i the source weights. ε keeps entries that no sample
    informed (zero Fisher in every source) at the weighted average.
    """

    sources: tuple[TensorRef, ...]
    fishers: tuple[TensorRef, ...]
    counts: tuple[TensorRef, ...]
    weights: tuple[float, ...]
    epsilon: float = 1e-8
    group: str = "Fisher-weighted"

    def apply(self, load: Loader) -> torch.Tensor:
        numerator: torch.Tensor | None = None
        denominator: torch.Tensor | None = None
        for ref, fisher_ref, count_ref, weight in zip(self.sources, self.fishers, self.counts, self.weights):
            if weight == 0.0:
                continue
            count = float(load(count_ref))
            importance = weight * (load(fisher_ref).to(torch.float64) / max(count, 1.0) + self.epsilon)
            term = importance * load(ref).to(torch.float64)
            numerator = term if numerator is None else numerator.add_(term)
            denominator = importance if denominator is None else denominator.add_(importance)
        assert numerator is not None and denominator is not None
        return (numerator / denominator).to(torch.float32)


MergeOp = (Copy | LinearCombination | TaskArithmetic | DisjointMerge | ConcatHeads | RegMeanLinear | FisherWeighted
           | Stack | AlignedAverage)


def normalise(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights divided by their sum (the caller checked they are non-negative, sum > 0)."""
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)
