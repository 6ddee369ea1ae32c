"""Neuron groups of ResNet (basic and bottleneck), ViT and MobileNetV2, checked on real tiny models (issue 10 §1).

A model whose state is permuted group by group (hfmerge/testing/permute.py)
must compute the same outputs as the original, which holds only if every
group holds every tensor dimension that indexes its units; every hidden
output dimension must be in a group; no group may hold the labels or the RGB
channels; and the modules a group names as its activations must carry its
units, permuted with them. The models are re-drawn at unit scale, biases and
BatchNorm statistics included, so a dimension left out of a group moves the
outputs far beyond the tolerance.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from permuted_models import (
    assert_groups_move_only_their_tensors,
    assert_groups_spare_labels_and_pixels,
    assert_permuted_copy_keeps_outputs,
    built_models,
    outputs,
)

from hfmerge.testing.permute import permute_groups
from hfmerge.testing.tiny import tiny_config


def _resnet_bottleneck() -> transformers.ResNetConfig:
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="bottleneck",
                                    downsample_in_bottleneck=True, num_labels=3)
    cfg.architectures = ["ResNetForImageClassification"]
    return cfg


def _resnet_strided_first_stage() -> transformers.ResNetConfig:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic",
                                    downsample_in_first_stage=True, num_labels=3)
    cfg.architectures = ["ResNetForImageClassification"]
    return cfg


def _headless(family: str, architecture: str):
    def make():
        cfg = tiny_config(family)
        cfg.architectures = [architecture]
        return cfg
    return make


def _mobilenet_stem_expansion() -> transformers.MobileNetV2Config:
    cfg = tiny_config("mobilenet_v2")
    cfg.first_layer_is_expansion = False
    return cfg


# case -> (config maker, image size). ResNet: the tiny basic model's stage 0 opens with an identity shortcut
# (stem width = stage width, no stride) and stage 1 with a shortcut convolution; the bottleneck model likewise,
# two blocks a stage, downsampling in the first 1x1; a basic model whose first stage downsamples (a shortcut
# convolution there, so the stem is a group of its own); headless models, whose output must keep its order.
# MobileNetV2 with and without an expansion 1x1 in the stem.
CASES = {
    "resnet": (lambda: tiny_config("resnet"), 32),
    "resnet-bottleneck": (_resnet_bottleneck, 32),
    "resnet-strided-first-stage": (_resnet_strided_first_stage, 32),
    "resnet-headless": (_headless("resnet", "ResNetModel"), 32),
    "vit": (lambda: tiny_config("vit"), 16),
    "vit-headless": (_headless("vit", "ViTModel"), 16),
    "mobilenet_v2": (lambda: tiny_config("mobilenet_v2"), 32),
    "mobilenet_v2-stem-expansion": (_mobilenet_stem_expansion, 32),
}

# The tensors whose dim 1 reads the RGB image, written here from the transformers source.
RGB_INPUT = {
    "resnet": "embedder.embedder.convolution.weight",
    "vit": "embeddings.patch_embeddings.projection.weight",
    "mobilenet_v2": "conv_stem.first_conv.convolution.weight",
}

built = built_models(lambda case: CASES[case][0]())


def _family(case: str) -> str:
    return case.split("-")[0]


@pytest.mark.parametrize("case", CASES)
def test_permuted_model_computes_the_same_outputs(built, case):
    model, layout = built(case)
    assert_permuted_copy_keeps_outputs(model, layout.neuron_groups, CASES[case][1])


@pytest.mark.parametrize("case", CASES)
def test_every_group_moves_its_tensors(built, case):
    model, layout = built(case)
    assert_groups_move_only_their_tensors(model, layout.neuron_groups)


@pytest.mark.parametrize("case", CASES)
def test_groups_are_disjoint_and_leave_labels_and_pixels_alone(built, case):
    model, layout = built(case)
    groups = layout.neuron_groups
    state = model.state_dict()
    for group in groups:
        for tensor, dim in group.members:
            assert tensor in state and not tensor.endswith("num_batches_tracked"), tensor
            assert state[tensor].shape[dim] == group.size * group.unit, (group.name, tensor)
        assert set(group.producers) <= {t for t, d in group.members if d == 0}
        forward = list(layout.forward)
        assert list(group.producers) == sorted(group.producers, key=forward.index)
    assert_groups_spare_labels_and_pixels(layout, groups, state, RGB_INPUT[_family(case)])
    if case.endswith("headless"):  # the model's output features (last hidden state) keep their order
        members = [m for g in groups for m in g.members]
        width = outputs(model, CASES[case][1])[0].shape[-1 if _family(case) == "vit" else 1]
        last_writer = [t for t in state if t.endswith(("convolution.weight", "fc2.weight"))][-1]
        assert state[last_writer].shape[0] == width
        assert (last_writer, 0) not in members


def _output_dims(model: torch.nn.Module, case: str) -> list[str]:
    """Weights whose dim 0 are hidden units a group must hold: every conv/linear but the head, less the exceptions."""
    family = _family(case)
    names = [name for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not name.startswith("classifier")]
    if family == "vit":  # the residual stream (hidden size) is not a group; fc1 and q, k, v rows are
        names = [n for n in names if n.endswith(("fc1", "q_proj", "k_proj", "v_proj"))]
    elif family == "mobilenet_v2":  # the streams between blocks (reduce_1x1's outputs) are left out by this issue
        names = [n for n in names if ".reduce_1x1." not in n]
    if case == "resnet-headless":  # the last stage's stream is the model's output
        last = max(int(n.split(".stages.")[1].split(".")[0]) for n in names if ".stages." in n)
        writes_output = (".shortcut.", ".layer.1.convolution")
        names = [n for n in names if not (f".stages.{last}." in n and any(w in n + "." for w in writes_output))]
    return [f"{n}.weight" for n in names]


@pytest.mark.parametrize("case", CASES)
def test_every_hidden_output_dimension_is_in_a_group(built, case):
    model, layout = built(case)
    members = {m for g in layout.neuron_groups for m in g.members}
    expected = _output_dims(model, case)
    assert expected
    assert [t for t in expected if (t, 0) not in members] == []


def test_resnet_groups_read_as_the_model_is_built(built):
    """The basic tiny ResNet's groups, written out from the transformers source: names, order and the stream's joins."""
    _, layout = built("resnet")
    groups = layout.neuron_groups
    assert [g.name for g in groups] == [
        "resnet.encoder.stages.0 (residual)",
        "resnet.encoder.stages.0.layers.0.layer.0 (channels)",
        "resnet.encoder.stages.1.layers.0.layer.0 (channels)",
        "resnet.encoder.stages.1 (residual)",
    ]
    stage0, _, _, stage1 = groups
    # the stem writes into stage 0's stream (identity shortcut); stage 1's shortcut and first conv read it
    assert {("resnet.embedder.embedder.convolution.weight", 0),
            ("resnet.encoder.stages.1.layers.0.shortcut.convolution.weight", 1),
            ("resnet.encoder.stages.1.layers.0.layer.0.convolution.weight", 1)} <= set(stage0.members)
    assert ("classifier.1.weight", 1) in stage1.members
    # streams are observed before any ReLU: the shortcut's BatchNorm, and each block's sum (its ReLU's input)
    assert stage1.activations == ("resnet.encoder.stages.1.layers.0.shortcut.normalization",
                                  "resnet.encoder.stages.1.layers.0.activation#input")
    assert stage0.activations == ("resnet.embedder", "resnet.encoder.stages.0.layers.0.activation#input")
    bottleneck = [g.name for g in built("resnet-bottleneck")[1].neuron_groups]
    assert len(bottleneck) == 2 + 2 * 2 * 2 and bottleneck.count("resnet.encoder.stages.1 (residual)") == 1
    strided = [g.name for g in built("resnet-strided-first-stage")[1].neuron_groups]
    assert strided[0] == "resnet.embedder.embedder (channels)"


def test_permute_groups_moves_whole_units_by_hand():
    """Unit j of the result is unit perm[j] of the input, on every member dimension; units of 2 move whole."""
    from hfmerge.adapters.neurons import NeuronGroup

    rows = torch.arange(6.0)[:, None].repeat(1, 2)  # [6, 2]: 3 units of 2 entries on dim 0
    cols = torch.arange(6.0)[None, :] * 10  # [1, 6]: the same units read on dim 1
    group = NeuronGroup("g", (("rows", 0), ("cols", 1)), size=3, unit=2)
    untouched = torch.ones(2)
    state, perms = permute_groups({"rows": rows, "cols": cols, "other": untouched}, [group], seed=0)
    perm = perms["g"].tolist()
    expected = [2 * p + u for p in perm for u in range(2)]
    assert state["rows"][:, 0].tolist() == [float(e) for e in expected]
    assert state["cols"][0].tolist() == [10.0 * e for e in expected]
    assert state["other"] is untouched
    # never the identity, whatever the seed (randperm of 2 is the identity half the time)
    pair = NeuronGroup("pair", (("rows", 0),), size=2)
    assert all(permute_groups({"rows": torch.zeros(2, 1)}, [pair], seed)[1]["pair"].tolist() == [1, 0]
               for seed in range(20))
    with pytest.raises(ValueError, match="has 3 units of 2"):
        permute_groups({"rows": torch.zeros(5, 1), "cols": cols}, [group])
