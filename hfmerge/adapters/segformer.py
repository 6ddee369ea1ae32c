"""SegFormer (nvidia/segformer-*, mit-*) semantic segmentation and image classification."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, register_family

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
    )
)
