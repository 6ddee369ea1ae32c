"""SLERP of two models against a hand computation of spherical interpolation, in float64.

slerp(t; v₀, v₁) = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁, cos Ω = ⟨v₀, v₁⟩/(‖v₀‖‖v₁‖), each tensor one
vector; with mergekit's conventions: linear interpolation where |cos Ω| > 0.9995, no normalisation of a tensor
of norm ≤ 1e-8. BatchNorm running statistics interpolate linearly, integer buffers are the first source's.
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


def slerp_by_hand(t, a, b):
    """(value, whether it took the linear path), in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    ua = a / a.norm() if a.norm() > 1e-8 else a
    ub = b / b.norm() if b.norm() > 1e-8 else b
    cos = float(ua @ ub)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b, True
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega), False


def is_statistic(name):
    return name.endswith(("running_mean", "running_var"))


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_slerp_matches_the_formula_on_every_tensor(family, make_source, tmp_path):
    first, second = make_source(family, seed=1), make_source(family, seed=2)
    result = hfmerge.merge([str(first), str(second)], method="slerp", parameters={"t": 0.3}, progress=False)
    merged = load_model(result.save(tmp_path / "out")).state_dict()
    s1, s2 = load_model(first).state_dict(), load_model(second).state_dict()
    assert set(merged) == set(s1)
    paths = {True: 0, False: 0}
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, s1[name]), name
        elif is_statistic(name):
            torch.testing.assert_close(value.double(), 0.7 * s1[name].double() + 0.3 * s2[name].double(),
                                       rtol=0, atol=1e-6, msg=name)
        else:
            expected, linear = slerp_by_hand(0.3, s1[name], s2[name])
            paths[linear] += 1
            # computed in float64 and saved in float32: the saved weight's rounding is what is left
            torch.testing.assert_close(value.double().flatten(), expected, rtol=0, atol=1e-6, msg=name)
    # random weights are nearly orthogonal (the arc); norms initialised to ones are parallel (the line)
    assert paths[False] > 10 and paths[True] > 0


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_t_zero_is_the_first_source_and_t_one_the_second_exactly(family, make_source, tmp_path):
    first, second = make_source(family, seed=1), make_source(family, seed=2)
    s1, s2 = load_model(first).state_dict(), load_model(second).state_dict()
    for t, expected in ((0.0, s1), (1.0, s2)):
        out = hfmerge.merge([str(first), str(second)], method="slerp", parameters={"t": t},
                            progress=False).save(tmp_path / f"t{t}")
        for name, value in load_model(out).state_dict().items():
            if value.dtype.is_floating_point:  # integer buffers are the first source's at any t
                assert torch.equal(value, expected[name]), (t, name)


def test_on_unit_vectors_slerp_stays_on_the_sphere_at_the_angle_t_omega():
    from hfmerge.methods.slerp import slerp

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 50, generator=generator, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    omega = math.acos(float(a @ b))
    for t in (0.0, 0.1, 0.25, 0.5, 0.8, 1.0):
        point = slerp(t, a, b)
        assert abs(float(point.norm()) - 1.0) < 1e-12, t
        assert abs(math.acos(min(1.0, float(point @ a))) - t * omega) < 1e-7, t
        assert abs(math.acos(min(1.0, float(point @ b))) - (1 - t) * omega) < 1e-7, t
    # the linear path would leave the sphere: at t = 0.5 its norm is cos(Ω/2)
    assert abs(float(torch.lerp(a, b, 0.5).norm()) - math.cos(omega / 2)) < 1e-12


