"""ResNet (microsoft/resnet-*) image classifiers; the head is ``classifier.1`` after a Flatten."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, register_family

RESNET = register_family(
    FamilyAdapter(
        name="resnet",
        model_types=("resnet",),
        architectures={"ResNetForImageClassification": "image-classification", "ResNetModel": "image-feature-extraction"},
        heads={"ResNetForImageClassification": (HeadSpec(r"classifier\.1\.(weight|bias)"),)},
        default_architecture="ResNetForImageClassification",
        backbone_prefix="resnet",
    )
)
