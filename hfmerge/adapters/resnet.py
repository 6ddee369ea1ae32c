"""ResNet (microsoft/resnet-*) image classifiers; the head is ``classifier.1`` after a Flatten."""

from __future__ import annotations

import re
from itertools import count, takewhile
from typing import TYPE_CHECKING

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family
from hfmerge.adapters.neurons import GroupBuilder, NeuronGroup, norm_members

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout

_BLOCK = re.compile(r"(?P<prefix>(?:.+\.)?)encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)")


def _neurons(layout: ModelLayout) -> list[NeuronGroup]:
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
    A stream is observed where it is written, before any ReLU: at the
    BatchNorm outputs of its blocks' last convolutions and of its shortcut
    convolution, and, when the stem writes into it, at the stem's (pooled)
    output; a set inside a block at its BatchNorm's output. Block outputs,
    after the ReLU that follows the addition, would not do: a channel that is
    zero on every image of the data (dead on it) looks like every other such
    channel, and optimal transport could pair them either way.

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
            builder.observed_at(residual, f"{convs[-1]}.normalization")
            if f"{shortcut}.convolution" in modules:
                builder.observed_at(residual, f"{shortcut}.normalization")
            stream, output = residual, conv(convs[-1])
    builder.channels(stream, ("classifier.1.weight", 1))
    groups = builder.build()
    if "classifier.1.weight" in layout.tensors:
        return groups
    return [g for g in groups if (output, 0) not in g.members]


RESNET = register_family(
    FamilyAdapter(
        name="resnet",
        model_types=("resnet",),
        architectures={"ResNetForImageClassification": "image-classification", "ResNetModel": "image-feature-extraction"},
        heads={"ResNetForImageClassification": (HeadSpec(r"classifier\.1\.(weight|bias)"),)},
        default_architecture="ResNetForImageClassification",
        backbone_prefix="resnet",
        neurons=_neurons,
    )
)
