"""ViT (google/vit-*) image classifiers and feature extractors."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, register_family
from hfmerge.adapters.neurons import GroupBuilder, NeuronGroup

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout

_LAYER = re.compile(r"(?:.+\.)?layers\.\d+")


def _neurons(layout: ModelLayout) -> list[NeuronGroup]:
    """ViT's neuron groups, two per layer: the MLP's hidden neurons and the attention heads.

    MLP: ``fc1``'s rows and bias make the hidden neurons, ``fc2`` reads them
    (input columns, dim 1); they are observed at ``fc1``'s output, before GELU.
    Attention: a head is ``head_dim`` consecutive rows of q, k and v (and their
    biases) and as many input columns of ``o_proj``; heads move as wholes, since
    queries and keys of one head must keep one order among themselves (their
    dot product sums over it). They are observed at the q, k and v outputs.

    The residual stream (hidden size: the patch embedding, class token,
    position embeddings, every LayerNorm, ``o_proj`` and ``fc2`` rows, the
    classifier's input) is left as it is: no group holds it.
    """
    modules = layout.module_classes
    head_dim = layout.config.hidden_size // layout.config.num_attention_heads
    builder = GroupBuilder(layout)
    for layer in (name for name in modules if _LAYER.fullmatch(name)):
        attention, mlp = f"{layer}.attention", f"{layer}.mlp"
        projections = [f"{attention}.{p}_proj" for p in "qkv"]
        builder.produced_by(attention, *(f"{p}.{t}" for p in projections for t in ("weight", "bias")))
        builder.channels(attention, (f"{attention}.o_proj.weight", 1), unit=head_dim, name=f"{attention} (heads)")
        builder.observed_at(attention, *projections, dim=-1)
        builder.produced_by(mlp, f"{mlp}.fc1.weight", f"{mlp}.fc1.bias")
        builder.channels(mlp, (f"{mlp}.fc2.weight", 1), name=f"{mlp} (hidden)")
        builder.observed_at(mlp, f"{mlp}.fc1", dim=-1)
    return builder.build()


VIT = register_family(
    FamilyAdapter(
        name="vit",
        model_types=("vit",),
        architectures={"ViTForImageClassification": "image-classification", "ViTModel": "image-feature-extraction"},
        heads={"ViTForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="ViTForImageClassification",
        backbone_prefix="vit",
        blocks=((r"(.+\.)?layers\.\d+\.attention", "attention"), (r"(.+\.)?layers\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>(.+\.)?layers\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),),
        neurons=_neurons,
    )
)
