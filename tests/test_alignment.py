"""OTFusion's per-layer alignment (hfmerge.methods.ot.alignment), against permutations and hand computations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hfmerge
from hfmerge.errors import TransportError
from hfmerge.methods.ot.alignment import (
    align_dim,
    align_layer,
    pairwise_cost,
    transport_plan,
    unit_features,
)


def _permutation(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation p (A's unit i is the anchor's unit p[i]) and its matrix P[i, p[i]] = 1."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix[torch.arange(n), perm] = 1.0
    assert not torch.equal(perm, torch.arange(n))  # a permutation that moves something
    return perm, matrix


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_align_layer_is_the_public_api():
    assert hfmerge.align_layer is align_layer
    assert issubclass(hfmerge.TransportError, ValueError)


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_emd_recovers_a_permuted_copy_exactly(cost):
    n = 8
    anchor = _random(n, 5, seed=1)
    perm, P = _permutation(n, seed=2)
    weight = anchor[perm]  # A's row i is the anchor's row perm[i]
    activations = None
    if cost == "activations":
        anchor_z = _random(30, n, seed=3)  # pre-activations over 30 samples
        activations = (unit_features(anchor_z[:, perm], dim=1), unit_features(anchor_z, dim=1))
    layer = align_layer(weight, anchor, activations=activations)
    assert layer.plan.dtype == layer.matrix.dtype == torch.float64
    assert torch.equal(layer.plan, P / n)
    assert torch.equal(layer.matrix, P)
    assert layer.aligned.dtype == torch.float32
    assert torch.equal(layer.aligned, anchor)


def test_whole_attention_heads_are_recovered():
    heads, head_dim, d = 3, 4, 6
    anchor = _random(heads * head_dim, d, seed=4)  # a query projection: rows grouped by head
    perm, P = _permutation(heads, seed=5)
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in perm.tolist()])
    weight = anchor[rows]
    layer = align_layer(weight, anchor, unit=head_dim)
    assert torch.equal(layer.matrix, P)
    assert torch.equal(layer.aligned, anchor)
    # activation-based: the heads' outputs over [samples, tokens, heads * head_dim]
    anchor_out = _random(5, 7, heads * head_dim, seed=6)
    features = unit_features(anchor_out[..., rows], dim=-1, unit=head_dim)
    assert features.shape == (heads, 5 * 7 * head_dim)
    layer = align_layer(weight, anchor, unit=head_dim, activations=(features, unit_features(anchor_out, -1, head_dim)))
    assert torch.equal(layer.matrix, P)


def test_align_dim_moves_whole_units():
    heads_a, heads_b, head_dim = 3, 2, 4
    out_proj = _random(6, heads_a * head_dim, seed=7).double()  # input dim 1 carries the heads
    M = torch.rand(heads_a, heads_b, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = torch.zeros(6, heads_b * head_dim, dtype=torch.float64)
    for j in range(heads_b):
        for u in range(head_dim):
            for a in range(heads_a):
                expected[:, j * head_dim + u] += M[a, j] * out_proj[:, a * head_dim + u]
    assert torch.allclose(align_dim(out_proj, M, dim=1, unit=head_dim), expected, rtol=0, atol=1e-12)


def test_align_dim_on_a_convolution_weight():
    conv = _random(5, 3, 2, 2, seed=9).double()
    M_out = torch.rand(5, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    M_in = torch.rand(3, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    out_aligned = align_dim(conv, M_out, dim=0)
    assert out_aligned.shape == (4, 3, 2, 2)
    assert torch.allclose(out_aligned, torch.einsum("oihw,ob->bihw", conv, M_out), rtol=0, atol=1e-12)
    in_aligned = align_dim(conv, M_in, dim=1)
    expected = torch.zeros(5, 2, 2, 2, dtype=torch.float64)
    for j in range(2):
        for i in range(3):
            expected[:, j] += M_in[i, j] * conv[:, i]
    assert torch.allclose(in_aligned, expected, rtol=0, atol=1e-12)
    assert align_dim(conv.float(), M_in, dim=1).dtype == torch.float32


def test_different_widths_take_the_anchors_width():
    weight, anchor = _random(6, 5, seed=12), _random(4, 5, seed=13)
    layer = align_layer(weight, anchor)
    assert torch.allclose(layer.plan.sum(dim=1), torch.full((6,), 1 / 6, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(layer.plan.sum(dim=0), torch.full((4,), 1 / 4, dtype=torch.float64), rtol=0, atol=1e-15)
    assert bool((layer.plan >= 0).all())
    assert torch.allclose(layer.matrix.sum(dim=0), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert layer.aligned.shape == (4, 5)
    # each aligned row is Mᵀ W: a convex combination of A's rows
    assert torch.allclose(layer.aligned.double(), layer.matrix.T @ weight.double(), rtol=0, atol=1e-6)
    assert layer.cost_before is None


def test_previous_alignment_carries_through_an_mlp():
    d, h1, h2, c = 5, 7, 6, 3
    w1, b1, w2, b2, w3, b3 = (_random(*shape, seed=20 + i) for i, shape in
                              enumerate([(h1, d), (h1,), (h2, h1), (h2,), (c, h2), (c,)]))
    p1, _ = _permutation(h1, seed=30)
    p2, _ = _permutation(h2, seed=31)
    # A: the same network with both hidden layers' neurons permuted
    a1, ab1, a2, ab2, a3 = w1[p1], b1[p1], w2[p2][:, p1], b2[p2], w3[:, p2]

    def mlp(x, layers):
        (v1, c1), (v2, c2), (v3, c3) = layers
        return torch.relu(torch.relu(x @ v1.T + c1) @ v2.T + c2) @ v3.T + c3

    first = align_layer(a1, w1)
    second = align_layer(a2, w2, previous=first.matrix)  # Ŵ = W_A M_prev, then aligned rows
    assert torch.equal(second.aligned, w2)
    aligned = [(first.aligned, align_dim(ab1, first.matrix, 0)), (second.aligned, align_dim(ab2, second.matrix, 0)),
               (align_dim(a3, second.matrix, 1), b3)]  # the classifier's output (labels) stays as it is
    x = _random(11, d, seed=40)
    assert torch.equal(mlp(x, aligned), mlp(x, [(w1, b1), (w2, b2), (w3, b3)]))
    # without the previous map the second layer's rows do not match the anchor's
    assert align_layer(a2, w2).cost_after > 0


def test_sinkhorn_approaches_emd_on_a_well_separated_cost():
    n = 6
    anchor = _random(n, 4, seed=50)
    perm, P = _permutation(n, seed=51)
    cost = pairwise_cost(anchor[perm] + 0.01 * _random(n, 4, seed=52), anchor)
    exact = transport_plan(cost)
    assert torch.equal(exact, P / n)
    entropic = transport_plan(cost, solver="sinkhorn", reg=0.01)
    assert entropic.dtype == torch.float64
    assert torch.allclose(entropic, exact, rtol=0, atol=1e-3 / n)


def test_sinkhorn_with_a_tiny_reg_refuses_with_advice():
    cost = 1000 * torch.rand(10, 10, generator=torch.Generator().manual_seed(60), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # POT's own warnings must not be the only signal, nor leak out
        with pytest.raises(TransportError, match=r"did not converge with reg=1e-06.*raise reg or use solver=emd"):
            transport_plan(cost, solver="sinkhorn", reg=1e-6)


def test_cost_before_and_after_a_permuted_copy():
    anchor = _random(8, 5, seed=70)
    perm, _ = _permutation(8, seed=71)
    layer = align_layer(anchor[perm], anchor)
    assert layer.cost_after == 0.0
    assert layer.cost_before > 0.0


def test_two_units_by_hand():
    weight = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    anchor = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # C = [[|(0,0)-(3,4)|, |(0,0)-(0,1)|], [|(3,4)-(3,4)|, |(3,4)-(0,1)|]] = [[5, 1], [0, √18]]
    layer = align_layer(weight, anchor)
    assert layer.cost_before == pytest.approx((5 + math.sqrt(18)) / 2, abs=1e-12)
    assert layer.cost_after == pytest.approx((1 + 0) / 2, abs=1e-12)  # the swap beats the identity's 5 + √18
    assert torch.equal(layer.plan, torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64))
    assert torch.equal(layer.aligned, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))


def test_two_units_nearest_the_same_anchor_unit_by_hand():
    # both of A's units are nearest the anchor's first; the plan still gives each unit one partner
    weight = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    anchor = torch.tensor([[0.0, 0.0], [0.0, 10.0]])
    # C = [[0, 10], [1, 9]]: the identity costs 0 + 9, the swap 10 + 1
    layer = align_layer(weight, anchor)
    assert torch.equal(layer.matrix, torch.eye(2, dtype=torch.float64))
    assert layer.cost_before == pytest.approx(4.5, abs=1e-12)
    assert layer.cost_after == pytest.approx(4.5, abs=1e-12)


def test_bad_problems_raise_transport_errors():
    with pytest.raises(TransportError, match="not finite"):
        transport_plan(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(TransportError, match="unknown transport solver"):
        transport_plan(torch.zeros(2, 2), solver="greedy")
    with pytest.raises(TransportError, match="previous="):
        align_layer(_random(4, 3, seed=80), _random(4, 5, seed=81))
