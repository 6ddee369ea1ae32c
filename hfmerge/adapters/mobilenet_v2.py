"""MobileNetV2 image classifiers and DeepLabV3 semantic segmentation models."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family

MOBILENET_V2 = register_family(
    FamilyAdapter(
        name="mobilenet_v2",
        model_types=("mobilenet_v2",),
        architectures={
            "MobileNetV2ForImageClassification": "image-classification",
            "MobileNetV2ForSemanticSegmentation": "image-segmentation",
            "MobileNetV2Model": "image-feature-extraction",
        },
        heads={
            "MobileNetV2ForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),),
            "MobileNetV2ForSemanticSegmentation": (HeadSpec(r"segmentation_head\.classifier\.convolution\.(weight|bias)"),),
        },
        default_architecture="MobileNetV2ForImageClassification",
        backbone_prefix="mobilenet_v2",
    )
)
