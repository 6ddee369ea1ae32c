"""Model Stock against a hand computation of its interpolation, in float64.

Jang et al., ECCV 2024, §3: θ = t·θ̄ + (1 − t)·θ_base with t = k·cos θ / (1 + (k − 1)·cos θ), θ̄ the average of the
k fine-tuned models; per tensor as mergekit computes it, cos θ the mean over pairs of ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6)
clamped to [−1, 1], τᵢ = θᵢ − θ_base. BatchNorm running statistics are averaged, integer buffers are the first source's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.testing.tiny import tiny_model


def load_model(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def model_stock_by_hand(base, tasks):
    """(θ, t) for one tensor, in float64."""
    base = base.double()
    taus = [(task.double() - base).flatten() for task in tasks]
    cosines = [
        max(-1.0, min(1.0, float(taus[i] @ taus[j]) / max(float(taus[i].norm() * taus[j].norm()), 1e-6)))
        for i in range(len(taus)) for j in range(i + 1, len(taus))
    ]
    c, k = sum(cosines) / len(cosines), len(tasks)
    t = k * c / (1 + (k - 1) * c)
    average = sum(task.double() for task in tasks) / k
    return t * average + (1 - t) * base, t


def is_statistic(name):
    return name.endswith(("running_mean", "running_var"))


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_model_stock_matches_the_formula_on_every_tensor(family, make_source, tmp_path):
    base = make_source(family, seed=0)
    tasks = [make_source(family, seed=s) for s in (1, 2, 3)]
    out = hfmerge.merge([str(t) for t in tasks], method="model_stock", base=str(base), progress=False).save(
        tmp_path / "out")
    merged = load_model(out).state_dict()
    sb, states = load_model(base).state_dict(), [load_model(t).state_dict() for t in tasks]
    assert set(merged) == set(sb)
    ratios = []
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, states[0][name]), name
        elif is_statistic(name):
            torch.testing.assert_close(value, sum(s[name] for s in states) / 3, rtol=0, atol=1e-6, msg=name)
        else:
            expected, t = model_stock_by_hand(sb[name], [s[name] for s in states])
            ratios.append(t)
            # the cosines are taken in float64; the tensors come in and go out in float32
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
    # independent random draws: τᵢ = θᵢ − θ_base share −θ_base, so cos ≈ 1/2 and t ≈ 3·½/(1 + 2·½) = 3/4 (less
    # closely in a 3-entry bias); tensors every model initialises alike (norms' ones and zeros) have zero task
    # vectors, cos = 0 and t = 0
    moved = [t for t in ratios if t != 0.0]
    assert len(set(moved)) > 5 and all(0.5 < t < 1.0 for t in moved) and len(moved) < len(ratios)


def with_task_vectors(base_model, directions):
    """A copy of ``base_model`` plus ``directions[name]`` on each float tensor that is not a BatchNorm statistic."""
    model = tiny_model("vit", seed=0)
    model.load_state_dict(base_model.state_dict())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(directions[name].to(parameter.dtype))
    return model


@pytest.mark.parametrize(("angle", "expected_t"), [(math.pi / 2, 0.0), (0.0, 1.0), (math.pi / 3, 2 / 3)])
def test_two_task_vectors_at_a_known_angle_give_the_papers_t(angle, expected_t, make_source, tmp_path):
    """k = 2: orthogonal task vectors give t = 0 (the base), identical ones t = 1 (their average), 60° t = 2/3."""
    base_model = tiny_model("vit", seed=0)
    generator = torch.Generator().manual_seed(0)
    first, second = {}, {}
    for name, parameter in base_model.named_parameters():
        u, r = torch.randn(2, parameter.numel(), generator=generator, dtype=torch.float64)
        u, r = u / u.norm(), r - (r @ u) / (u @ u) * u
        r = r / r.norm()
        first[name] = (0.1 * u).reshape(parameter.shape)
        second[name] = (0.1 * (math.cos(angle) * u + math.sin(angle) * r)).reshape(parameter.shape)
    base = make_source("vit", model=base_model)
    sources = [make_source("vit", model=with_task_vectors(base_model, d)) for d in (first, second)]
    out = hfmerge.merge([str(s) for s in sources], method="model_stock", base=str(base), progress=False).save(
        tmp_path / "out")
    merged = load_model(out).state_dict()
    sb, states = base_model.state_dict(), [load_model(s).state_dict() for s in sources]
    for name, value in merged.items():
        expected = sb[name].double() + expected_t * (states[0][name].double() + states[1][name].double()
                                                     - 2 * sb[name].double()) / 2
        # the task vectors' float32 rounding moves cos θ by ~1e-7, and t with it
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
        assert model_stock_by_hand(sb[name], [s[name] for s in states])[1] == pytest.approx(expected_t, abs=1e-5)


def test_a_source_equal_to_the_base_has_cosine_zero_and_gives_no_nan(make_source, tmp_path):
    base, task = make_source("resnet", seed=0), make_source("resnet", seed=1)
    out = hfmerge.merge([str(base), str(task)], method="model_stock", base=str(base), progress=False).save(
        tmp_path / "out")
    sb = load_model(base).state_dict()
    for name, value in load_model(out).state_dict().items():
        if value.dtype.is_floating_point and not is_statistic(name):
            assert torch.equal(value, sb[name]), name  # c = 0 → t = 0 → exactly θ_base


def test_one_source_is_refused_in_one_line(make_source, tmp_path, capsys):
    base, task = make_source("vit", seed=0), make_source("vit", seed=1)
    code, _, err = run_cli(["merge", task, "-m", "model_stock", "--base", base, "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "model_stock", "at least 2 sources")
    assert not (tmp_path / "out").exists()


def test_model_stock_by_repo_id_on_the_hub_and_through_the_cli(publish, tmp_path, capsys):
    for name, seed in (("base", 30), ("a", 31), ("b", 32)):
        publish(f"org/stock-{name}", family="resnet", seed=seed)
    out = tmp_path / "cli"
    code, _, err = run_cli(["merge", "org/stock-a", "org/stock-b", "-m", "model_stock", "--base", "org/stock-base",
                            "-o", out, "-q"], capsys)
    assert code == 0, err
    sb = hfmerge.load("org/stock-base").state_dict()
    states = [hfmerge.load(f"org/stock-{n}").state_dict() for n in "ab"]
    for name, value in load_model(out).state_dict().items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, states[0][name]), name
        elif is_statistic(name):
            torch.testing.assert_close(value, (states[0][name] + states[1][name]) / 2, rtol=0, atol=1e-6, msg=name)
        else:
            expected, _ = model_stock_by_hand(sb[name], [s[name] for s in states])
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
    card = (out / "README.md").read_text()
    assert "t = k·c / (1 + (k − 1)·c)" in card and "k = 2" in card and "arxiv.org/abs/2403.19522" in card
