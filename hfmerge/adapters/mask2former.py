"""Mask2Former universal (semantic, instance, panoptic) segmentation.

The class predictor has ``num_labels + 1`` outputs: the last is "no object",
which belongs to no label set, so fusion averages it rather than stacking it.
The loss criterion (its class weights follow the label space, so fusion
concatenates them too) is not a layer. Mask2Former's forward cannot run on the
meta device, so its forward order is traced on a tiny copy (``_trace_config``).
"""

from __future__ import annotations

import copy
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family


def _trace_config(config: Any) -> Any:
    """``config`` with small widths and few queries; depths, levels and so module names unchanged.

    32 is the smallest decoder width: the pixel decoder's GroupNorms have 32 groups.
    """
    small = copy.deepcopy(config)
    small.feature_size = small.mask_feature_size = small.hidden_dim = 32
    small.encoder_feedforward_dim = small.dim_feedforward = 32
    small.num_attention_heads, small.num_queries = 1, 2
    backbone = small.backbone_config.to_dict()
    backbone.pop("hidden_size", None)  # derived from the widths below when the config is rebuilt
    if "embed_dim" in backbone:  # Swin: widths double per stage from embed_dim
        backbone.update(embed_dim=8, num_heads=[1] * len(backbone["num_heads"]))
    elif "hidden_sizes" in backbone:  # ResNet, ConvNeXt
        backbone.update(hidden_sizes=[8 * 2**i for i in range(len(backbone["hidden_sizes"]))])
        if "embedding_size" in backbone:
            backbone["embedding_size"] = 8
    small.backbone_config = type(small.backbone_config).from_dict(backbone)
    return small


def _tiny(**labels: Any) -> tuple[Any, str]:
    """Mask2Former of width 32 (the GroupNorms' 32 groups), four queries, on a tiny Swin."""
    from transformers import Mask2FormerConfig

    # Imported here: importing the Swin family's file at the top would register it before this one, out of
    # the file-name order in which families register.
    from hfmerge.adapters.swin import tiny_swin

    config = Mask2FormerConfig(backbone_config=tiny_swin(), feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, num_queries=4, common_stride=4, **labels)
    return config, "Mask2FormerForUniversalSegmentation"


def _tiny_processor(size: int) -> Any:
    """Its image processor: images of ``size``, 255 the label of no class in the maps."""
    from transformers import Mask2FormerImageProcessorPil

    return Mask2FormerImageProcessorPil(size={"height": size, "width": size}, ignore_index=255)


MASK2FORMER = register_family(
    FamilyAdapter(
        name="mask2former",
        model_types=("mask2former",),
        architectures={"Mask2FormerForUniversalSegmentation": "image-segmentation"},
        heads={
            "Mask2FormerForUniversalSegmentation": (
                HeadSpec(r"class_predictor\.(weight|bias)", null_rows=1),
                # The loss's per-class weights (ones, then eos_coef for "no object") follow the label space too.
                HeadSpec(r"criterion\.empty_weight", null_rows=1),
            )
        },
        default_architecture="Mask2FormerForUniversalSegmentation",
        backbone_prefix="model.pixel_level_module.encoder",
        not_layers=(r"criterion(\..*)?",),
        trace_config=_trace_config,
        blocks=(
            (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.\d+\.blocks\.\d+\.attention", "attention"),
            (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.\d+\.blocks\.\d+\.mlp", "mlp"),
            (r"model\.pixel_level_module\.decoder\.encoder\.layers\.\d+\.self_attn", "attention"),
            (r"model\.transformer_module\.decoder\.layers\.\d+\.(self_attn|cross_attn)", "attention"),
        ),
        shared_inputs=(
            SharedInput(r"(?P<block>model\.pixel_level_module\.encoder\.swin\..+\.attention)\.(q_proj|k_proj|v_proj)"),
            # Deformable attention: offsets and weights read the queries (with position); value_proj the features.
            SharedInput(
                r"(?P<block>model\.pixel_level_module\.decoder\..+\.self_attn)\.(sampling_offsets|attention_weights)"
            ),
            # Masked-attention decoder: q and k read the queries plus position embeddings, v the queries alone.
            SharedInput(r"(?P<block>model\.transformer_module\.decoder\.layers\.\d+\.self_attn)\.(q_proj|k_proj)"),
            # The class and mask predictors both read the normalised decoder output.
            SharedInput(r"class_predictor|model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.0\.0"),
        ),
        auto_classes={"Mask2FormerForUniversalSegmentation": "AutoModelForUniversalSegmentation"},
        tiny={"mask2former": TinyVariant(_tiny, image_size=64, processor=_tiny_processor)},
    )
)
