"""Every method on every family, checked against hand computations on the in-memory state dicts.

Expected values are computed here from the sources loaded with plain
transformers (in-memory names, ``state_dict()`` order), independently of
hfmerge's checkpoint-name mapping; outputs are loaded with plain transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import recorded_forward_order

import hfmerge
from hfmerge.testing.tiny import FAMILIES, IMAGE_SIZE, tiny_adapter, tiny_config, tiny_model


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def float_items(model):
    return {k: v for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def _carried(family, state):
    """The tensors of ``state`` that no method merges, as the tiny model's adapter declares (``not_merged``)."""
    adapter = tiny_adapter(family)
    return {name for name in state if not adapter.is_merged(name)}


@pytest.mark.parametrize("family", FAMILIES)
def test_average_is_the_weighted_mean_and_loads_with_transformers(family, make_source, tmp_path):
    a, b = make_source(family, seed=1), make_source(family, seed=2)
    out = hfmerge.merge([str(a), str(b)], method="average", weights=[1, 3], progress=False).save(tmp_path / "out")
    merged, ma, mb = load_plain(out), load_plain(a), load_plain(b)
    sa, sb, sm = ma.state_dict(), mb.state_dict(), merged.state_dict()
    assert set(sm) == set(sa)
    carried = _carried(family, sm)
    for name, value in sm.items():
        if name in carried:  # no method merges them (a CLIPModel's text tower): the anchor's, the first source
            assert torch.equal(value, sa[name]), name
        elif value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.25 * sa[name] + 0.75 * sb[name], rtol=0, atol=1e-6)
        else:  # num_batches_tracked comes from the first source, not averaged
            assert torch.equal(value, sa[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_sources_merge_to_themselves(family, make_source, tmp_path):
    a = make_source(family, seed=3)
    out = hfmerge.merge([str(a), str(a)], method="layerwise", progress=False).save(tmp_path / "out")
    original = load_plain(a).state_dict()
    for name, value in load_plain(out).state_dict().items():
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("family", ["vit", "resnet", "segformer", "upernet-swin", "mask2former"])
def test_layerwise_follows_eq1_with_heads_of_different_sizes(family, make_source, tmp_path):
    anchor, other = make_source(family, 3, seed=1), make_source(family, 5, seed=2)
    result = hfmerge.merge([str(anchor), str(other)], method="layerwise", anchor=str(anchor), progress=False)
    merged = load_plain(result.save(tmp_path / "out"))
    anchor_model = load_plain(anchor)
    sa, so = anchor_model.state_dict(), load_plain(other).state_dict()
    # Shared layers: layers whose every tensor has one shape in both, in the order the anchor runs them.
    modules: dict[str, list[str]] = {}
    for name in sa:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    layers, _ = recorded_forward_order(anchor_model, family, IMAGE_SIZE[family])
    shared = [m for m in layers if all(n in so and so[n].shape == sa[n].shape for n in modules[m])]
    assert len(shared) < len(modules)  # the heads differ, so some modules are not shared
    n_p, m = len(shared), 2
    for name, value in merged.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module not in shared or not value.dtype.is_floating_point:
            assert torch.equal(value, sa[name]), name
            continue
        j = shared.index(module) + 1
        h = (n_p - j) / (n_p * m)
        torch.testing.assert_close(value, (1 - h) * sa[name] + h * so[name], rtol=0, atol=1e-6)
    assert merged.config.num_labels == 3
    assert result.details["shared_layers"] == n_p


def test_layerwise_anchor_weight_ends_at_one_and_start_layer_is_uniform_before(make_source, tmp_path):
    a, b, c = (make_source("vit", seed=s) for s in (1, 2, 3))
    result = hfmerge.merge([str(a), str(b), str(c)], method="layerwise", anchor=str(b),
                           start_layer=4, progress=False)
    rows = result.details["layer_weights"]
    n_p = len(rows)
    assert all(r["anchor"] == pytest.approx(1 / 3) for r in rows[:3])
    assert rows[-1]["anchor"] == 1.0
    assert rows[3]["each_other"] == pytest.approx((n_p - 4) / ((n_p - 3) * 3))
    merged = load_plain(result.save(tmp_path / "o"))
    assert torch.equal(merged.state_dict()["classifier.weight"], load_plain(b).state_dict()["classifier.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_task_arithmetic_matches_hand_computation(family, make_source, tmp_path):
    base, t1, t2 = (make_source(family, seed=s) for s in (0, 1, 2))
    out = hfmerge.merge([str(t1), str(t2)], method="task_arithmetic", base=str(base), lambda_=0.5,
                        progress=False).save(tmp_path / "out")
    sb, s1, s2 = (load_plain(p).state_dict() for p in (base, t1, t2))
    merged = float_items(load_plain(out))
    carried = _carried(family, merged)
    for name, value in merged.items():
        if name in carried:  # no method merges them (a CLIPModel's text tower): the base's
            assert torch.equal(value, sb[name]), name
            continue
        expected = sb[name] + 0.5 * ((s1[name] - sb[name]) + (s2[name] - sb[name]))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5)


def _same_backbone_pair(family, n1, n2):
    """Two models with one backbone and different heads: fusion must preserve both functions."""
    a = tiny_model(family, n1, seed=1, labels=[f"a{i}" for i in range(n1)])
    b = tiny_model(family, n2, seed=2, labels=[f"b{i}" for i in range(n2 - 1)] + ["a0"])
    state_a = a.state_dict()
    b.load_state_dict({k: v for k, v in b.state_dict().items() if k not in state_a or state_a[k].shape != v.shape}
                      | {k: v for k, v in state_a.items() if k in b.state_dict() and b.state_dict()[k].shape == v.shape})
    return a, b


def _logits(model, family, x):
    out = model(pixel_values=x)
    return out.class_queries_logits if family == "mask2former" else out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_of_one_backbone_concatenates_the_heads_outputs(family, make_source, tmp_path):
    if not tiny_adapter(family).heads.get(tiny_config(family).architectures[0]):
        pytest.skip(f"{family} has no classifier head: fusion refuses it in one line (tests/test_transformers4.py)")
    a, b = _same_backbone_pair(family, 3, 2)
    pa, pb = make_source(family, model=a), make_source(family, model=b)
    result = hfmerge.merge([str(pa), str(pb)], method="fusion", progress=False)
    merged = load_plain(result.save(tmp_path / "out"))
    size = IMAGE_SIZE[family]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        la, lb, lm = _logits(a, family, x), _logits(b, family, x), _logits(merged, family, x)
    if family == "mask2former":  # label logits stacked, one "no object" logit: the mean of the two
        expected = torch.cat([la[..., :3], lb[..., :2], (la[..., 3:] + lb[..., 2:]) / 2], dim=-1)
    else:
        expected = torch.cat([la, lb], dim=1)
    torch.testing.assert_close(lm, expected, rtol=1e-4, atol=1e-4)
    # "a0" is in both label sets, so both copies are prefixed with their source's name.
    labels = list(merged.config.id2label.values())
    assert labels == [f"{pa.name}/a0", "a1", "a2", "b0", f"{pb.name}/a0"]
    assert merged.config.num_labels == 5


def test_fusion_refuses_different_backbones(make_source):
    from transformers import ViTConfig, ViTForImageClassification

    wide = ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    a, b = make_source("vit"), make_source("vit", model=wide)
    with pytest.raises(hfmerge.IncompatibleModelsError, match="backbones differ"):
        hfmerge.merge([str(a), str(b)], method="fusion", progress=False)


def test_average_refuses_different_backbones_and_points_to_layerwise(make_source):
    from transformers import ViTConfig, ViTForImageClassification

    deep = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    a, b = make_source("vit"), make_source("vit", model=deep)
    with pytest.raises(hfmerge.IncompatibleModelsError, match="layerwise"):
        hfmerge.merge([str(a), str(b)], method="average", progress=False)


def test_dtype_override_and_default_keep_source_dtype(make_source, tmp_path):
    from safetensors import safe_open

    model = tiny_model("vit").to(torch.bfloat16)
    a, b = make_source("vit", model=model), make_source("vit", model=tiny_model("vit", seed=5).to(torch.bfloat16))
    out = hfmerge.merge([str(a), str(b)], progress=False).save(tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    out16 = hfmerge.merge([str(a), str(b)], dtype="float16", progress=False).save(tmp_path / "f16")
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "float16"


def test_a_parameter_without_default_stays_unset_until_given():
    from hfmerge.errors import RecipeError
    from hfmerge.methods.base import ParamSpec

    spec = ParamSpec("share", float, None, "optional", minimum=0.0, maximum=1.0)
    assert spec.coerce(None, "m") is None
    assert spec.coerce("0.25", "m") == 0.25
    with pytest.raises(RecipeError, match="must be <= 1.0"):
        spec.coerce("1.5", "m")
