"""hfmerge's VGG-style CNN image classifiers (:mod:`hfmerge.modeling.classic`), OTFusion's and CLAFusion's CNNs."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from transformers import AutoConfig, AutoModelForImageClassification

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family
from hfmerge.adapters.neurons import GroupBuilder, NeuronGroup, norm_members
from hfmerge.modeling.classic import HfMergeVGGConfig, VGGForImageClassification, MODELING_FILE, VGG_TYPE

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout

_FEATURE = re.compile(r"features\.(\d+)")


def _neurons(layout: ModelLayout) -> list[NeuronGroup]:
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
    )
)

# transformers' Auto classes know the type once hfmerge is imported: configs load without remote code
AutoConfig.register(VGG_TYPE, HfMergeVGGConfig, exist_ok=True)
AutoModelForImageClassification.register(HfMergeVGGConfig, VGGForImageClassification, exist_ok=True)
