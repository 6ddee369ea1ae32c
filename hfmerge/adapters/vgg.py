"""hfmerge's VGG-style CNN image classifiers (:mod:`hfmerge.modeling.classic`), OTFusion's and CLAFusion's CNNs."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, TinyVariant, register_family
from hfmerge.adapters.depth import (
    DepthLayer,
    DepthSegment,
    DepthSpec,
    Structure,
    neutral_batch_norm,
    relu_of_previous,
    widths_with_added,
)
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup, norm_members
from hfmerge.modeling import MODELING_FILE, VGG_TYPE

if TYPE_CHECKING:  # the classes load when the family is first looked up (_register_classes), not with the adapter
    from hfmerge.modeling.classic import HfMergeVGGConfig


_FEATURE = re.compile(r"features\.(\d+)")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """One group per convolution: its output channels with its BatchNorm, read by the next convolution (dim 1).

    A max-pooling between them keeps the channels; the last convolution's
    channels are read by the classifier after the global average pooling.
    Observed at the BatchNorm's output (the convolution's without batch norm), before the ReLU.
    """
    layers = sorted((int(m[1]), cls) for name, cls in layout.module_classes.items() if (m := _FEATURE.fullmatch(name)))
    convs = [i for i, cls in layers if issubclass(cls, torch.nn.Conv2d)]
    norms = {i for i, cls in layers if issubclass(cls, torch.nn.BatchNorm2d)}
    builder = GroupBuilder(layout)
    for position, i in enumerate(convs):
        key = f"features.{i}"
        reader = f"features.{convs[position + 1]}.weight" if position + 1 < len(convs) else "classifier.weight"
        builder.produced_by(key, f"{key}.weight", f"{key}.bias")
        builder.channels(key, (reader, 1), name=f"{key} (channels)")
        if i + 1 in norms:
            builder.channels(key, *norm_members(f"features.{i + 1}"))
            builder.observed_at(key, f"features.{i + 1}")
        else:
            builder.observed_at(key, key)
    return builder.build()


def _segments(structure: Structure) -> list[DepthSegment]:
    """The convolutions between two max-poolings, one segment each (CLAFusion §3.1: VGG's groups).

    A layer is a convolution with its BatchNorm and ReLU, represented by the BatchNorm's output (the
    convolution's without batch norm), before the ReLU; its output is the ReLU's.
    """
    features = sorted((int(m[1]), cls) for name, cls in structure.modules.items() if (m := _FEATURE.fullmatch(name)))
    segments: list[DepthSegment] = []
    layers: list[DepthLayer] = []

    def close() -> None:
        if layers:
            segments.append(DepthSegment(f"convolutions {len(segments) + 1}", tuple(layers)))
            layers.clear()

    for i, cls in features:
        if issubclass(cls, torch.nn.Conv2d):
            layers.append(DepthLayer((f"features.{i}",), structure.shapes[f"features.{i}.weight"][0],
                                     f"features.{i}"))
        elif issubclass(cls, torch.nn.BatchNorm2d) and layers:
            last = layers[-1]
            layers[-1] = DepthLayer((*last.modules, f"features.{i}"), last.width, f"features.{i}")
        elif issubclass(cls, torch.nn.ReLU) and layers:
            last = layers[-1]
            layers[-1] = DepthLayer((*last.modules, f"features.{i}"), last.width, last.representation,
                                    output=f"features.{i}")
        elif issubclass(cls, torch.nn.MaxPool2d):
            close()
    close()
    return segments


def _deepen(config: HfMergeVGGConfig, plan: list[list[int | None]]) -> HfMergeVGGConfig:
    """``layers`` with an added convolution as wide as the one before it wherever ``plan`` has ``None``."""
    runs: list[list[int]] = [[]]
    for entry in config.layers:
        if entry == "M":
            runs.append([])
        else:
            runs[-1].append(int(entry))
    widths = iter(plan)
    out_layers: list[int | str] = []
    for r, run in enumerate(runs):
        if r:
            out_layers.append("M")
        if not run:
            continue
        out_layers.extend(widths_with_added(
            run, next(widths),
            why_not_first="an identity convolution cannot open a group: it would follow a max-pooling of another model"))
    out = type(config).from_dict(config.to_dict())
    out.layers = out_layers
    return out


def _identity(model: torch.nn.Module, layer: DepthLayer) -> None:
    """§3.2 for CNNs: identity (Dirac) kernels, no bias, a BatchNorm that passes its input on."""
    conv = model.get_submodule(layer.modules[0])
    with torch.no_grad():
        torch.nn.init.dirac_(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()
    for name in layer.modules[1:]:
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.BatchNorm2d):
            neutral_batch_norm(module)


_TINY_SIZE = 16


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A VGG of three convolutions (8; 12, 12) between max-poolings, with BatchNorm, on 16 px images."""
    from hfmerge.modeling.classic import HfMergeVGGConfig

    config = HfMergeVGGConfig(image_size=_TINY_SIZE, layers=[8, "M", 12, 12, "M"], batch_norm=True, **labels)
    return config, "VGGForImageClassification"


def _register_classes() -> None:
    """transformers' Auto classes learn the type, so that its configs and models load without remote code."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from hfmerge.modeling.classic import HfMergeVGGConfig, VGGForImageClassification

    AutoConfig.register(VGG_TYPE, HfMergeVGGConfig, exist_ok=True)
    AutoModelForImageClassification.register(HfMergeVGGConfig, VGGForImageClassification, exist_ok=True)


VGG = register_family(
    FamilyAdapter(
        name="vgg",
        model_types=(VGG_TYPE,),
        architectures={"VGGForImageClassification": "image-classification"},
        heads={"VGGForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="VGGForImageClassification",
        classes="hfmerge.modeling.classic",
        files={MODELING_FILE: "hfmerge.modeling.classic"},
        neurons=_neurons,
        depth=DepthSpec(_segments, _deepen, _identity, relu_of_previous,
                        segment_kind="the convolutions between two max-poolings",
                        identity_layer="a convolution with identity (Dirac) kernels",
                        segment_plural="groups of convolutions between max-poolings"),
        tiny={"vgg": TinyVariant(_tiny, image_size=_TINY_SIZE)},
        register_classes=_register_classes,
    )
)
