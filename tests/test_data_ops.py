"""The maths of the data methods on hand-made tensors: RegMean's closed form and Fisher weighting."""

from __future__ import annotations

import logging

import pytest
import torch

from hfmerge.methods.fisher import FisherWeighted
from hfmerge.methods.regmean import RegMeanLinear, regmean_linear


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


def test_regmean_singular_gram_is_regularised_with_a_warning_never_nan(caplog):
    x = _inputs(10, 6, 9)
    x[:, 2] = 0.0  # a feature no sample excites: every Gram matrix is singular
    ws = [torch.randn(3, 6), torch.randn(3, 6)]
    with caplog.at_level(logging.WARNING, logger="hfmerge"):
        merged = regmean_linear(ws, [x.T @ x, x.T @ x], alpha=1.0)
    assert torch.isfinite(merged).all()
    assert "singular" in caplog.text and "ridge" in caplog.text


def test_regmean_op_streams_sources_and_matches_the_pure_function():
    xs = [_inputs(25, 4, seed) for seed in (11, 12, 13)]
    ws = [torch.randn(3, 4, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]
    tables = {(i, "w"): w for i, w in enumerate(ws)} | {(3 + i, "gram/m"): x.T @ x for i, x in enumerate(xs)}
    op = RegMeanLinear(((0, "w"), (1, "w"), (2, "w")), ((3, "gram/m"), (4, "gram/m"), (5, "gram/m")), 0.9)
    assert torch.allclose(op.apply(tables.__getitem__), regmean_linear(ws, [x.T @ x for x in xs], 0.9), atol=1e-6)


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
