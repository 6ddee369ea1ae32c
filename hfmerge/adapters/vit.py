"""ViT (google/vit-*) image classifiers and feature extractors."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, register_family

VIT = register_family(
    FamilyAdapter(
        name="vit",
        model_types=("vit",),
        architectures={"ViTForImageClassification": "image-classification", "ViTModel": "image-feature-extraction"},
        heads={"ViTForImageClassification": (HeadSpec(r"classifier\.(weight|bias)"),)},
        default_architecture="ViTForImageClassification",
        backbone_prefix="vit",
        blocks=((r"(.+\.)?layers\.\d+\.attention", "attention"), (r"(.+\.)?layers\.\d+\.mlp", "mlp")),
        shared_inputs=(SharedInput(r"(?P<block>(.+\.)?layers\.\d+\.attention)\.(q_proj|k_proj|v_proj)"),),
    )
)
