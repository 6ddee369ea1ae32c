"""DeiT (facebook/deit-*) image classifiers, with or without the distillation head, and their backbones."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden, residual_stream

_LAYER = re.compile(r"(?:deit\.)?layers\.\d+")
_CLASSIFIERS = ("classifier.weight", "cls_classifier.weight", "distillation_classifier.weight")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """DeiT's neuron groups: a ViT's, two per layer, and its residual stream (optional).

    DeiT's layers are ViT's (Touvron et al. 2021, §4), in the same in-memory
    names: an MLP's hidden neurons are ``fc1``'s rows and ``fc2``'s input
    columns; an attention head is ``head_dim`` consecutive rows of q, k and v
    and as many input columns of ``o_proj``, moved as a whole.

    The residual stream (optional, hidden size) runs from the patch
    embedding through every LayerNorm, ``o_proj`` and ``fc2`` row to the
    final LayerNorm and the classifiers' input columns; DeiT adds the
    distillation token to it, and ``DeiTForImageClassificationWithTeacher``
    reads the stream twice, with ``cls_classifier`` (CLS token) and
    ``distillation_classifier`` (distillation token). A headless ``DeiTModel``
    outputs the stream, so it has no such group.
    """
    head_dim = layout.config.hidden_size // layout.config.num_attention_heads
    layers = [name for name in layout.module_classes if _LAYER.fullmatch(name)]
    builder = GroupBuilder(layout)
    for layer in layers:
        attention_heads(builder, f"{layer}.attention", head_dim)
        mlp_hidden(builder, f"{layer}.mlp")
    if any(name in layout.tensors for name in _CLASSIFIERS):
        residual_stream(builder, name="deit (residual stream)", embeddings="deit.embeddings",
                        tokens=("cls_token", "distillation_token", "mask_token", "position_embeddings"),
                        layers=layers, final_norms=("deit.layernorm",), readers=_CLASSIFIERS)
    return builder.build()


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A DeiT of hidden size 32, two layers of two heads, on 16 px images in 4 px patches."""
    from transformers import DeiTConfig

    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=4, **labels)
    return config, "DeiTForImageClassification"


DEIT = register_family(
    FamilyAdapter(
        name="deit",
        model_types=("deit",),
        architectures={
            "DeiTForImageClassification": "image-classification",
            "DeiTForImageClassificationWithTeacher": "image-classification",
            "DeiTModel": "image-feature-extraction",
        },
        heads={
            "DeiTForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),),
            # Two heads on one label space; the model outputs the mean of their logits.
            "DeiTForImageClassificationWithTeacher": (HeadSpec(r"cls_classifier\.(weight|bias)"),
                                                      HeadSpec(r"distillation_classifier\.(weight|bias)")),
        },
        default_architecture="DeiTForImageClassification",
        backbone_prefix="deit",
        blocks=((r"(deit\.)?layers\.\d+\.attention", "attention"), (r"(deit\.)?layers\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>(deit\.)?layers\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),),
        neurons=_neurons,
        gating_refusal="its gated model is a ViT's, without DeiT's distillation token",
        tiny={"deit": TinyVariant(_tiny, image_size=16)},
    )
)
