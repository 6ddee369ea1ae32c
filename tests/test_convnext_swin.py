"""ConvNeXt and Swin image classifiers (issue 21): what the tests parametrized over the registry leave out.

Neuron groups: a copy of a model with every group permuted (ConvNeXt's hidden
channels and its optional stage streams; Swin's MLP neurons and attention heads,
with their relative position bias columns) must compute the same outputs, which
holds only if each group holds every tensor dimension that indexes its units;
the models are re-drawn at unit scale so that a dimension left out shows.
OTFusion must align such a copy back onto the original exactly (task arithmetic
against the headless backbone: tests/test_task_vectors.py, over the registry).
Every method merges identical sources to themselves, or refuses the family in
one line (gating: no attention, or Swin's windowed attention and patch merging,
not the paper's ViT; CLAFusion: no depth declaration).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli
from permuted_models import (
    assert_groups_move_only_their_tensors,
    assert_groups_spare_labels_and_pixels,
    assert_permuted_copy_keeps_outputs,
    built_models,
    outputs,
    permuted_copy,
    randomised,
)
from test_every_method import random_images

import hfmerge
from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source
from hfmerge.testing.permute import permute_groups, unit_index
from hfmerge.testing.tiny import IMAGE_SIZE, save_tiny, tiny_config

FAMILIES = ("convnext", "swin")
HEADLESS = {"convnext": "ConvNextModel", "swin": "SwinModel"}
CASES = (*FAMILIES, *(f"{family}-headless" for family in FAMILIES))
# The tensors whose dim 1 reads the RGB image, written here from the transformers source.
RGB_INPUT = {"convnext": "embeddings.patch_embeddings.weight", "swin": "embeddings.patch_embeddings.projection.weight"}
# Why gating refuses each family, in its one line: what a ViT's gated attention and MLP blocks are not here.
GATING_WHY = {"convnext": "it has no attention", "swin": "windowed attention and patch merging"}


def _family(case: str) -> str:
    return case.removesuffix("-headless")


def _config(case: str):
    config = tiny_config(_family(case))
    if case.endswith("-headless"):
        config.architectures = [HEADLESS[_family(case)]]
    return config


built = built_models(_config)


# -- neuron groups -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_a_permuted_copy_computes_the_same_outputs_and_its_activations_move_with_its_units(built, case):
    model, layout = built(case)
    # ConvNeXt's stage streams (optional) included
    assert_permuted_copy_keeps_outputs(model, layout.all_neuron_groups, IMAGE_SIZE[_family(case)])


@pytest.mark.parametrize("case", CASES)
def test_groups_move_their_tensors_are_disjoint_and_leave_labels_and_pixels_alone(built, case):
    model, layout = built(case)
    groups = layout.all_neuron_groups
    original = model.state_dict()
    assert_groups_move_only_their_tensors(model, groups)
    for group in groups:
        for tensor, dim in group.members:
            assert original[tensor].shape[dim] == group.size * group.unit_of(tensor, dim), (group.name, tensor)
        assert set(group.producers) <= {t for t, d in group.members if d == 0}
    assert_groups_spare_labels_and_pixels(layout, groups, original, RGB_INPUT[_family(case)])


@pytest.mark.parametrize("case", CASES)
def test_every_hidden_output_dimension_is_in_a_group(built, case):
    """ConvNeXt: every convolution and linear but the head writes a group, except where a headless model's output
    is written (the last stage). Swin: q, k, v and fc1 rows; its streams (o_proj, fc2, patch merging) have none."""
    model, layout = built(case)
    members = {m for g in layout.all_neuron_groups for m in g.members}
    layers = [name for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not name.startswith("classifier")]
    if _family(case) == "swin":
        layers = [n for n in layers if n.endswith(("q_proj", "k_proj", "v_proj", "fc1"))]
    elif case.endswith("-headless"):
        last = f"stages.{len(model.config.depths) - 1}."
        layers = [n for n in layers if last not in n or n.endswith("pwconv1")]
    assert layers
    assert [n for n in layers if (f"{n}.weight", 0) not in members] == []


def test_convnext_groups_read_as_the_model_is_built(built):
    """The tiny ConvNeXt's groups, written out from the transformers source: names, order, the streams' members."""
    _, layout = built("convnext")
    groups = layout.all_neuron_groups
    stage = "convnext.encoder.stages"
    assert [g.name for g in groups] == [f"{stage}.0 (residual)", f"{stage}.0.layers.0 (hidden)",
                                        f"{stage}.0.layers.1 (hidden)", f"{stage}.1 (residual)",
                                        f"{stage}.1.layers.0 (hidden)"]
    assert [g.name for g in layout.neuron_groups] == [g.name for g in groups if "hidden" in g.name]
    stream0, hidden, _, stream1, _ = groups
    assert hidden.members == ((f"{stage}.0.layers.0.pwconv1.weight", 0), (f"{stage}.0.layers.0.pwconv1.bias", 0),
                              (f"{stage}.0.layers.0.pwconv2.weight", 1))
    assert (hidden.size, hidden.activation_dim) == (32, -1)
    # stage 0 keeps the stem's width and resolution: its stream is the patch embedding's; stage 1's downsampling reads it
    assert {("convnext.embeddings.patch_embeddings.weight", 0), ("convnext.embeddings.layernorm.weight", 0),
            (f"{stage}.0.layers.1.layer_scale_parameter", 0), (f"{stage}.1.downsampling_layer.0.weight", 0),
            (f"{stage}.1.downsampling_layer.1.weight", 1)} <= set(stream0.members)
    assert {(f"{stage}.1.downsampling_layer.1.weight", 0), ("convnext.layernorm.weight", 0),
            ("classifier.weight", 1)} <= set(stream1.members)
    assert stream1.activations == (f"{stage}.1.downsampling_layer.1", f"{stage}.1.layers.0")
    assert stream0.optional and stream1.optional and not hidden.optional


def test_swin_heads_carry_their_relative_position_bias_columns(built):
    """Column h of the bias table is head h's: it moves with the head, and a permutation without it changes the model."""
    model, layout = built("swin")
    attention = "swin.encoder.layers.1.blocks.1.attention"
    table = f"{attention}.relative_position_bias.relative_position_bias_table"
    group = next(g for g in layout.neuron_groups if g.name == f"{attention} (heads)")
    assert (group.size, group.unit, group.per_unit) == (2, 8, ((table, 1),))
    _, state, perms = permuted_copy(model, [group])
    original = model.state_dict()
    assert torch.equal(state[table], original[table][:, perms[group.name]])
    assert torch.equal(state[f"{attention}.q_proj.weight"],
                       original[f"{attention}.q_proj.weight"][unit_index(perms[group.name], 8)])
    without_table = replace(group, members=tuple(m for m in group.members if m[0] != table), per_unit=())
    broken, _, _ = permuted_copy(model, [without_table])
    reference, moved = outputs(model, IMAGE_SIZE["swin"])[0], outputs(broken, IMAGE_SIZE["swin"])[0]
    assert not torch.allclose(moved, reference, atol=1e-3)


