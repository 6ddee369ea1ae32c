"""TIES's per-tensor trim, found by counting bits instead of ``torch.kthvalue``, gives the same merge bit for bit.

The references here are the rules as first written: the threshold is
``torch.kthvalue(|τ|, numel − k + 1)``, τ̂ = ``torch.where(|τ| >= t, τ, 0)``, the
elected sign ``torch.sign(Σ τ̂_i)``, agreement ``sgn(τ̂_i) = γ and τ̂_i ≠ 0``, and
θ = θ_base + λ · (agreeing sum / max(count, 1)). Inputs are made to hit what
a faster selection could get wrong: many equal magnitudes, exact zeros and −0,
sizes from one entry up, densities from 0 to 1, and inf/NaN entries.
"""

from __future__ import annotations

import math

import pytest
import torch

from hfmerge.methods.task_vectors import (
    DisjointMerge,
    dare_generator,
    drop_and_rescale,
    kth_smallest_magnitude,
    top_magnitude_threshold,
)

DENSITIES = (0.0, 1e-9, 0.01, 0.2, 0.5, 0.77, 0.999, 1.0)
SIZES = ((1,), (2,), (3, 1), (7, 5), (33,), (64, 48), (129, 257))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equal bits means the same number, −0 and NaN included."""
    return tensor.contiguous().view(torch.int32)


def magnitudes(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    """|τ| of a kind chosen to make ties: few distinct values, many zeros (from +0 and −0), or spread."""
    if kind == "spread":
        return torch.randn(shape, generator=generator).abs() * 10.0 ** torch.randint(-30, 3, shape, generator=generator)
    if kind == "few values":
        return torch.randint(0, 4, shape, generator=generator).float() * 0.25
    signed = torch.randn(shape, generator=generator)
    signed[torch.rand(shape, generator=generator) < 0.5] = 0.0
    signed[torch.rand(shape, generator=generator) < 0.25] = -0.0
    return signed.abs()


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("kind", ["spread", "few values", "zeros"])
def test_the_count_gives_kthvalues_value_at_every_rank(shape, kind):
    values = magnitudes(shape, kind, torch.Generator().manual_seed(len(shape) * 100 + shape[0]))
    flat = values.reshape(-1)
    ranks = sorted({1, 2, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()} & set(
        range(1, flat.numel() + 1)))
    for rank in ranks:
        assert kth_smallest_magnitude(values, rank) == float(torch.kthvalue(flat, rank).values), rank


def test_the_count_orders_subnormals_infinity_and_nan_as_kthvalue_does():
    values = torch.tensor([float("nan"), float("inf"), 1e-45, 0.0, 3.0, 1e-40, float("inf"), 2.0]).abs()
    for rank in range(1, values.numel() + 1):
        found, expected = kth_smallest_magnitude(values, rank), float(torch.kthvalue(values, rank).values)
        assert found == expected or (math.isnan(found) and math.isnan(expected)), rank
    with pytest.raises(ValueError, match="outside"):
        kth_smallest_magnitude(values, 0)


@pytest.mark.parametrize("shape", [(20000,), (300, 301)])  # above the size where kthvalue itself is used
@pytest.mark.parametrize("density", DENSITIES)
def test_the_per_tensor_threshold_is_kthvalues(shape, density):
    generator = torch.Generator().manual_seed(3)
    task_vector = torch.randint(-50, 51, shape, generator=generator).float() * 1e-3  # ties at every magnitude
    task_vector[: shape[0] // 4] = -0.0
    k = int(density * task_vector.numel())
    expected = (None if k == task_vector.numel() else float("inf") if k == 0
                else float(torch.kthvalue(task_vector.abs().reshape(-1), task_vector.numel() - k + 1).values))
    assert top_magnitude_threshold(task_vector, density) == expected


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, float("inf")])
def test_a_tensor_of_one_value_gives_that_value(value):
    # every entry in one bucket of the count (a source equal to the base makes a task vector of zeros)
    values = torch.full((20001,), value).abs()
    for rank in (1, 10000, 20001):
        assert kth_smallest_magnitude(values, rank) == float(torch.kthvalue(values, rank).values) == abs(value)


def literal_ties(base, sources, density, scale, sign="ties", drop_rate=None):
    """TIES (or DARE) by the rules above, one source's τ̂_i at a time, as hfmerge computed it before."""
    sparse = []
    for index, source in enumerate(sources):
        task_vector = source - base
        if drop_rate is not None:
            sparse.append(drop_and_rescale(task_vector, drop_rate, dare_generator(3, "k", index)))
            continue
        k = int(density * task_vector.numel())
        if k >= task_vector.numel():
            sparse.append(task_vector)
            continue
        threshold = (float("inf") if k == 0 else
                     float(torch.kthvalue(task_vector.abs().reshape(-1), task_vector.numel() - k + 1).values))
        sparse.append(torch.where(task_vector.abs() >= threshold, task_vector, 0.0))
    total = torch.zeros_like(base)
    for one in sparse:
        total.add_(one)
    if sign == "sum":
        return base + scale * total
    elected = torch.sign(total)
    agreeing_sum, agreeing_count = torch.zeros_like(base), torch.zeros_like(base)
    for one in sparse:
        agrees = (torch.sign(one) == elected) & (one != 0)
        agreeing_sum.add_(torch.where(agrees, one, 0.0))
        agreeing_count.add_(agrees.to(torch.float32))
    return base + scale * (agreeing_sum / agreeing_count.clamp(min=1.0))


