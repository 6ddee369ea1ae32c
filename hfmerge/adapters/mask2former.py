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

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family


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
    )
)
