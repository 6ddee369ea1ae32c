"""What the task-vector methods (task_arithmetic, ties, dare) share: pairing the base with the sources.

A task vector τ_i = θ_i − θ_base needs θ_base for each tensor. The base is
usually the pre-trained checkpoint the sources were fine-tuned from, and that
is often a headless backbone (``ViTModel`` for
``google/vit-base-patch16-224-in21k``) whose names lack the task models'
backbone prefix (``vit.``): each source tensor is paired with the base tensor
of the same name, or of the same name without the adapter's
``backbone_prefix``, when the shapes agree.

Not every tensor is a task vector:

- BatchNorm running statistics (``running_mean``, ``running_var``) describe
  activations, not a fine-tuning direction; θ_base + λ Σ τ_i can make a
  variance negative. They are averaged over the sources.
- Integer buffers (``num_batches_tracked``) are the anchor's.
- Tensors outside the backbone that the base lacks or shapes differently
  (classifier heads, a segmentation decoder), and classifier heads whose labels
  are not the base's, follow the head policy (:mod:`hfmerge.methods.heads`). An
  explicit ``--heads`` applies to every classifier head.
- A backbone tensor the base lacks is an error: the base is then not the model
  the sources were fine-tuned from.

TIES and DARE share one operation, :class:`DisjointMerge`, which makes each task
vector sparse (TIES's trim, DARE's drop and rescale) and then adds them or
elects their signs. TIES's trim is per tensor, or over the whole model with
thresholds found beforehand by :func:`global_trim_thresholds`, which streams
the task vectors twice and never holds one whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hfmerge.adapters.layout import ModelLayout, TensorInfo
from hfmerge.engine.ops import Copy, LinearCombination, Loader, MergeOp, TensorRef
from hfmerge.engine.plan import MergeContext, MergePlan, TensorPlan, require_all_shared
from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.heads import head_policy, labels_agree, plan_heads

RUNNING_STATISTICS = ("running_mean", "running_var")

TaskVectorOp = Callable[[TensorInfo, TensorRef, tuple[TensorRef, ...]], MergeOp]
"""Builds a tensor's operation from (anchor's tensor info, base reference, source references)."""


def is_running_statistic(name: str) -> bool:
    """Whether ``name`` is a normalisation layer's running mean or variance."""
    return name.rsplit(".", 1)[-1] in RUNNING_STATISTICS


def base_refs(ctx: MergeContext, base: ModelLayout) -> tuple[dict[str, TensorRef], bool]:
    """Each anchor tensor's counterpart in the base, and whether the backbone prefix was stripped to find them.

    A tensor is paired with the base tensor of the same in-memory name, or of
    that name without ``<backbone_prefix>.``, or (a headless source against a
    full base: CLIP towers against a ``CLIPModel``) with it, of the same shape.
    """
    refs: dict[str, TensorRef] = {}
    stripped = False
    for name, info in ctx.anchor.tensors.items():
        for candidate in base_candidates(ctx.anchor, name):
            other = base.tensors.get(candidate)
            if other is not None and other.shape == info.shape:
                refs[name] = (ctx.base_index, other.key)
                stripped = stripped or candidate != name
                break
    return refs, stripped


def base_candidates(anchor: ModelLayout, name: str) -> list[str]:
    """The names an anchor tensor may have in another architecture of its family: its own, then without or with
    the adapter's ``backbone_prefix``."""
    prefix = anchor.family.backbone_prefix
    if not prefix:
        return [name]
    if name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1 :]]
    return [name, f"{prefix}.{name}"]


def is_backbone(anchor: ModelLayout, name: str) -> bool:
    """Whether the anchor's tensor ``name`` is its backbone's: under the ``backbone_prefix``, or any tensor but a
    head of a headless anchor (one with no tensor under the prefix: a ``ViTModel``, a ``CLIPVisionModel``)."""
    prefix = anchor.family.backbone_prefix
    if not prefix:
        return False
    if name.startswith(prefix + "."):
        return True
    headless = not any(n.startswith(prefix + ".") for n in anchor.tensors)
    return headless and anchor.tensors[name].head is None


