"""ResNet (microsoft/resnet-*) image classifiers; the head is ``classifier.1`` after a Flatten."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import count, takewhile
from typing import Any

import torch

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, TinyVariant, register_family
from hfmerge.adapters.depth import DepthLayer, DepthSegment, DepthSpec, Structure, layer_output, neutral_batch_norm
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup, norm_members

_BLOCK = re.compile(r"(?P<prefix>(?:.+\.)?)encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """ResNet's neuron groups: one per stage's residual stream, one per convolution inside a block.

    A block (basic: two 3x3 convolutions; bottleneck: 1x1, 3x3, 1x1) adds its
    last convolution's output to its shortcut: the input itself (``nn.Identity``,
    when the block keeps width and resolution) or a 1x1 convolution with
    BatchNorm. So every block of a stage writes into one stream, together with
    the shortcut convolution that opens the stage; where a stage opens with an
    identity shortcut its stream is the previous stage's (or the stem's), and the
    two are one group. Every block's first convolution and its shortcut read the
    stream (input channels, dim 1), as does the classifier (``classifier.1``,
    dim 1). The channels inside a block (basic: one set; bottleneck: two) are
    groups of their own, from a convolution's output and its BatchNorm to the
    next convolution's input. ``downsample_in_first_stage`` and
    ``downsample_in_bottleneck`` move strides, not channels: a stage has a
    shortcut convolution or not, and that is read from the model's tensors.
    A stream is observed after each block's addition, before the ReLU that
    follows it (the input of the block's activation: ``<block>.activation#input``),
    at its shortcut convolution's BatchNorm output, and, when the stem writes
    into it, at the stem's (pooled) output; a set inside a block at its
    BatchNorm's output. The sum is the stream itself, which every later block
    reads; a block's last BatchNorm alone is only its update. Block outputs,
    after the ReLU, would not do: a channel that is zero on every image of the
    data (dead on it) looks like every other such channel, and optimal
    transport could pair them either way.

    A headless ``ResNetModel`` outputs the last stage's stream: permuting it
    would change the model's output, so no group holds it.
    """
    modules = layout.module_classes
    stages: dict[int, list[str]] = {}
    prefix = ""
    for name in modules:
        match = _BLOCK.fullmatch(name)
        if match:
            prefix = match["prefix"]
            stages.setdefault(int(match["stage"]), []).append(name)
    stem = f"{prefix}embedder.embedder"

    def conv(module: str) -> str:
        return f"{module}.convolution.weight"

    def conv_layer(key: str, module: str) -> None:
        """A ``ResNetConvLayer`` (or shortcut) writes the set ``key``: its convolution's rows and its BatchNorm."""
        builder.produced_by(key, conv(module)).channels(key, *norm_members(f"{module}.normalization"))

    builder = GroupBuilder(layout)
    opens_with_identity = bool(stages.get(0)) and f"{stages[0][0]}.shortcut.convolution" not in modules
    conv_layer("stem", stem)
    if opens_with_identity:
        builder.observed_at("stem", f"{prefix}embedder")
    else:
        builder.channels("stem", name=f"{stem} (channels)").observed_at("stem", f"{stem}.normalization")

    stream, output = "stem", conv(stem)
    for stage in sorted(stages):
        residual = f"stage{stage}"
        builder.channels(residual, name=f"{prefix}encoder.stages.{stage} (residual)")
        for block in stages[stage]:
            convs = list(takewhile(modules.__contains__, (f"{block}.layer.{i}" for i in count())))
            shortcut = f"{block}.shortcut"
            if f"{shortcut}.convolution" in modules:
                conv_layer(residual, shortcut)
                builder.channels(stream, (conv(shortcut), 1))
            else:
                builder.same(stream, residual)
            builder.channels(stream, (conv(convs[0]), 1))
            for inner, following in zip(convs, convs[1:]):
                conv_layer(inner, inner)
                builder.channels(inner, (conv(following), 1), name=f"{inner} (channels)")
                builder.observed_at(inner, f"{inner}.normalization")
            conv_layer(residual, convs[-1])
            builder.observed_at(residual, f"{block}.activation#input")
            if f"{shortcut}.convolution" in modules:
                builder.observed_at(residual, f"{shortcut}.normalization")
            stream, output = residual, conv(convs[-1])
    builder.channels(stream, ("classifier.1.weight", 1))
    groups = builder.build()
    if "classifier.1.weight" in layout.tensors:
        return groups
    return [g for g in groups if (output, 0) not in g.members]


def _segments(structure: Structure) -> list[DepthSegment]:
    """One segment per stage; its layers are the stage's blocks (CLAFusion §3.1 aligns blocks within a stage).

    A block is represented by its second convolution's BatchNorm output (the paper's "activation of
    the second convolution layer in each block", before any ReLU); its width is the stage's channels.
    A stage's first block changes width and resolution through its shortcut; the alignment's a(1) = 1
    keeps it matched, so it is never an added block.
    """
    stages: dict[int, list[str]] = {}
    for name in structure.modules:
        match = _BLOCK.fullmatch(name)
        if match:
            stages.setdefault(int(match["stage"]), []).append(name)
    segments = []
    for stage in sorted(stages):
        layers = []
        for block in stages[stage]:
            convs = list(takewhile(structure.modules.__contains__, (f"{block}.layer.{i}" for i in count())))
            width = structure.shapes[f"{convs[-1]}.normalization.weight"][0]
            layers.append(DepthLayer((block,), width, f"{convs[1]}.normalization", output=f"{block}.activation"))
        segments.append(DepthSegment(f"stage {stage + 1}", tuple(layers)))
    return segments


def _deepen(config: object, plan: list[list[int | None]]) -> object:
    """The config with ``len(plan[s])`` blocks in stage s (the widths are the stage's)."""
    out = type(config).from_dict(config.to_dict())  # type: ignore[attr-defined]
    out.depths = [len(stage) for stage in plan]
    return out


def _zero_block(model: torch.nn.Module, layer: DepthLayer) -> None:
    """A block whose residual branch outputs zero: zero kernels (§3.2), BatchNorms that pass zero on.

    Its identity shortcut then carries the input x through the final ReLU unchanged, as x ≥ 0.
    """
    block = model.get_submodule(layer.modules[0])
    if not isinstance(getattr(block, "shortcut", None), torch.nn.Identity):
        raise ValueError(f"{layer.modules[0]} changes width or resolution: it cannot be an added block")
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                neutral_batch_norm(module)


def _zero_block_activation(module: str, layer: DepthLayer, previous: DepthLayer,
                           activation: Callable[[str], torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """What a zero-branch block shows: its stream, before and after its ReLU, is its input, the previous
    block's output; every BatchNorm inside it outputs zeros, at the stage's resolution."""
    if module in (f"{layer.modules[0]}.activation#input", layer.output):
        return layer_output(previous, activation)
    shape = activation(previous.representation).shape
    width = model.get_submodule(module).num_features
    return torch.zeros((shape[0], width, *shape[2:]), dtype=torch.float32)


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A basic-block ResNet of two stages, one block each, widths 8 and 16."""
    from transformers import ResNetConfig

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **labels)
    return config, "ResNetForImageClassification"


RESNET = register_family(
    FamilyAdapter(
        name="resnet",
        model_types=("resnet",),
        architectures={"ResNetForImageClassification": "image-classification", "ResNetModel": "image-feature-extraction"},
        heads={"ResNetForImageClassification": (HeadSpec(r"classifier\.1\.(weight|bias)"),)},
        default_architecture="ResNetForImageClassification",
        backbone_prefix="resnet",
        neurons=_neurons,
        depth=DepthSpec(_segments, _deepen, _zero_block, _zero_block_activation,
                        segment_kind="the blocks of each stage",
                        identity_layer="a block whose convolutions have zero kernels, so that its identity shortcut "
                                       "carries the input",
                        segment_plural="stages"),
        tiny={"resnet": TinyVariant(_tiny, image_size=32)},
    )
)
