"""SegFormer (nvidia/segformer-*, mit-*) semantic segmentation and image classification."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family

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
    )
)