def test_nearly_parallel_tensors_are_interpolated_linearly():
    from hfmerge.methods.slerp import slerp

    generator = torch.Generator().manual_seed(1)
    a = torch.randn(40, generator=generator, dtype=torch.float64)
    noise = torch.randn(40, generator=generator, dtype=torch.float64)
    noise -= (noise @ a) / (a @ a) * a  # orthogonal to a
    for angle, linear in ((0.02, True), (0.04, False), (math.pi, True)):  # cos 0.9998, 0.9992; antiparallel
        b = 3.0 * (math.cos(angle) * a / a.norm() + math.sin(angle) * noise / noise.norm())
        expected, took_line = slerp_by_hand(0.4, a, b)
        assert took_line is linear
        torch.testing.assert_close(slerp(0.4, a, b), expected, rtol=0, atol=1e-12)
    assert torch.equal(slerp(0.4, a, 2 * a), torch.lerp(a, 2 * a, 0.4))


def test_a_scaled_copy_takes_the_linear_path_in_a_merge(make_source, tmp_path):
    model = tiny_model("vit", seed=1)
    first = make_source("vit", model=model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    second = make_source("vit", model=model)
    out = hfmerge.merge([str(first), str(second)], method="slerp", parameters={"t": 0.25},
                        progress=False).save(tmp_path / "out")
    s1 = load_model(first).state_dict()
    for name, value in load_model(out).state_dict().items():
        torch.testing.assert_close(value, 1.25 * s1[name], rtol=0, atol=1e-6, msg=name)


def test_three_sources_are_refused_in_one_line_and_nothing_is_written(make_source, tmp_path, capsys):
    sources = [make_source("vit", seed=s) for s in (1, 2, 3)]
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *sources, "-m", "slerp", "-o", out], capsys)
    assert_one_line_error(code, err, "slerp", "at most 2 sources, got 3")
    code, _, err = run_cli(["merge", sources[0], "-m", "slerp", "-o", out], capsys)
    assert_one_line_error(code, err, "slerp", "at least 2 sources")
    assert not out.exists()


def test_different_label_sets_concatenate_the_heads_and_interpolate_the_backbone(make_source, tmp_path):
    first = make_source("vit", 3, seed=1, labels=["cat", "dog", "owl"])
    second = make_source("vit", 2, seed=2, labels=["car", "bus"])
    result = hfmerge.merge([str(first), str(second)], method="slerp", progress=False)
    merged = load_model(result.save(tmp_path / "out"))
    s1, s2, sm = load_model(first).state_dict(), load_model(second).state_dict(), merged.state_dict()
    assert merged.config.id2label == {0: "cat", 1: "dog", 2: "owl", 3: "car", 4: "bus"}
    for name, value in sm.items():
        if name.startswith("classifier."):
            assert torch.equal(value, torch.cat([s1[name], s2[name]])), name
        else:
            torch.testing.assert_close(value.double().flatten(), slerp_by_hand(0.5, s1[name], s2[name])[0],
                                       rtol=0, atol=1e-6, msg=name)
    assert result.details["heads"] == "concat"
    with pytest.raises(hfmerge.IncompatibleModelsError, match="--heads average needs one label set"):
        hfmerge.merge([str(first), str(second)], method="slerp", heads="average", progress=False)


def test_slerp_by_repo_id_on_the_hub_and_through_the_cli(publish, tmp_path, capsys):
    publish("org/slerp-a", family="resnet", seed=11)
    publish("org/slerp-b", family="resnet", seed=12)
    out = tmp_path / "cli"
    code, _, err = run_cli(["merge", "org/slerp-a", "org/slerp-b", "-m", "slerp", "--param", "t=0.6", "-o", out,
                            "-q"], capsys)
    assert code == 0, err
    sa, sb = hfmerge.load("org/slerp-a").state_dict(), hfmerge.load("org/slerp-b").state_dict()
    merged = load_model(out).state_dict()
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, sa[name]), name
        elif is_statistic(name):
            torch.testing.assert_close(value.double(), 0.4 * sa[name].double() + 0.6 * sb[name].double(),
                                       rtol=0, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(value.double().flatten(), slerp_by_hand(0.6, sa[name], sb[name])[0],
                                       rtol=0, atol=1e-6, msg=name)
    card = (out / "README.md").read_text()
    assert "t = 0.6" in card and "0.9995" in card and "org/slerp-a" in card
