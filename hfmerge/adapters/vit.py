"""ViT (google/vit-*) image classifiers and feature extractors."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden, residual_stream

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
    head_dim = layout.config.hidden_size // layout.config.num_attention_heads
    layers = [name for name in layout.module_classes if _LAYER.fullmatch(name)]
    builder = GroupBuilder(layout)
    for layer in layers:
        attention_heads(builder, f"{layer}.attention", head_dim)
        mlp_hidden(builder, f"{layer}.mlp")
    if "classifier.weight" in layout.tensors:
        names = layout.tensors
        embeddings = next(m for m in layout.module_classes if m.endswith("embeddings") and f"{m}.cls_token" in names)
        final = embeddings.rsplit(".", 1)[0] + ".layernorm" if "." in embeddings else "layernorm"
        residual_stream(builder, name="vit (residual stream)", embeddings=embeddings,
                        tokens=("cls_token", "position_embeddings"), layers=layers, final_norms=(final,),
                        readers=("classifier.weight",))
    return builder.build()


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
