"""The maths of the data methods on hand-made tensors: RegMean's closed form and Fisher weighting."""

from __future__ import annotations

import logging

import pytest
import torch

from hfmerge.engine.statistics import pack_upper, unpack_gram
from hfmerge.methods.fisher import FisherWeighted
from hfmerge.methods.regmean import RegMeanGroup, RegMeanLinear, regmean_linear, regularise_packed


def _inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_regmean_linear_is_the_closed_form_least_squares_solution():
    """W minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² (α = 1): its gradient vanishes, written out in numpy terms by hand."""
    xs = [_inputs(50, 6, seed) for seed in (1, 2, 3)]
    ws = [torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64) for i in range(3)]
    grams = [x.T @ x for x in xs]
    merged = regmean_linear([w.float() for w in ws], [g.float() for g in grams], alpha=1.0).double()
    # normal equations: Σ_i X_iᵀ X_i Wᵀ = Σ_i X_iᵀ X_i W_iᵀ
    lhs = sum(x.T @ x @ merged.T for x in xs)
    rhs = sum(x.T @ x @ w.T for x, w in zip(xs, ws))
    assert torch.allclose(lhs, rhs, atol=1e-3, rtol=1e-5)
    # and it is the unique minimiser: any perturbation increases the loss
    loss = lambda w: sum(((x @ w.T - x @ wi.T) ** 2).sum() for x, wi in zip(xs, ws))  # noqa: E731
    assert loss(merged) < loss(merged + 1e-3 * torch.randn_like(merged))


def test_regmean_linear_alpha_scales_the_off_diagonal_entries():
    xs = [_inputs(30, 5, seed) for seed in (4, 5)]
    ws = [torch.randn(3, 5, generator=torch.Generator().manual_seed(20 + i)) for i in range(2)]
    grams = [x.T @ x for x in xs]
    alpha = 0.9
    tilde = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    expected = (torch.linalg.inv(sum(tilde)) @ sum(t @ w.double().T for t, w in zip(tilde, ws))).T
    got = regmean_linear(ws, grams, alpha)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_regmean_alpha_zero_is_a_diagonal_weighted_average():
    """With α = 0 each input feature k weighs source i by its G_i[k, k]: W[:, k] = Σ_i G_i[k,k] W_i[:, k] / Σ_i G_i[k,k]."""
    xs = [_inputs(20, 4, seed) for seed in (6, 7)]
    ws = [torch.randn(2, 4, generator=torch.Generator().manual_seed(30 + i)) for i in range(2)]
    diag = [torch.diag(x.T @ x) for x in xs]
    expected = sum(d * w.double() for d, w in zip(diag, ws)) / sum(diag)
    assert torch.allclose(regmean_linear(ws, [x.T @ x for x in xs], 0.0).double(), expected, atol=1e-6)


def test_regmean_of_identical_sources_is_the_source():
    x = _inputs(40, 6, 8)
    w = torch.randn(5, 6)
    assert torch.allclose(regmean_linear([w, w, w], [x.T @ x] * 3, 0.9), w, atol=1e-5)


