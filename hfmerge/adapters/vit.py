"""ViT (google/vit-*) image classifiers and feature extractors."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup

_LAYER = re.compile(r"(?:.+\.)?layers\.\d+")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """ViT's neuron groups, two per layer: the MLP's hidden neurons and the attention heads.

    MLP: ``fc1``'s rows and bias make the hidden neurons, ``fc2`` reads them
    (input columns, dim 1); they are observed at ``fc1``'s output, before GELU.
    Attention: a head is ``head_dim`` consecutive rows of q, k and v (and their
    biases) and as many input columns of ``o_proj``; heads move as wholes, since
    queries and keys of one head must keep one order among themselves (their
    dot product sums over it). They are observed at the q, k and v outputs.

    The residual stream (hidden size: the patch embedding, class token,
    position embeddings, every LayerNorm, ``o_proj`` and ``fc2`` rows, q, k,
    v and fc1 columns, the classifier's input) is one optional group, aligned
    only when asked: LayerNorm normalises over the stream's channels in any
    order, so permuting all of them together keeps the function. It is
    observed where it is written: the embeddings' output and every ``o_proj``
    and ``fc2`` output. A headless ``ViTModel`` outputs the stream: it has no
    such group.
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
    if "classifier.weight" in layout.tensors:
        _residual_stream(builder, layout)
    return builder.build()


def _residual_stream(builder: GroupBuilder, layout: LayoutView) -> None:
    """The optional group of ViT's residual stream, from the patch embedding to the classifier's input."""
    names = layout.tensors
    embeddings = next(m for m in layout.module_classes if m.endswith("embeddings") and f"{m}.cls_token" in names)
    stream = "residual"
    projection = f"{embeddings}.patch_embeddings.projection"
    builder.produced_by(stream, f"{projection}.weight", f"{projection}.bias")
    builder.channels(stream, (f"{embeddings}.cls_token", 2), (f"{embeddings}.position_embeddings", 2),
                     name="vit (residual stream)", optional=True)
    builder.observed_at(stream, embeddings, dim=-1)
    for layer in (name for name in layout.module_classes if _LAYER.fullmatch(name)):
        attention, mlp = f"{layer}.attention", f"{layer}.mlp"
        for norm in ("layernorm_before", "layernorm_after"):
            builder.channels(stream, (f"{layer}.{norm}.weight", 0), (f"{layer}.{norm}.bias", 0))
        builder.channels(stream, *((f"{attention}.{p}_proj.weight", 1) for p in "qkv"), (f"{mlp}.fc1.weight", 1))
        builder.produced_by(stream, f"{attention}.o_proj.weight", f"{attention}.o_proj.bias",
                            f"{mlp}.fc2.weight", f"{mlp}.fc2.bias")
        builder.observed_at(stream, f"{attention}.o_proj", f"{mlp}.fc2", dim=-1)
    final = embeddings.rsplit(".", 1)[0] + ".layernorm" if "." in embeddings else "layernorm"
    builder.channels(stream, (f"{final}.weight", 0), (f"{final}.bias", 0), ("classifier.weight", 1))


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A ViT of hidden size 32, two layers of two heads, on 16 px images in 4 px patches."""
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, **labels)
    return config, "ViTForImageClassification"


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
        gating_source="ViTForImageClassification",
        tiny={"vit": TinyVariant(_tiny, image_size=16)},
    )
)