def require_base_backbone(ctx: MergeContext, refs: dict[str, TensorRef]) -> None:
    """Raise unless the base has every backbone tensor of the anchor (``refs`` from :func:`base_refs`).

    Raises:
        IncompatibleModelsError: the base lacks a backbone tensor or shapes it differently.
    """
    if ctx.base is None:
        raise RecipeError("the task vectors need the pre-trained model: add --base org/name")
    anchor = ctx.anchor
    missing = [n for n, info in anchor.tensors.items()
               if n not in refs and not info.is_integer and is_backbone(anchor, n)]
    if missing:
        raise IncompatibleModelsError(
            f"the base {ctx.base.source.name} ({ctx.base.architecture}) lacks {len(missing)} backbone tensor(s) of "
            f"{anchor.source.name} or shapes them differently (e.g. {missing[0]}); give as --base the pre-trained "
            "model the sources were fine-tuned from"
        )


def plan_task_vectors(ctx: MergeContext, method: str, make_op: TaskVectorOp, details: dict[str, Any]) -> MergePlan:
    """Plan a task-vector merge: ``make_op`` for each task vector, the rules above for the rest.

    Raises:
        RecipeError: no base model.
        IncompatibleModelsError: the base lacks a backbone tensor, or the
            sources differ outside what the head policy takes.
    """
    if ctx.base is None:
        raise RecipeError(f"method '{method}' needs the pre-trained model: add --base org/name")
    anchor = ctx.anchor
    refs, stripped = base_refs(ctx, ctx.base)
    require_base_backbone(ctx, refs)
    heads_follow_labels = ctx.heads is None and labels_agree([*ctx.sources, ctx.base])
    handed = [
        n for n, info in anchor.tensors.items()
        if not info.is_integer and (n not in refs or (info.head is not None and not heads_follow_labels))
    ]
    require_all_shared(ctx, method, except_names=handed)
    head_plan = plan_heads(ctx, handed, head_policy(ctx))
    by_name: dict[str, TensorPlan] = {entry.name: entry for entry in head_plan.entries}
    uniform = tuple(1.0 / len(ctx.sources) for _ in ctx.sources)
    entries = []
    for name, info in anchor.tensors.items():
        if name in by_name:
            entries.append(by_name[name])
        elif info.is_integer:
            entries.append(ctx.plan_entry(info, Copy((ctx.anchor_index, info.key))))
        elif is_running_statistic(name):
            op = LinearCombination(ctx.refs(name), uniform, group="averaged (normalisation statistics)")
            entries.append(ctx.plan_entry(info, op))
        else:
            entries.append(ctx.plan_entry(info, make_op(info, refs[name], ctx.refs(name))))
    facts = {**details, **head_plan.details}
    if not any(anchor.tensors[n].head is not None for n in handed):
        facts["heads"] = "task vectors" if anchor.head_tensors else None
    if stripped:
        facts["base_prefix"] = anchor.family.backbone_prefix
    return MergePlan(entries, config_updates=head_plan.config_updates, details=facts)


