"""Task-vector methods (task_arithmetic, ties, dare) against hand computations on in-memory state dicts.

Expected values are computed here, whole tensor by whole tensor, from the
models loaded with plain transformers; the merged outputs are loaded the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from helpers import run_cli
from safetensors.torch import load_file

import hfmerge
from hfmerge.adapters import registered_families
from hfmerge.testing.tiny import IMAGE_SIZE, tiny_config


def _headless() -> dict[str, tuple[str, str]]:
    """Tiny model -> (its family's headless backbone class, that backbone's prefix in the tiny model), for every tiny
    model with a head whose family declares one backbone class (task ``image-feature-extraction``), from the registry."""
    table = {}
    for adapter in registered_families():
        backbones = [a for a, task in adapter.architectures.items() if task == "image-feature-extraction"]
        for name, variant in adapter.tiny.items():
            if len(backbones) == 1 and adapter.heads.get(variant.config()[1]):
                table[name] = (backbones[0], adapter.backbone_prefix)
    return table


HEADLESS = _headless()


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def headless_base(family, seed=0):
    cls, _ = HEADLESS[family]
    config = tiny_config(family)
    config.architectures = [cls]
    torch.manual_seed(seed)
    return getattr(transformers, cls)(config).eval()


def is_running_statistic(name):
    return name.endswith(("running_mean", "running_var"))


@pytest.mark.parametrize("family", sorted(HEADLESS))
def test_task_arithmetic_with_a_headless_base_adds_task_vectors_to_the_backbone(family, make_source, tmp_path):
    base = make_source(family, model=headless_base(family))
    t1, t2 = make_source(family, seed=1), make_source(family, seed=2)
    result = hfmerge.merge([str(t1), str(t2)], method="task_arithmetic", base=str(base), lambda_=0.5, progress=False)
    merged = load_plain(result.save(tmp_path / "out")).state_dict()
    sb = load_plain(base).state_dict()
    s1, s2 = load_plain(t1).state_dict(), load_plain(t2).state_dict()
    prefix = HEADLESS[family][1] + "."
    assert set(merged) == set(s1)
    backbone = 0
    for name, value in merged.items():
        base_name = name[len(prefix):] if name.startswith(prefix) else None
        if not value.dtype.is_floating_point:
            assert torch.equal(value, s1[name]), name
        elif base_name in sb and not is_running_statistic(name):
            backbone += 1
            expected = sb[base_name] + 0.5 * ((s1[name] - sb[base_name]) + (s2[name] - sb[base_name]))
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
        else:  # heads and decoder (one label set: averaged), BatchNorm statistics: averaged
            torch.testing.assert_close(value, (s1[name] + s2[name]) / 2, rtol=0, atol=1e-6, msg=name)
    paired = [n for n, v in sb.items() if prefix + n in s1 and v.dtype.is_floating_point and not is_running_statistic(n)]
    assert backbone == len(paired) > 10  # every base tensor the classifier has (not ViT's pooler)
    assert result.details["base_prefix"] == HEADLESS[family][1]


def test_task_arithmetic_with_a_headless_base_and_different_label_sets_concatenates_heads(make_source, tmp_path):
    base = make_source("vit", model=headless_base("vit"))
    t1 = make_source("vit", 3, seed=1, labels=["cat", "dog", "owl"])
    t2 = make_source("vit", 2, seed=2, labels=["car", "dog"])
    out = hfmerge.merge([str(t1), str(t2)], method="task_arithmetic", base=str(base), lambda_=1.0,
                        progress=False).save(tmp_path / "out")
    merged = load_plain(out)
    s1, s2, sm = load_plain(t1).state_dict(), load_plain(t2).state_dict(), merged.state_dict()
    assert torch.equal(sm["classifier.weight"], torch.cat([s1["classifier.weight"], s2["classifier.weight"]]))
    assert torch.equal(sm["classifier.bias"], torch.cat([s1["classifier.bias"], s2["classifier.bias"]]))
    assert merged.config.id2label == {0: "cat", 1: f"{t1.name}/dog", 2: "owl", 3: "car", 4: f"{t2.name}/dog"}
    assert merged.config.label2id == {v: k for k, v in merged.config.id2label.items()}


def test_task_arithmetic_refuses_a_base_that_lacks_the_backbone(make_source):
    from transformers import ViTConfig, ViTModel

    other = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=16, patch_size=4))
    base, t1 = make_source("vit", model=other), make_source("vit", seed=1)
    with pytest.raises(hfmerge.IncompatibleModelsError, match="lacks .* backbone tensor"):
        hfmerge.merge([str(t1)], method="task_arithmetic", base=str(base), progress=False)


def test_batchnorm_statistics_are_averaged_not_task_vectors(make_source, tmp_path):
    base = make_source("resnet", seed=0)
    tasks = [make_source("resnet", seed=s) for s in (1, 2, 3)]
    out = hfmerge.merge([str(t) for t in tasks], method="task_arithmetic", base=str(base), lambda_=1.0,
                        progress=False).save(tmp_path / "out")
    merged = load_plain(out)
    states = [load_plain(t).state_dict() for t in tasks]
    stats = [n for n in merged.state_dict() if is_running_statistic(n)]
    assert stats
    for name in stats:
        value = merged.state_dict()[name]
        torch.testing.assert_close(value, sum(s[name] for s in states) / 3, rtol=0, atol=1e-6, msg=name)
        if name.endswith("running_var"):
            assert (value > 0).all(), name
    x = torch.randn(2, 3, IMAGE_SIZE["resnet"], IMAGE_SIZE["resnet"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(merged(pixel_values=x).logits).all()


def ties_by_hand(base, tasks, density, scale):
    """TIES on whole tensors, written out plainly (Yadav et al., Algorithm 1), in float64."""
    base = base.double()
    trimmed = []
    for task in tasks:
        tau = (task.float() - base.float()).double().flatten()  # τ in the dtype the merge trims in
        k = int(density * tau.numel())
        keep = torch.argsort(tau.abs(), descending=True, stable=True)[:k]
        t = torch.zeros_like(tau)
        t[keep] = tau[keep]
        trimmed.append(t)
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    count = agree.sum(0)
    mean = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp(min=1), torch.zeros_like(elected))
    return (base.flatten() + scale * mean).reshape(base.shape).float()


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_ties_matches_an_independent_implementation(family, make_source, tmp_path):
    base = make_source(family, seed=0)
    tasks = [make_source(family, seed=s) for s in (1, 2, 3)]
    out = hfmerge.merge([str(t) for t in tasks], method="ties", base=str(base), lambda_=0.7,
                        parameters={"density": 0.3}, progress=False).save(tmp_path / "out")
    merged = load_plain(out).state_dict()
    sb = load_plain(base).state_dict()
    states = [load_plain(t).state_dict() for t in tasks]
    trimmed_somewhere = False
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, states[0][name]), name
        elif is_running_statistic(name):
            torch.testing.assert_close(value, sum(s[name] for s in states) / 3, rtol=0, atol=1e-6, msg=name)
        else:
            expected = ties_by_hand(sb[name], [s[name] for s in states], 0.3, 0.7)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
            trimmed_somewhere |= bool(((value - sb[name]) == 0).any() and (value != sb[name]).any())
    assert trimmed_somewhere


def test_ties_with_density_one_and_one_source_is_that_source_and_density_zero_is_the_base(make_source, tmp_path):
    base, task = make_source("vit", seed=0), make_source("vit", seed=1)
    whole = hfmerge.merge([str(task)], method="ties", base=str(base), parameters={"density": 1.0},
                          progress=False).save(tmp_path / "whole")
    st, sb = load_plain(task).state_dict(), load_plain(base).state_dict()
    for name, value in load_plain(whole).state_dict().items():
        torch.testing.assert_close(value, st[name], rtol=0, atol=1e-6, msg=name)
    nothing = hfmerge.merge([str(task)], method="ties", base=str(base), parameters={"density": 0.0},
                            progress=False).save(tmp_path / "nothing")
    for name, value in load_plain(nothing).state_dict().items():
        assert torch.equal(value, sb[name]), name


@pytest.fixture
def vit_tasks(make_source):
    return make_source("vit", seed=0), [make_source("vit", seed=s) for s in (1, 2)]


def merge_file(sources, base, out, **kwargs):
    result = hfmerge.merge([str(s) for s in sources], base=str(base), progress=False, **kwargs)
    return (result.save(out) / "model.safetensors").read_bytes()


def test_dare_is_reproducible_byte_for_byte_with_a_seed_and_differs_with_another(vit_tasks, tmp_path):
    base, tasks = vit_tasks
    first = merge_file(tasks, base, tmp_path / "a", method="dare", seed=7, parameters={"drop_rate": 0.5})
    again = merge_file(tasks, base, tmp_path / "b", method="dare", seed=7, parameters={"drop_rate": 0.5})
    other = merge_file(tasks, base, tmp_path / "c", method="dare", seed=8, parameters={"drop_rate": 0.5})
    assert first == again
    assert first != other
    assert yaml.safe_load((tmp_path / "a" / "hfmerge.yaml").read_text())["seed"] == 7


def test_dare_seed_on_the_command_line_is_recorded_and_run_reproduces_it(vit_tasks, tmp_path, capsys):
    base, tasks = vit_tasks
    out, again = tmp_path / "out", tmp_path / "again"
    code, _, err = run_cli(["merge", *tasks, "--method", "dare", "--base", base, "--seed", "11",
                            "--param", "sign=ties", "--output", out, "-q"], capsys)
    assert code == 0, err
    assert yaml.safe_load((out / "hfmerge.yaml").read_text())["seed"] == 11
    assert run_cli(["run", out / "hfmerge.yaml", "--output", again, "-q"], capsys)[0] == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_dare_without_dropping_is_task_arithmetic_and_its_ties_sign_is_ties(vit_tasks, tmp_path):
    base, tasks = vit_tasks
    merge_file(tasks, base, tmp_path / "dare", method="dare", lambda_=0.4, parameters={"drop_rate": 0.0})
    merge_file(tasks, base, tmp_path / "ta", method="task_arithmetic", lambda_=0.4)
    dare, ta = load_file(tmp_path / "dare" / "model.safetensors"), load_file(tmp_path / "ta" / "model.safetensors")
    assert dare.keys() == ta.keys()
    for key in dare:
        assert torch.equal(dare[key], ta[key]), key
    merge_file(tasks, base, tmp_path / "dare-ties", method="dare", lambda_=0.4,
               parameters={"drop_rate": 0.0, "sign": "ties"})
    merge_file(tasks, base, tmp_path / "ties", method="ties", lambda_=0.4, parameters={"density": 1.0})
    dare_ties, ties = (load_file(tmp_path / n / "model.safetensors") for n in ("dare-ties", "ties"))
    for key in dare_ties:
        assert torch.equal(dare_ties[key], ties[key]), key
    assert any(not torch.equal(dare_ties[k], dare[k]) for k in dare)  # the sign election did something


@pytest.mark.parametrize("sign", ["sum", "ties"])
def test_dare_keeps_about_one_minus_p_of_each_task_vector_rescaled(sign, vit_tasks, tmp_path):
    base, tasks = vit_tasks
    merge_file(tasks[:1], base, tmp_path / "o", method="dare", seed=3, parameters={"drop_rate": 0.75, "sign": sign})
    merged = load_plain(tmp_path / "o").state_dict()
    sb, st = load_plain(base).state_dict(), load_plain(tasks[0]).state_dict()
    kept = total = 0
    for name, value in merged.items():
        tau = st[name] - sb[name]
        if not value.dtype.is_floating_point or not tau.any():
            continue
        delta = value - sb[name]
        is_kept = (delta - 4 * tau).abs() <= 1e-5
        assert (is_kept | (delta.abs() <= 1e-6)).all(), name  # every entry: dropped (0) or τ/(1 − p)
        kept, total = kept + int((is_kept & (tau != 0)).sum()), total + int((tau != 0).sum())
    assert 0.2 < kept / total < 0.3


def test_dare_refuses_drop_rate_one_and_seed_with_a_deterministic_method(vit_tasks):
    base, tasks = vit_tasks
    with pytest.raises(hfmerge.RecipeError, match="drop_rate.*below 1"):
        hfmerge.merge([str(t) for t in tasks], method="dare", base=str(base), parameters={"drop_rate": 1.0})
    with pytest.raises(hfmerge.RecipeError, match="sign.*one of sum, ties"):
        hfmerge.merge([str(t) for t in tasks], method="dare", base=str(base), parameters={"sign": "max"})
    with pytest.raises(hfmerge.RecipeError, match="no random numbers"):
        hfmerge.merge([str(t) for t in tasks], method="average", seed=1)


def test_new_methods_are_listed(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    assert "ties: TIES-Merging" in out and "arxiv.org/abs/2306.01708" in out
    assert "dare: DARE" in out and "arxiv.org/abs/2311.03099" in out
