"""hfmerge's multi-layer perceptron image classifiers (:mod:`hfmerge.modeling.classic`), OTFusion's classic setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModelForImageClassification

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family
from hfmerge.adapters.neurons import GroupBuilder, NeuronGroup
from hfmerge.modeling.classic import HfMergeMLPConfig, MLPForImageClassification, MODELING_FILE, MLP_TYPE

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout


def _neurons(layout: ModelLayout) -> list[NeuronGroup]:
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
    )
)

# transformers' Auto classes know the type once hfmerge is imported: configs load without remote code
AutoConfig.register(MLP_TYPE, HfMergeMLPConfig, exist_ok=True)
AutoModelForImageClassification.register(HfMergeMLPConfig, MLPForImageClassification, exist_ok=True)