# -- OTFusion ------------------------------------------------------------------------------------------------------

def _model(folder):
    return hfmerge.load(str(folder)).eval()


def _permuted_pair(tmp_path, family: str, *, residual: bool = False, seed: int = 3):
    """A tiny model and a copy of it with its neuron groups permuted (ConvNeXt's streams too when ``residual``)."""
    original = save_tiny(tmp_path / f"{family}-original", family, 3, model=randomised(
        getattr(transformers, tiny_config(family).architectures[0])(tiny_config(family)), seed))
    layout = inspect_source(resolve_source(str(original)))
    model = _model(original)
    state, permutations = permute_groups(model.state_dict(), layout.neuron_groups_with(residual), seed=seed + 1)
    model.load_state_dict(state)
    return original, save_tiny(tmp_path / f"{family}-permuted", family, 3, model=model), permutations


@pytest.mark.parametrize("cost", ["activations", "weights"])
@pytest.mark.parametrize(("family", "residual"), [("convnext", False), ("convnext", True), ("swin", False)])
def test_otfusion_aligns_a_permuted_copy_back_exactly(family, residual, cost, tmp_path):
    original, permuted, permutations = _permuted_pair(tmp_path, family, residual=residual)
    assert any("residual" in name for name in permutations) == residual
    data = random_images(tmp_path / "images", count=8, size=IMAGE_SIZE[family])
    extra = {"data": [str(data)], "samples": 8} if cost == "activations" else {}
    result = hfmerge.merge([str(original), str(permuted)], method="otfusion", cost=cost, residual=residual,
                           progress=False, **extra)
    fused, reference = _model(result.save(tmp_path / "out")), _model(original)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)
    pixels = torch.randn(4, 3, IMAGE_SIZE[family], IMAGE_SIZE[family], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=pixels).logits, reference(pixel_values=pixels).logits,
                                   atol=1e-5, rtol=1e-5)
    rows = result.details["transport_costs"]
    assert len(rows) == len(permutations)
    assert all(row["costs"][0][1] < 1e-4 for row in rows)  # after alignment every pair is one neuron: zero cost
    assert any(row["costs"][0][0] > 1e-3 for row in rows)  # before it, the permuted units were apart


@pytest.mark.parametrize("family", FAMILIES)
def test_gating_says_why_it_refuses_the_family(family, make_source, tmp_path, capsys):
    """tests/test_every_method.py holds every method to its refusal on every family; here, that gating's says why in
    words a user understands."""
    source = make_source(family, seed=1)
    images = random_images(tmp_path / "images")
    code, _, err = run_cli(["merge", source, source, "-m", "gating", "-o", tmp_path / "out", f"--data={images}",
                            f"--data={images}"], capsys)
    assert_one_line_error(code, err, "gating merges ViT image classifiers", GATING_WHY[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_gating_refuses_the_family_before_asking_for_data(family, make_source, tmp_path, capsys):
    """Asked for data first, a user would find it and add it only to learn the family cannot be gated at all."""
    source = make_source(family, seed=1)
    code, _, err = run_cli(["merge", source, source, "-m", "gating", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "gating merges ViT image classifiers", GATING_WHY[family])
    assert "needs data" not in err and not (tmp_path / "out").exists()
