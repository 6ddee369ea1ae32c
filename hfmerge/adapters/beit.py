"""BEiT (microsoft/beit-*) image classifiers and their backbones."""

from __future__ import annotations

import re
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family
from hfmerge.adapters.neurons import GroupBuilder, LayoutView, NeuronGroup
from hfmerge.adapters.transformer_neurons import attention_heads, mlp_hidden, residual_stream

_LAYER = re.compile(r"(?:beit\.)?layers\.\d+")
_SHARED_BIAS = re.compile(r"(?:beit\.)?shared_position_bias")
_SHARED_HEADS = "heads (shared relative position bias)"


def _neurons(layout: LayoutView) -> list[NeuronGroup]:
    """BEiT's neuron groups: each layer's MLP hidden neurons and attention heads, and the residual stream (optional).

    MLP: ``fc1``'s rows and bias, ``fc2``'s input columns, as in ViT.
    Attention: a head is ``head_dim`` rows of q, k (no bias) and v and as many
    input columns of ``o_proj``. A relative position bias table (Bao et al.
    2022 §2.5: ``[(2w - 1)² + 3, heads]`` on a w × w patch grid) adds its column h to head h's
    attention logits, so a permutation of heads moves the table's columns too,
    one entry per head (``per_unit``, as in Swin). With
    ``use_relative_position_bias`` each layer owns a table: one head group per
    layer, the table in it. With ``use_shared_relative_position_bias`` one
    table serves every layer: head h of every layer reads its column h, so the
    heads of all layers are one group that moves together (a model with both
    kinds of table has both constraints, hence that one group).

    The residual stream (hidden size, optional) runs from the patch embedding
    (CLS and mask tokens, absolute position embeddings where used) through
    every LayerNorm and both layer-scale vectors of each layer
    (``lambda_1``, ``lambda_2``: they scale the attention's and the MLP's
    output channel by channel before the residual addition) to the final norm
    — ``beit.layernorm`` on the CLS token, or with ``use_mean_pooling``
    ``beit.pooler.layernorm`` on the mean of the patch tokens — and the
    classifier's input columns. A headless ``BeitModel`` outputs the stream:
    it has no such group.
    """
    config = layout.config
    head_dim = config.hidden_size // config.num_attention_heads
    layers = [name for name in layout.module_classes if _LAYER.fullmatch(name)]
    builder = GroupBuilder(layout)
    shared = next((name for name in layout.module_classes if _SHARED_BIAS.fullmatch(name)), None)
    if shared is not None:  # declared first, so that the joined group takes its name
        builder.channels(_SHARED_HEADS, (f"{shared}.relative_position_bias_table", 1), per_unit=True,
                         name=f"{shared} (heads of every layer)")
    for layer in layers:
        attention_heads(builder, f"{layer}.attention", head_dim,  # a table the layer lacks is skipped
                        bias_table=f"{layer}.relative_position_bias.relative_position_bias_table")
        if shared is not None:
            builder.same(_SHARED_HEADS, f"{layer}.attention")
        mlp_hidden(builder, f"{layer}.mlp")
    if "classifier.weight" in layout.tensors:
        residual_stream(builder, name="beit (residual stream)", embeddings="beit.embeddings",
                        tokens=("cls_token", "mask_token", "position_embeddings"), layers=layers,
                        layer_scales=("lambda_1", "lambda_2"), final_norms=("beit.layernorm", "beit.pooler.layernorm"),
                        readers=("classifier.weight",))
    return builder.build()


def _tiny(**labels: Any) -> tuple[Any, str]:
    """A BEiT of hidden size 32, two layers of two heads, on 16 px images in 4 px patches, set as the published
    checkpoints are: a relative position bias per layer, layer scale, mean pooling."""
    from transformers import BeitConfig

    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=4, use_relative_position_bias=True, use_mean_pooling=True,
                        layer_scale_init_value=0.1, **labels)
    return config, "BeitForImageClassification"


BEIT = register_family(
    FamilyAdapter(
        name="beit",
        model_types=("beit",),
        architectures={"BeitForImageClassification": "image-classification", "BeitModel": "image-feature-extraction"},
        heads={"BeitForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="BeitForImageClassification",
        backbone_prefix="beit",
        blocks=((r"(beit\.)?layers\.\d+\.attention", "attention"), (r"(beit\.)?layers\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>(beit\.)?layers\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),),
        neurons=_neurons,
        gating_refusal="its gated model is a ViT's, without BEiT's relative position bias, layer scale or mean pooling",
        tiny={"beit": TinyVariant(_tiny, image_size=16)},
    )
)
