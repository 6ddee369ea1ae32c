"""SegFormer (nvidia/segformer-*, mit-*) semantic segmentation and image classification."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, TinyVariant, register_family


def _tiny(architecture: str) -> Callable[..., tuple[Any, str]]:
    """A SegFormer of two stages, one block each, widths 8 and 16, as ``architecture``."""

    def config(**labels: Any) -> tuple[Any, str]:
        from transformers import SegformerConfig

        return SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                               num_attention_heads=[1, 2], decoder_hidden_size=16, patch_sizes=[7, 3],
                               strides=[4, 2], mlp_ratios=[2, 2], **labels), architecture

    return config


SEGFORMER = register_family(
    FamilyAdapter(
        name="segformer",
        model_types=("segformer",),
        architectures={
            "SegformerForSemanticSegmentation": "image-segmentation",
            "SegformerForImageClassification": "image-classification",
            "SegformerModel": "image-feature-extraction",
        },
        heads={
            "SegformerForSemanticSegmentation": (HeadSpec(r"decode_head\.classifier\.(weight|bias)"),),
            "SegformerForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),),
        },
        default_architecture="SegformerForSemanticSegmentation",
        backbone_prefix="segformer",
        blocks=((r"(.+\.)?stages\.\d+\.blocks\.\d+\.attention", "attention"),
                (r"(.+\.)?stages\.\d+\.blocks\.\d+\.mlp", "mlp")),
        # Keys and values read the spatially reduced hidden states where a block reduces them (sr_ratio > 1).
        shared_inputs=(
            SharedInput(r"(?P<block>(.+\.)?blocks\.\d+\.attention)\.(q_proj|k_proj|v_proj)",
                        unless="{block}.sequence_reduction"),
            SharedInput(r"(?P<block>(.+\.)?blocks\.\d+\.attention)\.(k_proj|v_proj)"),
        ),
        tiny={"segformer": TinyVariant(_tiny("SegformerForSemanticSegmentation"), image_size=32),
              "segformer-cls": TinyVariant(_tiny("SegformerForImageClassification"), image_size=32)},
    )
)
