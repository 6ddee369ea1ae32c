"""hfmerge's multi-layer perceptron image classifiers (:mod:`hfmerge.modeling.classic`), OTFusion's classic setting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, TinyVariant, register_family
from hfmerge.adapters.depth import DepthLayer, DepthSegment, DepthSpec, Structure, relu_of_previous, widths_with_added
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.modeling import MLP_TYPE, MODELING_FILE

if TYPE_CHECKING:  # the classes load when the family is first looked up (_register_classes), not with the adapter
    from hfmerge.modeling.classic import HfMergeMLPConfig


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """One group per hidden layer: ``layers.{i}``'s rows and bias, read by the next layer's columns (dim 1).

    Observed at the layer's output, before its ReLU (the pre-activations OTFusion compares).
    """
    count = sum(1 for name in layout.module_classes if name.startswith("layers.") and name.count(".") == 1)
    builder = GroupBuilder(layout)
    for i in range(count):
        key = f"layers.{i}"
        reader = f"layers.{i + 1}.weight" if i + 1 < count else "classifier.weight"
        builder.produced_by(key, f"{key}.weight", f"{key}.bias")
        builder.channels(key, (reader, 1), name=f"{key} (hidden)")
        builder.observed_at(key, key, dim=-1)
    return builder.build()


def _segments(structure: Structure) -> list[DepthSegment]:
    """All hidden layers in one segment, each represented by its pre-activation (the linear layer's output)."""
    count = sum(1 for name in structure.modules if name.startswith("layers.") and name.count(".") == 1)
    layers = tuple(DepthLayer((f"layers.{i}",), structure.shapes[f"layers.{i}.weight"][0], f"layers.{i}")
                   for i in range(count))
    return [DepthSegment("hidden layers", layers)]


def _deepen(config: HfMergeMLPConfig, plan: list[list[int | None]]) -> HfMergeMLPConfig:
    """``hidden_sizes`` with an added layer as wide as the layer before it wherever ``plan`` has ``None``."""
    out = type(config).from_dict(config.to_dict())
    out.hidden_sizes = widths_with_added(
        config.hidden_sizes, plan[0],
        why_not_first="an identity layer cannot open the MLP: its input (the image) may be negative")
    return out


def _identity(model: torch.nn.Module, layer: DepthLayer) -> None:
    """§3.2, adding layers: W = I, b = 0, so ReLU(W x) = x for the previous layer's x ≥ 0."""
    linear = model.get_submodule(layer.modules[0])
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        linear.bias.zero_()


def _merged(config: HfMergeMLPConfig, keep: list[list[int]]) -> HfMergeMLPConfig:
    """``hidden_sizes`` of the kept layers only (§3.2, merging layers)."""
    out = type(config).from_dict(config.to_dict())
    out.hidden_sizes = [config.hidden_sizes[i] for i in keep[0]]
    return out


_TINY_SIZE = 8


def _tiny(**labels: Any) -> tuple[Any, str]:
    """An MLP of two hidden layers (16 and 12 neurons) on 8 px images."""
    from hfmerge.modeling.classic import HfMergeMLPConfig

    return HfMergeMLPConfig(image_size=_TINY_SIZE, hidden_sizes=[16, 12], **labels), "MLPForImageClassification"


def _register_classes() -> None:
    """transformers' Auto classes learn the type, so that its configs and models load without remote code."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from hfmerge.modeling.classic import HfMergeMLPConfig, MLPForImageClassification

    AutoConfig.register(MLP_TYPE, HfMergeMLPConfig, exist_ok=True)
    AutoModelForImageClassification.register(HfMergeMLPConfig, MLPForImageClassification, exist_ok=True)


MLP = register_family(
    FamilyAdapter(
        name="mlp",
        model_types=(MLP_TYPE,),
        architectures={"MLPForImageClassification": "image-classification"},
        heads={"MLPForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="MLPForImageClassification",
        classes="hfmerge.modeling.classic",
        files={MODELING_FILE: "hfmerge.modeling.classic"},
        neurons=_neurons,
        depth=DepthSpec(_segments, _deepen, _identity, relu_of_previous, merge=_merged,
                        segment_kind="the hidden layers",
                        identity_layer="a linear layer with identity weights and a ReLU"),
        tiny={"mlp": TinyVariant(_tiny, image_size=_TINY_SIZE)},
        register_classes=_register_classes,
    )
)
