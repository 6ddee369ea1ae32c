"""Cross-layer alignment (CLAFusion §3.1): which layer of the deeper network each layer of the shallower one matches.

Nguyen et al., "On Cross-Layer Alignment for Model Fusion of Heterogeneous
Neural Networks" (``clafusion.txt``). Two networks of one family but different
depth cannot be fused layer by layer until each hidden layer of the shallower
network B has a partner in the deeper network A. Definition 1 asks for the
strictly increasing map a: [n] → [m] with a(1) = 1 and a(n) = m that minimises
Σᵢ C[a(i), i], where C[j, i] is the dissimilarity of A's layer j and B's layer i:
1 − linear CKA of their pre-activations on the same samples (Eq. 2–3), or the
squared difference of their widths. Algorithm 1 solves it by dynamic
programming in O(mn).

Everything here is pure maths on tensors; indices are 0-based (the paper's are 1-based).
"""

from __future__ import annotations

import math

import torch

__all__ = ["cross_layer_alignment", "linear_cka", "cka_costs", "width_costs"]


def cross_layer_alignment(cost: torch.Tensor | list[list[float]], *, first_last: bool = True) -> list[int]:
    """The optimal cross-layer alignment of Definition 1, by the dynamic programming of Algorithm 1.

    Args:
        cost: an m × n array: ``cost[j][i]`` is the dissimilarity of the deeper model's hidden layer j
            and the shallower model's hidden layer i (m ≥ n ≥ 1).
        first_last: keep the paper's two constraints, a(0) = 0 and a(n−1) = m−1 (the first and last
            hidden layers match each other); for n = 1 only the first holds, as the paper prioritises
            the first layer. ``False`` drops both (Appendix C's ablation).

    The two constraints are imposed inside the dynamic programming (the layers between the first and
    last are aligned among A's layers between them): Algorithm 1's pseudo-code fills S without them and
    sets a(1) and a(n) afterwards, which can leave a map that is not the optimum of Definition 1, and
    for n = 1 would overwrite a(1) with m, against the text's priority for the first layer.

    Returns:
        a(0..n−1): 0-based indices into the deeper model's layers, strictly increasing, minimising
        Σᵢ cost[a(i), i] under the constraints. Ties are broken as the paper's backtracking does: from
        the last layer back, a layer of B takes the earliest layer of A that keeps the minimum.

    Raises:
        ValueError: cost is not two-dimensional, has m < n or no column, or holds NaN.
    """
    c = torch.as_tensor(cost, dtype=torch.float64)
    if c.dim() != 2 or c.shape[1] == 0:
        raise ValueError(f"the cost must be an m x n matrix with n >= 1, not of shape {list(c.shape)}")
    m, n = c.shape
    if m < n:
        raise ValueError(f"the cost's rows are the deeper model's layers: m = {m} < n = {n}; transpose it")
    if torch.isnan(c).any():
        raise ValueError("the cost holds NaN")
    if first_last:
        if n == 1:
            return [0]
        # a(0) = 0 and a(n-1) = m-1 are fixed; the layers between align within A's layers 1..m-2
        inner = _align(c[1:m - 1, 1:n - 1]) if n > 2 else []
        return [0, *(j + 1 for j in inner), m - 1]
    return _align(c)


def _align(c: torch.Tensor) -> list[int]:
    """The unconstrained strictly increasing map of the n columns into the m rows with the least total cost.

    S[i][j] is the least cost of mapping B's first i layers into A's first j (Algorithm 1):
    S[i][j] = min(S[i][j−1], S[i−1][j−1] + C[j−1, i−1]) for j > i, and S[i][i] = Σ_{l≤i} C[l−1, l−1].
    Backtracking from S[n][m] skips A's layer j while S[i][j] = S[i][j−1].
    """
    m, n = c.shape
    if n == 0:
        return []
    values = c.tolist()
    s = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        s[i][i] = s[i - 1][i - 1] + values[i - 1][i - 1]
        for j in range(i + 1, m + 1):
            s[i][j] = min(s[i][j - 1], s[i - 1][j - 1] + values[j - 1][i - 1])
    out = [0] * n
    j = m
    for i in range(n, 0, -1):
        while j > i and s[i][j] == s[i][j - 1]:
            j -= 1
        out[i - 1] = j - 1
        j -= 1
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same t samples (Eq. 2): ‖ŶᵀX̂‖²_F / (‖X̂ᵀX̂‖_F ‖ŶᵀŶ‖_F).

    ``x`` is t × p_A and ``y`` t × p_B (rows: samples; a convolution's map flattened per sample);
    X̂ and Ŷ are centred over the samples. Invariant to orthogonal transforms and isotropic scaling
    of either side, so two layers of different widths and neuron orders compare. In float64; the
    Gram form ⟨X̂X̂ᵀ, ŶŶᵀ⟩ is used when the features outnumber the samples (same value, t × t products).
    0 when either side is constant over the samples.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same samples: {x.shape[0]} rows against {y.shape[0]}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if max(x.shape[1], y.shape[1]) > x.shape[0]:
        kx, ky = x @ x.T, y @ y.T
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, nx, ny = (y.T @ x).norm() ** 2, (x.T @ x).norm(), (y.T @ y).norm()
    denominator = float(nx * ny)
    if denominator == 0.0 or not math.isfinite(denominator):
        return 0.0
    return float(cross) / denominator


def cka_costs(deeper: list[torch.Tensor], shallower: list[torch.Tensor]) -> torch.Tensor:
    """The m × n cost 1 − linear CKA (Eq. 3) between each deeper layer's and each shallower layer's representation."""
    return torch.tensor([[1.0 - linear_cka(a, b) for b in shallower] for a in deeper], dtype=torch.float64)


def width_costs(deeper: list[int], shallower: list[int]) -> torch.Tensor:
    """The m × n cost (p_A − p_B)² between layer widths: the paper's toy representation (Figure 2)."""
    return torch.tensor([[float((a - b) ** 2) for b in shallower] for a in deeper], dtype=torch.float64)
