"""Layers in the order the model runs them, what is not a layer, and the layerwise guards (issue 7 §1, §3).

The expected order is recorded here by running each real tiny model once on the CPU with hooks
(tests/helpers.py), independently of hfmerge's meta-device or shrunk-copy trace.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from helpers import NOT_LAYERS, assert_one_line_error, recorded_forward_order, run_cli

import hfmerge
from hfmerge.adapters import inspect_source
from hfmerge.adapters.forward_order import order_modules
from hfmerge.hub.resolve import resolve_source
from hfmerge.methods.layerwise import layer_weights
from hfmerge.testing.tiny import FAMILIES, IMAGE_SIZE, save_tiny, tiny_adapter, tiny_config, tiny_model


def layout_of(folder):
    return inspect_source(resolve_source(str(folder)))


def shifted(model, seed):
    """``model`` with every parameter moved by a seeded offset, so no two sources share a value (biases start at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return model


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def test_order_modules_places_uncalled_owners_by_parent_and_buffer_only_ones_last():
    owners = ["loss", "head", "stem", "block.attn", "block.attn.out", "block.embed", "block.norm"]
    calls = ["", "stem", "block", "block.norm", "block.attn", "head"]
    order = order_modules(owners, calls, buffer_only=["loss"])
    # block.embed (never called) right after block starts; block.attn.out right after block.attn
    assert order.modules == ("stem", "block.embed", "block.norm", "block.attn", "block.attn.out", "head", "loss")
    assert order.not_run == ("loss",)


def test_an_adapters_explicit_order_wins_over_tracing():
    from transformers import ViTConfig

    from hfmerge.adapters.base import FamilyAdapter
    from hfmerge.adapters.forward_order import ForwardOrder, forward_order

    given = ForwardOrder(("classifier", "vit.embeddings"))
    adapter = FamilyAdapter(name="explicit-test", model_types=(), architectures={"ViTForImageClassification": "x"},
                            explicit_order=lambda architecture, config: given)
    assert forward_order(adapter, "ViTForImageClassification", ViTConfig(num_hidden_layers=1)) is given


def test_a_model_that_cannot_be_traced_keeps_registration_order_with_a_warning(caplog):
    from transformers import ViTConfig, ViTForImageClassification

    from hfmerge.adapters.base import FamilyAdapter
    from hfmerge.adapters.forward_order import forward_order

    def unusable(config):
        raise RuntimeError("no forward here")

    adapter = FamilyAdapter(name="untraceable-test", model_types=(), architectures={"ViTForImageClassification": "x"},
                            trace_config=unusable)
    config = ViTConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1)
    order = forward_order(adapter, "ViTForImageClassification", config)
    registered = dict.fromkeys(n.rsplit(".", 1)[0] for n in ViTForImageClassification(config).state_dict())
    assert order.modules == tuple(registered)
    assert "could not be traced (RuntimeError: no forward here)" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_are_in_the_order_a_forward_pass_runs_them(family, make_source):
    adapter = tiny_adapter(family)
    model = tiny_model(family, seed=1)
    layout = layout_of(make_source(family, model=model))
    layers, not_layers = recorded_forward_order(model, family, IMAGE_SIZE[family],
                                                call=adapter.image_encoder.get(tiny_config(family).architectures[0]),
                                                merged=adapter.is_merged)
    assert layout.modules[: len(layers)] == layers
    assert layout.layers == layers
    assert set(layout.modules[len(layers):]) == not_layers  # not layers come last
    assert {t.module for t in layout.tensors.values() if not t.is_layer} == not_layers


def test_vit_runs_layernorm_before_ahead_of_the_attention(make_source):
    modules = layout_of(make_source("vit")).modules
    assert modules.index("vit.layers.0.layernorm_before") < modules.index("vit.layers.0.attention.q_proj")
    assert modules.index("vit.layers.0.attention.o_proj") < modules.index("vit.layers.0.layernorm_after")


def test_resnet_shortcut_comes_after_the_main_branch(make_source):
    modules = layout_of(make_source("resnet")).modules
    block = "resnet.encoder.stages.1.layers.0"
    assert modules.index(f"{block}.layer.1.normalization") < modules.index(f"{block}.shortcut.convolution")


@pytest.mark.parametrize("family", ["upernet-convnext", "upernet-swin"])
def test_upernet_output_classifier_is_the_last_layer_and_the_auxiliary_head_no_layer(family, make_source):
    layout = layout_of(make_source(family))
    assert layout.modules[len(layout.layers) - 1] == layout.layers[-1] == "decode_head.classifier"
    auxiliary = [t for t in layout.tensors.values() if t.name.startswith("auxiliary_head.")]
    assert auxiliary and not any(t.is_layer for t in auxiliary)
    assert not any(m.startswith("auxiliary_head.") for m in layout.layers)


def test_mask2former_criterion_is_no_layer_but_still_a_head_for_fusion(make_source):
    layout = layout_of(make_source("mask2former"))
    assert layout.modules[len(layout.layers) - 1] == layout.layers[-1] == "class_predictor"
    weight = layout.tensors["criterion.empty_weight"]
    assert not weight.is_layer and weight.head is not None and "criterion" not in layout.layers
    # level_embed is read as .weight, never called: it sits where its parent (the transformer module) starts
    modules = layout.modules
    assert modules.index("model.pixel_level_module.decoder.mask_projection") < modules.index(
        "model.transformer_module.level_embed") < modules.index("model.transformer_module.decoder.layernorm")