def _hand_regmean(ws: list[torch.Tensor], xs: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 5 written out in float64: W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹ by ``torch.linalg.solve``."""
    grams = [x.T @ x for x in xs]
    scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    rhs = sum(g @ w.double().T for g, w in zip(scaled, ws))
    return torch.linalg.solve(sum(scaled), rhs).T


def test_regmean_singular_gram_is_regularised_with_a_warning_never_nan(caplog):
    """Collinear features (α = 1, fewer rows than features) make Σ G_i singular: a ridge and a warning."""
    x = _inputs(4, 6, 9)
    ws = [torch.randn(3, 6), torch.randn(3, 6)]
    with caplog.at_level(logging.WARNING, logger="hfmerge"):
        merged = regmean_linear(ws, [x.T @ x, x.T @ x], alpha=1.0)
    assert torch.isfinite(merged).all()
    assert "singular" in caplog.text and "ridge" in caplog.text


def test_features_no_sample_excited_are_averaged_and_the_rest_solved_exactly(caplog):
    """A feature zero in every source's inputs: its weights are the average; the others are Eq. 5 without it."""
    xs = [_inputs(30, 6, seed) for seed in (51, 52, 53)]
    for x in xs:
        x[:, 2] = 0.0
    ws = [torch.randn(4, 6, generator=torch.Generator().manual_seed(70 + i)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="hfmerge"):
        merged = regmean_linear(ws, [x.T @ x for x in xs], alpha=0.9)
    assert "1 of the 6 input features" in caplog.text and "ridge" not in caplog.text
    torch.testing.assert_close(merged[:, 2], torch.stack(ws).mean(0)[:, 2], rtol=0, atol=1e-7)
    alive = [0, 1, 3, 4, 5]
    expected = _hand_regmean([w[:, alive] for w in ws], [x[:, alive] for x in xs], 0.9)
    torch.testing.assert_close(merged[:, alive].double(), expected, rtol=1e-6, atol=1e-7)


def _group(modules: tuple[str, ...], xs: list[torch.Tensor], ws: dict[str, list[torch.Tensor]], alpha: float):
    """A RegMeanGroup over hand-made tables: sources 0..N-1 hold the weights, N..2N-1 the packed Grams."""
    n = len(xs)
    tables = {(i, f"{m}.weight"): ws[m][i] for m in modules for i in range(n)}
    tables |= {(n + i, "gram_upper/m"): pack_upper(x.T @ x) for i, x in enumerate(xs)}
    refs = {m: tuple((i, f"{m}.weight") for i in range(n)) for m in modules}
    return RegMeanGroup(modules, refs, tuple((n + i, "gram_upper/m") for i in range(n)), alpha), tables


def test_regmean_op_streams_sources_and_matches_the_pure_function():
    xs = [_inputs(25, 4, seed) for seed in (11, 12, 13)]
    ws = [torch.randn(3, 4, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]
    solver, tables = _group(("m",), xs, {"m": ws}, 0.9)
    op = RegMeanLinear(solver, "m")
    torch.testing.assert_close(op.apply(tables.__getitem__).double(), _hand_regmean(ws, xs, 0.9), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.9, 1.0, 0.0])
def test_a_shared_input_group_is_each_linear_solved_alone(alpha):
    """q, k and v share one Gram: solved together (one factorisation, W_0 + a correction) = each by Eq. 5 alone."""
    xs = [_inputs(40, 7, seed) for seed in (21, 22, 23, 24)]
    shapes = {"q": (7, 7), "k": (7, 7), "v": (5, 7)}
    ws = {m: [torch.randn(*shape, generator=torch.Generator().manual_seed(60 + 4 * j + i)) for i in range(4)]
          for j, (m, shape) in enumerate(shapes.items())}
    solver, tables = _group(tuple(shapes), xs, ws, alpha)
    loads = []
    load = lambda ref: loads.append(ref) or tables[ref]  # noqa: E731
    for m in ("v", "q", "k"):  # any order: the first asked solves the group
        got = RegMeanLinear(solver, m).apply(load)
        assert got.dtype == torch.float32 and got.shape == shapes[m]
        torch.testing.assert_close(got.double(), _hand_regmean(ws[m], xs, alpha), rtol=1e-5, atol=1e-6)
    assert sum(ref[1] == "gram_upper/m" for ref in loads) == 2 * len(xs) - 1  # one solve for the three
    assert RegMeanLinear(solver, "q").apply(load).shape == (7, 7)  # asked again: solved again


def test_identical_sources_merge_to_themselves_bit_for_bit():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    xs = [_inputs(30, 5, seed) for seed in (31, 32, 33)]
    solver, tables = _group(("m",), xs, {"m": [w.clone(), w.clone(), w.clone()]}, 0.9)
    assert torch.equal(RegMeanLinear(solver, "m").apply(tables.__getitem__), w)


def test_packed_regularisation_is_the_full_one_packed():
    x = _inputs(20, 9, 41)
    gram = x.T @ x
    expected = 0.7 * gram + 0.3 * torch.diag(torch.diagonal(gram))
    packed = pack_upper(gram)
    got = regularise_packed(packed, 0.7)
    torch.testing.assert_close(unpack_gram(got), expected, rtol=1e-15, atol=1e-12)
    assert torch.equal(packed, pack_upper(gram))  # the input is left alone


def test_fisher_weighted_is_the_fisher_weighted_mean():
    thetas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, -1.0])]
    fisher_sums = [torch.tensor([2.0, 0.0, 8.0], dtype=torch.float64), torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64)]
    counts = [torch.tensor(2), torch.tensor(3)]  # mean Fisher: [1, 0, 4] and [2, 0, 0]
    tables = {(0, "t"): thetas[0], (1, "t"): thetas[1], (2, "f"): fisher_sums[0], (3, "f"): fisher_sums[1],
              (2, "n"): counts[0], (3, "n"): counts[1]}
    op = FisherWeighted(((0, "t"), (1, "t")), ((2, "f"), (3, "f")), ((2, "n"), (3, "n")), (0.5, 0.5), epsilon=1e-8)
    got = op.apply(tables.__getitem__)
    # entry 0: (1·1 + 2·3) / 3; entry 1: no information → plain average; entry 2: only source 0 informs it
    expected = torch.tensor([7.0 / 3.0, 4.0, 3.0])
    assert torch.allclose(got, expected, atol=1e-5)


def test_fisher_with_one_source_is_that_source_exactly():
    theta = torch.randn(7, 5)
    tables = {(0, "t"): theta, (1, "f"): torch.rand(7, 5, dtype=torch.float64), (1, "n"): torch.tensor(4)}
    op = FisherWeighted(((0, "t"),), ((1, "f"),), ((1, "n"),), (1.0,))
    assert torch.equal(op.apply(tables.__getitem__), theta)


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"grams": []}])
def test_regmean_linear_refuses_bad_arguments(bad):
    w = torch.randn(2, 3)
    kwargs = {"weights": [w], "grams": [torch.eye(3)], "alpha": 0.5} | bad
    with pytest.raises(ValueError):
        regmean_linear(**kwargs)