def is_weight_matrix(layout: ModelLayout, info: TensorInfo) -> bool:
    """Whether ``info`` is the weight of an ``nn.Linear`` or a convolution: what the SVD-based merges treat as a matrix.

    TSV-M, Iso-C/CTS and WUDI work on the weight matrices of linear layers, a
    convolution's kernel being the matrix (out, in·k·k) (:func:`as_matrix`).
    Biases, norms, embeddings and position tensors are not matrices even when 2-D.
    """
    if info.name != f"{info.module}.weight" or len(info.shape) < 2:
        return False
    kind = layout.module_kinds.get(info.module)
    return (kind == "linear" and len(info.shape) == 2) or kind == "conv"


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: a linear weight as it is, a convolution kernel (out, in, k, k) as (out, in·k·k)."""
    return tensor.reshape(tensor.shape[0], -1)


_HIGH_BITS = 1 << 15
"""Buckets of the first count: the upper 16 bits of a non-negative float32 (its sign bit is 0)."""
_LOW_BITS = 1 << 16
_SMALL = 1 << 14
"""Up to this many entries, ``torch.kthvalue`` is as fast as the counts (it returns the same value)."""


def top_magnitude_threshold(task_vector: torch.Tensor, density: float) -> float | None:
    """The k-th largest magnitude of ``task_vector``, k = ⌊density · numel⌋ (TIES, §3 "Trim"), per tensor as mergekit does.

    ``None`` when every entry is kept (k = numel); ``inf`` when none is (k = 0).
    """
    return _top_magnitude_threshold(task_vector.abs(), density)


def _top_magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float | None:
    """:func:`top_magnitude_threshold` from the magnitudes |τ| (float32) the caller already holds."""
    k = int(density * magnitudes.numel())
    if k >= magnitudes.numel():
        return None
    if k == 0:
        return float("inf")
    rank = magnitudes.numel() - k + 1
    if magnitudes.numel() <= _SMALL:
        return float(torch.kthvalue(magnitudes.reshape(-1), rank).values)
    return kth_smallest_magnitude(magnitudes, rank)


def kth_smallest_magnitude(magnitudes: torch.Tensor, rank: int) -> float:
    """The ``rank``-th smallest (1-based) of the float32 ``magnitudes`` (≥ 0 or NaN): ``torch.kthvalue``'s value.

    A selection by counting, several times faster than ``kthvalue``'s on a CPU:
    a non-negative float32's bits, read as an integer, order as its value does
    (NaN's after +inf, as ``kthvalue`` orders it; −0 is +0 once ``abs`` made it
    a magnitude), so one count of the entries by their upper 16 bits brackets
    the rank-th in one bucket, and a count of that bucket's entries by their
    lower 16 bits names it. Ties need no care: the value at a rank is unique.
    The same two-level count as :func:`global_trim_thresholds`, on one tensor.
    """
    if not 1 <= rank <= magnitudes.numel():
        raise ValueError(f"rank {rank} is outside 1..{magnitudes.numel()}")
    bits = magnitudes.reshape(-1).view(torch.int32)
    high = bits >> 16
    counts = torch.bincount(high, minlength=_HIGH_BITS)
    bucket, below = _bucket_of_rank(counts, rank)
    if int(counts[bucket]) == bits.numel():  # one bucket holds all (a task vector of zeros: a source equal to the base)
        in_bucket = bits
    else:
        in_bucket = _bucket_entries(bits, high, bucket)
    offset, _ = _bucket_of_rank(torch.bincount(in_bucket & 0xFFFF, minlength=_LOW_BITS), rank - below)
    return _float_of_bits((bucket << 16) | offset)


def _bucket_entries(bits: torch.Tensor, high: torch.Tensor, bucket: int) -> torch.Tensor:
    """The entries of ``bits`` whose upper 16 bits (``high``) are ``bucket``, in order.

    ``nonzero`` + ``index_select`` picks the same entries as ``bits[high == bucket]``, 2–3× faster on a CPU.
    """
    return torch.index_select(bits, 0, torch.eq(high, bucket).nonzero().squeeze(1))


def _bucket_of_rank(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket that holds the ``rank``-th smallest entry (1-based), given each bucket's count, and how many
    entries the buckets before it hold."""
    cumulative = torch.cumsum(counts, 0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(rank)))
    return bucket, int(cumulative[bucket - 1]) if bucket else 0


