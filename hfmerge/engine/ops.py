"""The tensor operations merge plans are made of: what every operation is, and the ones methods share.

Each operation names its inputs as :data:`TensorRef` pairs and pulls them one
at a time through a ``load`` callable, accumulating in float32. That keeps the
maths free of I/O (tests call these with a dict) and keeps peak memory at a few
tensors however many sources there are.

An operation is any object with a ``group`` and an ``apply(load)``
(:class:`MergeOp`). The ones every method uses live here (:class:`Copy`,
:class:`LinearCombination`); a method's own operations live beside the method
(RegMean's in :mod:`hfmerge.methods.regmean`, the task-vector methods' in
:mod:`hfmerge.methods.task_vectors`, OTFusion's in :mod:`hfmerge.methods.ot.alignment`),
so adding one touches no shared file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

TensorRef = tuple[int | str, str]
"""(a table of the merge, key in that table): a model's checkpoint tensor, a statistic, a stage's tensor.

Models are numbered: 0..M-1 the sources, M the base model when there is one. The
tables the stages make are named: each source's statistics (see
:meth:`hfmerge.engine.plan.MergeContext.statistics_index`), a stage's own table by
the stage's name (``derive``, ``gate``)."""

Loader = Callable[[TensorRef], torch.Tensor]


class MergeOp(Protocol):
    """What a plan's operation is to the engine, the plan's summary and the card: a group and an ``apply``.

    Any class with these two members is an operation (usually a frozen dataclass of
    :data:`TensorRef` inputs and numbers); nothing registers it.
    """

    @property
    def group(self) -> str:
        """The kind of operation, as the dry run and the card count tensors by (``"averaged"``)."""
        ...

    def apply(self, load: Loader) -> torch.Tensor:
        """The output tensor, its inputs read through ``load`` (the engine casts it to the planned dtype)."""
        ...


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


def normalise(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights divided by their sum (the caller checked they are non-negative, sum > 0)."""
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)
