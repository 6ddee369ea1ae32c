"""One adapter per model family; importing this package registers them all."""

from hfmerge.adapters.base import FamilyAdapter, HeadSpec, family_for_model_type, register_family, supported_families
from hfmerge.adapters import mask2former, mlp, mobilenet_v2, resnet, segformer, upernet, vgg, vit  # noqa: F401  (registration)
from hfmerge.adapters.layout import ModelLayout, TensorInfo, inspect_source

__all__ = [
    "FamilyAdapter", "HeadSpec", "ModelLayout", "TensorInfo",
    "family_for_model_type", "inspect_source", "register_family", "supported_families",
]