@pytest.mark.parametrize(("family", "output_layer"),
                         [("upernet-convnext", "decode_head.classifier"), ("mask2former", "class_predictor")])
def test_layerwise_keeps_the_anchors_output_layer_and_what_is_no_layer(family, output_layer, make_source, tmp_path):
    a, b = (make_source(family, model=shifted(tiny_model(family, seed=s), s)) for s in (1, 2))
    result = hfmerge.merge([str(a), str(b)], method="layerwise", anchor=str(b), progress=False)
    merged = load_plain(result.save(tmp_path / "out")).state_dict()
    sa, sb = load_plain(a).state_dict(), load_plain(b).state_dict()
    kept = [n for n in merged if n.startswith(output_layer + ".") or n.split(".")[0] in NOT_LAYERS[family]]
    assert len(kept) > 2
    for name in kept:
        assert torch.equal(merged[name], sb[name]), name
    assert not torch.equal(sa[f"{output_layer}.bias"], sb[f"{output_layer}.bias"])
    rows = result.details["layer_weights"]
    assert rows[-1]["module"] == output_layer and rows[-1]["anchor"] == 1.0
    # the first layer is near-uniform: H = (Np - 1) / (Np * 2)
    first = next(n for n in merged if n.startswith(rows[0]["module"] + ".") and n.endswith("weight"))
    h = (len(rows) - 1) / (len(rows) * 2)
    torch.testing.assert_close(merged[first], (1 - h) * sb[first] + h * sa[first], rtol=0, atol=1e-6)


def test_layerwise_refuses_sources_whose_backbones_differ(make_source, tmp_path, capsys):
    out = tmp_path / "out"
    convnext, swin = make_source("upernet-convnext"), make_source("upernet-swin")
    code, _, err = run_cli(["merge", convnext, swin, "-m", "layerwise", "-o", out], capsys)
    assert_one_line_error(code, err, "share a backbone", "backbone layers of the anchor", str(swin))
    assert not out.exists()


def test_methods_states_the_start_layer_formula_that_is_used(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if "--param start_layer" in line)
    assert "1/M for j < K" in line and "(Np − j)/((Np − K + 1)·M)" in line
    n_p, m, k = 7, 3, 3
    stated = [1 / m if j < k else (n_p - j) / ((n_p - k + 1) * m) for j in range(1, n_p + 1)]
    assert layer_weights(n_p, m, k) == pytest.approx(stated)


@pytest.fixture
def run_checkpoints(tmp_path):
    """Trainer checkpoints of one run, given out of step order (and 500 > 2000 as strings)."""
    run = tmp_path / "run"
    return [save_tiny(run / f"checkpoint-{step}", "vit", seed=i) for i, step in enumerate((500, 2000, 1000))]


def anchor_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("anchor:"))


def test_checkpoints_of_one_run_are_anchored_on_the_latest(run_checkpoints, tmp_path, capsys):
    code, stdout, _ = run_cli(["merge", *run_checkpoints, "-m", "layerwise", "--dry-run"], capsys)
    assert code == 0
    line = anchor_line(stdout)
    assert "checkpoint-2000" in line and "latest of 3 checkpoints" in line and "final checkpoint" in line
    assert "[anchor]" in stdout.splitlines()[2] and "[anchor]" not in stdout.splitlines()[1]
    result = hfmerge.merge([str(f) for f in run_checkpoints], method="layerwise", progress=False)
    merged = load_plain(result.save(tmp_path / "out")).state_dict()
    assert torch.equal(merged["classifier.weight"], load_plain(run_checkpoints[1]).state_dict()["classifier.weight"])


def test_a_given_anchor_wins_and_the_plan_names_it(run_checkpoints, capsys):
    code, stdout, _ = run_cli(["merge", *run_checkpoints, "-m", "layerwise", "--anchor", run_checkpoints[0],
                               "--dry-run"], capsys)
    assert code == 0
    assert re.fullmatch(rf"anchor: {re.escape(str(run_checkpoints[0]))} — named by --anchor", anchor_line(stdout))


def test_checkpoints_of_different_runs_anchor_on_the_first_source(tmp_path, capsys):
    folders = [save_tiny(tmp_path / run / "checkpoint-10", "vit", seed=i) for i, run in enumerate(("run1", "run2"))]
    folders.append(save_tiny(tmp_path / "run1" / "checkpoint-20", "vit", seed=3))
    code, stdout, _ = run_cli(["merge", *folders, "-m", "layerwise", "--dry-run"], capsys)
    assert code == 0
    assert anchor_line(stdout) == f"anchor: {folders[0]} — the first source; name another with --anchor"


def test_inspect_prints_the_forward_order_and_marks_what_is_no_layer(make_source, capsys):
    code, stdout, _ = run_cli(["inspect", make_source("upernet-convnext")], capsys)
    assert code == 0
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layers ("))
    n_p = int(re.match(r"layers \((\d+)", lines[header]).group(1))
    rows = [line.split() for line in lines[header + 1: header + 1 + n_p]]
    assert [int(r[0]) for r in rows] == list(range(1, n_p + 1))
    assert rows[-1][1] == "decode_head.classifier"
    assert lines[header + 1 + n_p].startswith("not layers (3")
    assert [line.split()[1] for line in lines[header + 2 + n_p: header + 5 + n_p]] == [
        "auxiliary_head.convs.0.conv", "auxiliary_head.convs.0.batch_norm", "auxiliary_head.classifier"]