def _float_of_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


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
    thresholds: tuple[float | None, ...] | None = field(default=None, repr=False)
    """Per source, the magnitude below which its entries are trimmed, found over the whole model
    (:func:`global_trim_thresholds`); ``None``: the trim finds each tensor's own (``density`` of it)."""

    def _task_vector(self, load: Loader, index: int, base: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
        """τ_i = θ_i − θ_base, in ``scratch.task_vector``."""
        return torch.sub(load(self.sources[index]).to(torch.float32), base, out=scratch.task_vector)

    def _sparse_task_vector(self, load: Loader, index: int, base: torch.Tensor,
                            thresholds: list[float | None]) -> torch.Tensor:
        """τ̂_i as the rule reads: ``torch.where(|τ_i| >= t_i, τ_i, 0)`` (trim), or DARE's drop and rescale."""
        task_vector = load(self.sources[index]).to(torch.float32) - base
        if self.sparsify == "trim":
            return trim_to_threshold(task_vector, thresholds[index])
        return drop_and_rescale(task_vector, self.drop_rate, dare_generator(self.seed, self.key, index))

    def _sum(self, load: Loader, base: torch.Tensor, thresholds: list[float | None], scratch: _Scratch, *,
             literal: bool) -> torch.Tensor:
        """Σ_i τ̂_i; the first (not ``literal``) call finds each source's trim threshold, into ``thresholds``.

        Not ``literal``, a trimmed τ̂_i is added as τ_i·m_i with m_i = [|τ_i| >= t_i] ∈ {0., 1.} in one
        ``addcmul_``: exactly the literal sum wherever τ_i is finite (τ·1 = τ, τ·0 = ±0, and a sum that
        starts at +0 is never −0, so adding ±0 changes nothing), and NaN where it is not (inf·0).
        """
        total = torch.zeros_like(base)
        for index in range(len(self.sources)):
            if literal or self.sparsify != "trim":
                total.add_(self._sparse_task_vector(load, index, base, thresholds))
                continue
            task_vector = self._task_vector(load, index, base, scratch)
            magnitudes = torch.abs(task_vector, out=scratch.magnitudes)
            if len(thresholds) <= index:
                thresholds.append(_top_magnitude_threshold(magnitudes, self.density))
            if thresholds[index] is None:
                total.add_(task_vector)
            else:
                total.addcmul_(task_vector, torch.ge(magnitudes, thresholds[index], out=scratch.keep))
        return total

    def _disjoint_mean(self, load: Loader, base: torch.Tensor, elected: torch.Tensor,
                       thresholds: list[float | None], scratch: _Scratch, *, literal: bool) -> torch.Tensor:
        """The mean of the τ̂_i whose sign is the elected γ, zeros excluded (0 where none is).

        Literally, agreement is sgn(τ̂_i) = γ and τ̂_i ≠ 0 (``torch.sign`` of a NaN sum is 0, so a NaN τ̂_i
        agrees with it). Not ``literal``, for a trimmed τ_i: τ_i·γ ≥ t_i (τ_i·γ > 0 when t_i is 0 or
        everything is kept), since γ ∈ {−1, 0, 1} and |τ_i·γ| = |τ_i| where γ = ±1, so no second trim is
        needed; the agreeing τ_i are added as in :meth:`_sum`, exact wherever τ_i is finite.
        """
        agreeing_sum = torch.zeros_like(base)
        agreeing_count = torch.zeros_like(base)
        for index in range(len(self.sources)):
            if literal or self.sparsify != "trim":
                sparse = self._sparse_task_vector(load, index, base, thresholds)
                agrees = (torch.sign(sparse) == elected) & (sparse != 0)
                agreeing_sum.add_(torch.where(agrees, sparse, 0.0))
                agreeing_count.add_(agrees.to(torch.float32))
                continue
            task_vector = self._task_vector(load, index, base, scratch)
            product = torch.mul(task_vector, elected, out=scratch.magnitudes)
            threshold = thresholds[index]
            if threshold is None or threshold == 0.0:
                agrees = torch.gt(product, 0.0, out=scratch.keep)
            else:
                agrees = torch.ge(product, threshold, out=scratch.keep)
            agreeing_sum.addcmul_(task_vector, agrees)
            agreeing_count.add_(agrees)
        return agreeing_sum.div_(agreeing_count.clamp_(min=1.0))

    def apply(self, load: Loader) -> torch.Tensor:
        if self.thresholds is not None and len(self.thresholds) != len(self.sources):
            raise RuntimeError(f"{self.key}: the whole-model trim thresholds were not found (no analysis ran)")
        base = load(self.base).to(torch.float32)
        scratch = _Scratch(base)
        thresholds: list[float | None] = list(self.thresholds) if self.thresholds is not None else []
        # The fast sums agree with the literal ones bit for bit whenever they come out finite; a non-finite
        # one (a NaN or inf task-vector entry, which the merge refuses anyway) is recomputed literally.
        total = self._sum(load, base, thresholds, scratch, literal=False)
        if not torch.isfinite(total.sum()):
            total = self._sum(load, base, thresholds, scratch, literal=True)
        # each in-place step rounds as base + λ·total (and base + λ·mean) does: no fused operation
        if self.sign == "sum":
            return total.mul_(self.scale).add_(base)
        elected = total.sign_()
        mean = self._disjoint_mean(load, base, elected, thresholds, scratch, literal=False)
        if not torch.isfinite(mean.sum()):
            mean = self._disjoint_mean(load, base, elected, thresholds, scratch, literal=True)
        return mean.mul_(self.scale).add_(base)


class _Scratch:
    """Buffers the shape of one tensor, reused for every source."""

    def __init__(self, like: torch.Tensor) -> None:
        self.task_vector = torch.empty_like(like)
        self.magnitudes = torch.empty_like(like)
        self.keep = torch.empty_like(like)
        """A mask as 0./1., the factor of ``addcmul_``."""


@dataclass
class GlobalTrim:
    """What :func:`global_trim_thresholds` found: each source's threshold over all its task-vector entries."""

    thresholds: tuple[float | None, ...]
    """Per source, the smallest magnitude kept (``None``: every entry is kept)."""
    entries: int
    """d: the task-vector entries of one source, over every tensor merged as a task vector."""
    kept: tuple[int, ...]
    """Per source, how many entries reach its threshold: ⌊density·d⌋ + 1 unless magnitudes tie."""
    tensors: int


def global_trim_thresholds(ops: list[DisjointMerge], load: Loader, density: float) -> GlobalTrim:
    """Each source's trim threshold over its whole task vector, as the TIES paper's code trims (exact, streamed).

    The official code (``topk_values_mask`` in ``src/utils/merge_utils.py`` of
    prateeky2806/ties-merging) flattens each task vector over the whole model
    (``state_dict_to_vector``), takes m = d − ⌊density·d⌋ and keeps the entries
    whose magnitude is at least the m-th smallest (``kthvalue(m)``): that keeps
    ⌊density·d⌋ + 1 entries, one more than the density says, and is followed
    here to the letter; density 1 (m = 0, where ``kthvalue`` fails) keeps all.

    The m-th smallest magnitude is found exactly without holding a task vector:
    a non-negative float32's bits, read as an integer, order as its value does,
    so a first pass counts each source's magnitudes by their upper 16 bits,
    which brackets the m-th one in one bucket, and a second pass counts that
    bucket's entries by their lower 16 bits, which names it. Each pass reads one
    tensor of the base and the sources at a time, the task vector computed as
    the op computes it (float32), so the op's comparison agrees bit for bit.
    """
    count = len(ops[0].sources) if ops else 0
    high = torch.zeros(count, _HIGH_BITS, dtype=torch.int64)
    entries = 0
    for op in ops:
        for index, bits in _magnitude_bits(op, load):
            high[index] += torch.bincount(bits >> 16, minlength=_HIGH_BITS)
            entries += bits.numel() if index == 0 else 0
    rank = entries - int(density * entries)  # the paper's k = d - int(d * K), 1-based, ascending
    if rank == 0 or count == 0:
        return GlobalTrim((None,) * count, entries, (entries,) * count, len(ops))
    below, buckets = [], []
    for index in range(count):
        bucket, before = _bucket_of_rank(high[index], rank)
        buckets.append(bucket)
        below.append(before)
    low = torch.zeros(count, _LOW_BITS, dtype=torch.int64)
    for op in ops:
        for index, bits in _magnitude_bits(op, load):
            low[index] += torch.bincount(_bucket_entries(bits, bits >> 16, buckets[index]) & 0xFFFF,
                                         minlength=_LOW_BITS)
    thresholds, kept = [], []
    for index in range(count):
        offset, before = _bucket_of_rank(low[index], rank - below[index])
        thresholds.append(_float_of_bits((buckets[index] << 16) | offset))
        kept.append(entries - below[index] - before)
    return GlobalTrim(tuple(thresholds), entries, tuple(kept), len(ops))


def _magnitude_bits(op: DisjointMerge, load: Loader) -> Any:
    """(source index, the bits of |τ_i| as int32, flat) for one tensor, one source at a time."""
    base = load(op.base).to(torch.float32)
    for index, ref in enumerate(op.sources):
        yield index, (load(ref).to(torch.float32) - base).abs().reshape(-1).view(torch.int32)
