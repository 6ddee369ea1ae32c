"""OTFusion against an independent implementation of the paper's Algorithm 1 (Singh & Jaggi 2020).

The reference below is written from the paper, with numpy and POT, for an MLP
of two hidden ReLU layers: for each layer l, the incoming weights of model A are
first aligned with the previous layer's transport, Ŵ = W_A T_{l-1} diag(1/β_{l-1});
the ground cost between A's and B's neurons is the Euclidean distance between
their incoming weights (and biases) — or, activation-based, between their
pre-activations on the same images; T_l is the exact optimal transport between
uniform measures; A's layer becomes diag(1/β_l) T_lᵀ Ŵ, and the fused layer is
the mean of that and B's. hfmerge's merge must give the same tensors.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
from test_every_method import random_images

import hfmerge
from hfmerge.testing.tiny import IMAGE_SIZE, save_tiny


def _state(folder):
    return {k: v.double().numpy() for k, v in hfmerge.load(str(folder)).state_dict().items()}


def _cdist(x, y):
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))


def _pre_activations(state, pixels):
    """Each hidden layer's pre-activations, [samples, neurons], computed by hand from the weights."""
    hidden = pixels.reshape(len(pixels), -1)
    out = []
    for i in range(2):
        pre = hidden @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        out.append(pre)
        hidden = np.maximum(pre, 0.0)
    return out


def _reference(a, b, activations=None):
    """Algorithm 1 for the two hidden layers and the classifier; A aligned onto B, then averaged."""
    fused = {}
    previous = None  # T_{l-1} diag(1/β_{l-1}): the last layer's alignment matrix
    for i in range(2):
        w, bias = a[f"layers.{i}.weight"], a[f"layers.{i}.bias"]
        if previous is not None:
            w = w @ previous
        if activations is None:
            cost = _cdist(np.concatenate([w, bias[:, None]], 1),
                          np.concatenate([b[f"layers.{i}.weight"], b[f"layers.{i}.bias"][:, None]], 1))
        else:
            cost = _cdist(activations[0][i].T, activations[1][i].T)
        n_a, n_b = cost.shape
        plan = ot.emd(np.full(n_a, 1 / n_a), np.full(n_b, 1 / n_b), cost)
        beta = plan.sum(0)
        matrix = plan / beta  # T diag(1/β)
        fused[f"layers.{i}.weight"] = (matrix.T @ w + b[f"layers.{i}.weight"]) / 2
        fused[f"layers.{i}.bias"] = (matrix.T @ bias + b[f"layers.{i}.bias"]) / 2
        previous = matrix
    fused["classifier.weight"] = (a["classifier.weight"] @ previous + b["classifier.weight"]) / 2
    fused["classifier.bias"] = (a["classifier.bias"] + b["classifier.bias"]) / 2
    return fused


def test_weight_based_otfusion_is_algorithm_1(tmp_path):
    anchor = save_tiny(tmp_path / "b", "mlp", 3, seed=1)
    other = save_tiny(tmp_path / "a", "mlp", 3, seed=2)
    result = hfmerge.merge([str(anchor), str(other)], method="otfusion", cost="weights", progress=False)
    merged = _state(result.save(tmp_path / "out"))
    expected = _reference(_state(other), _state(anchor))
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name], value, atol=1e-5, err_msg=name)


def test_activation_based_otfusion_is_algorithm_1_on_the_same_images(tmp_path):
    from transformers import AutoImageProcessor

    anchor = save_tiny(tmp_path / "b", "mlp", 3, seed=3)
    other = save_tiny(tmp_path / "a", "mlp", 3, seed=4)
    images = random_images(tmp_path / "images", count=12, size=IMAGE_SIZE["mlp"])
    result = hfmerge.merge([str(anchor), str(other)], method="otfusion", data=[str(images)], samples=12,
                           progress=False)
    merged = _state(result.save(tmp_path / "out"))
    from PIL import Image

    processor = AutoImageProcessor.from_pretrained(anchor)
    pictures = [Image.open(path).convert("RGB") for path in sorted(images.iterdir())]
    pixels = processor(pictures, return_tensors="pt")["pixel_values"].double().numpy()
    a, b = _state(other), _state(anchor)
    expected = _reference(a, b, activations=(_pre_activations(a, pixels), _pre_activations(b, pixels)))
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name], value, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_the_transport_maps_of_different_seeds_are_not_the_identity(cost, tmp_path):
    """The check above is not vacuous: the two models' neurons are matched in another order than their indices."""
    anchor = save_tiny(tmp_path / "b", "mlp", 3, seed=1)
    other = save_tiny(tmp_path / "a", "mlp", 3, seed=2)
    images = random_images(tmp_path / "images", count=12, size=IMAGE_SIZE["mlp"])
    extra = {"data": [str(images)], "samples": 12} if cost == "activations" else {}
    result = hfmerge.merge([str(anchor), str(other)], method="otfusion", cost=cost, progress=False, **extra)
    aligned = _state(result.save(tmp_path / "out"))
    plain = {k: (v + _state(anchor)[k]) / 2 for k, v in _state(other).items()}
    assert not np.allclose(aligned["layers.0.weight"], plain["layers.0.weight"])
