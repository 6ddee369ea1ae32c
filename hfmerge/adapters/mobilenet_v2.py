"""MobileNetV2 image classifiers and DeepLabV3 semantic segmentation models."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup, norm_members

_BLOCK = re.compile(r"(?P<prefix>(?:.+\.)?)(?:layer\.\d+|conv_stem)")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """MobileNetV2's neuron groups: each inverted residual block's expansion channels, and the last 1x1's.

    In a block, ``expand_1x1`` widens the stream, the depthwise ``conv_3x3``
    filters each expanded channel on its own (its dim 0 and its BatchNorm index
    them; its dim 1 has size 1) and ``reduce_1x1`` reads them (dim 1): one
    group, observed at the depthwise BatchNorm's output, the input of
    ``reduce_1x1`` before ReLU6. The stem's ``first_conv`` feeds the depthwise
    convolution directly where ``first_layer_is_expansion`` (the default) leaves
    the stem without ``expand_1x1``, and is then part of that group; otherwise it
    is a group of its own, read by ``expand_1x1``. ``conv_1x1``'s channels,
    which the classifier reads, are a group in an image classifier; the other
    architectures output them (or drop them), so they stay in place there.

    The streams between blocks (``reduce_1x1``'s outputs, added up where a block
    keeps its width and resolution) are not groups: this issue aligns the
    expansion channels only, so those dimensions keep their order.
    """
    modules = layout.module_classes
    builder = GroupBuilder(layout)
    prefix = ""

    def conv(module: str) -> str:
        return f"{module}.convolution.weight"

    def layer(key: str, module: str) -> None:
        builder.produced_by(key, conv(module)).channels(key, *norm_members(f"{module}.normalization"))

    for block in (name for name in modules if _BLOCK.fullmatch(name)):
        prefix = _BLOCK.fullmatch(block)["prefix"]  # type: ignore[index]
        expanded = f"{block} (expansion)"
        if block.endswith("conv_stem"):
            layer(f"{block}.first_conv", f"{block}.first_conv")
            if f"{block}.expand_1x1" in modules:
                builder.channels(f"{block}.first_conv", (conv(f"{block}.expand_1x1"), 1),
                                 name=f"{block}.first_conv (channels)")
                builder.observed_at(f"{block}.first_conv", f"{block}.first_conv.normalization")
            else:
                builder.same(expanded, f"{block}.first_conv")
        layer(expanded, f"{block}.expand_1x1")
        layer(expanded, f"{block}.conv_3x3")
        builder.channels(expanded, (conv(f"{block}.reduce_1x1"), 1), name=expanded)
        builder.observed_at(expanded, f"{block}.conv_3x3.normalization")
    if "classifier.weight" in layout.tensors:
        last = f"{prefix}conv_1x1"
        layer(last, last)
        builder.channels(last, ("classifier.weight", 1), name=f"{last} (channels)")
        builder.observed_at(last, f"{last}.normalization")
    return builder.build()


def _tiny(architecture: str) -> Callable[..., tuple[Any, str]]:
    """A MobileNetV2 of depth multiplier 0.25 on 32 px images, as ``architecture``."""

    def config(**labels: Any) -> tuple[Any, str]:
        from transformers import MobileNetV2Config

        return MobileNetV2Config(image_size=32, depth_multiplier=0.25, **labels), architecture

    return config


MOBILENET_V2 = register_family(
    FamilyAdapter(
        name="mobilenet_v2",
        model_types=("mobilenet_v2",),
        architectures={
            "MobileNetV2ForImageClassification": "image-classification",
            "MobileNetV2ForSemanticSegmentation": "image-segmentation",
            "MobileNetV2Model": "image-feature-extraction",
        },
        heads={
            "MobileNetV2ForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),),
            "MobileNetV2ForSemanticSegmentation": (HeadSpec(r"segmentation_head\.classifier\.convolution\.(weight|bias)"),),
        },
        default_architecture="MobileNetV2ForImageClassification",
        backbone_prefix="mobilenet_v2",
        neurons=_neurons,
        gating_gate="MobileNetV2ForImageClassification",
        tiny={"mobilenet_v2": TinyVariant(_tiny("MobileNetV2ForImageClassification"), image_size=32),
              "mobilenet_v2-seg": TinyVariant(_tiny("MobileNetV2ForSemanticSegmentation"), image_size=32)},
    )
)
