"""DINOv2 (facebook/dinov2-*) image classifiers and their backbones, the pre-trained models DINOv2 publishes up to
ViT-L (the SwiGLU ViT-g, ``dinov2-giant``, is refused at inspection: see :func:`_neurons`)."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden

_LAYER = re.compile(r"(?:dinov2\.)?encoder\.layer\.\d+")


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """DINOv2's neuron groups, two per layer: the MLP's hidden neurons and the attention heads.

    MLP: ``fc1``'s rows and bias, read by ``fc2``'s input columns. With
    ``use_swiglu_ffn`` (ViT-g) the hidden neuron i is SiLU(gate_i) · up_i in
    memory, so ``gate_proj``'s and ``up_proj``'s rows move together, read by
    ``down_proj``'s columns. Such a checkpoint stores both as one tensor
    (``mlp.weights_in``) that transformers 5 splits on load, which inspection
    refuses (:class:`~hfmerge.io.renaming.ConvertedOnLoadError`): no SwiGLU
    source reaches this declaration yet. It is kept, and tested on the model
    in memory, so that the groups are right once hfmerge reads split tensors.

    Attention: a head is ``head_dim`` rows of q, k and v and as many input
    columns of ``o_proj``, moved as a whole. Layer scale (``layer_scale1``,
    ``layer_scale2``) multiplies the blocks' outputs, which are the residual
    stream's channels: it is in no group here.

    The residual stream is not a group: ``Dinov2ForImageClassification``
    reads the concatenation of the CLS token and the mean of the patch tokens,
    so a permutation of the stream's channels would have to move both halves
    of the classifier's input columns alike, and a group moves one dimension
    of each member once. A headless ``Dinov2Model`` outputs the stream and
    keeps it in place anyway.
    """
    head_dim = layout.config.hidden_size // layout.config.num_attention_heads
    builder = GroupBuilder(layout)
    for layer in (name for name in layout.module_classes if _LAYER.fullmatch(name)):
        attention_heads(builder, f"{layer}.attention", head_dim)
        mlp_hidden(builder, f"{layer}.mlp", incoming=("fc1", "gate_proj", "up_proj"), outgoing=("fc2", "down_proj"))
    return builder.build()


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A DINOv2 of hidden size 32, two layers of two heads and an MLP of 64, on 16 px images in 4 px patches."""
    from transformers import Dinov2Config

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
                          patch_size=4, **labels)
    return config, "Dinov2ForImageClassification"


DINOV2 = register_family(
    FamilyAdapter(
        name="dinov2",
        model_types=("dinov2",),
        architectures={"Dinov2ForImageClassification": "image-classification",
                       "Dinov2Model": "image-feature-extraction"},
        heads={"Dinov2ForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="Dinov2ForImageClassification",
        backbone_prefix="dinov2",
        blocks=((r"(dinov2\.)?encoder\.layer\.\d+\.attention", "attention"),
                (r"(dinov2\.)?encoder\.layer\.\d+\.mlp", "mlp")),
        shared_inputs=(
            SharedInput(r"(?P<block>(dinov2\.)?encoder\.layer\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),
            SharedInput(r"(?P<block>(dinov2\.)?encoder\.layer\.\d+\.mlp)\.(gate_proj|up_proj)"),
        ),
        neurons=_neurons,
        gating_refusal="its gated model is a ViT's, without DINOv2's layer scale or its classifier on the CLS and mean patch tokens",
        tiny={"dinov2": TinyVariant(_tiny, image_size=16)},
    )
)