def sources_of(shape, kind, generator):
    base = torch.randn(shape, generator=generator)
    sources = []
    for _ in range(5):
        if kind == "few values":  # task vectors of a few magnitudes: ties at the threshold
            source = base + torch.randint(-3, 4, shape, generator=generator).float() * 0.25
        else:
            source = base + torch.randn(shape, generator=generator) * 0.1
        flat = source.view(-1)
        if kind in ("zeros", "inf"):
            same = torch.rand(flat.shape, generator=generator) < 0.3
            flat[same] = base.view(-1)[same]  # τ = 0
            flat[0] = base.view(-1)[0] - 0.0
        if kind == "inf" and flat.numel() > 3:
            flat[1], flat[2] = float("inf"), -float("inf")
        sources.append(source)
    return base, sources


@pytest.mark.parametrize("shape", [(1,), (3, 1), (7, 5), (64, 48), (150, 151)])
@pytest.mark.parametrize("kind", ["spread", "few values", "zeros", "inf"])
def test_disjoint_merge_is_the_literal_rule_bit_for_bit(shape, kind):
    base, sources = sources_of(shape, kind, torch.Generator().manual_seed(shape[0]))
    tables = {"base": base, **{f"s{i}": s for i, s in enumerate(sources)}}

    def load(ref):
        return tables[ref]

    for count in (1, 2, 5):
        refs = tuple(f"s{i}" for i in range(count))
        for sign in ("ties", "sum"):
            for density in DENSITIES:
                merged = DisjointMerge("base", refs, 0.7, "trim", sign, density=density).apply(load)
                expected = literal_ties(base, sources[:count], density, 0.7, sign)
                assert torch.equal(bits(merged), bits(expected)), (count, sign, density)
            dropped = DisjointMerge("base", refs, 1.3, "drop", sign, drop_rate=0.6, seed=3, key="k").apply(load)
            expected = literal_ties(base, sources[:count], 1.0, 1.3, sign, drop_rate=0.6)
            assert torch.equal(bits(dropped), bits(expected)), (count, sign, "drop")


def test_whole_model_thresholds_given_to_the_op_trim_as_the_literal_rule():
    generator = torch.Generator().manual_seed(5)
    base, sources = sources_of((40, 30), "few values", generator)
    tables = {"base": base, **{f"s{i}": s for i, s in enumerate(sources)}}
    thresholds = (0.25, 0.5, 0.0, None, float("inf"))
    merged = DisjointMerge("base", tuple(tables)[1:], 1.0, "trim", thresholds=thresholds).apply(tables.__getitem__)
    sparse = [tau if t is None else torch.where(tau.abs() >= t, tau, 0.0) for tau, t in
              zip((s - base for s in sources), thresholds)]
    elected = torch.sign(sum(sparse, torch.zeros_like(base)))
    agrees = [(torch.sign(one) == elected) & (one != 0) for one in sparse]
    total = sum((torch.where(a, one, 0.0) for a, one in zip(agrees, sparse)), torch.zeros_like(base))
    count = sum((a.to(torch.float32) for a in agrees), torch.zeros_like(base))
    assert torch.equal(bits(merged), bits(base + 1.0 * (total / count.clamp(min=1.0))))
