"""One adapter per model family; importing this package registers them all."""

from hfmerge.adapters.base import (
    FamilyAdapter, HeadSpec, TinyVariant, family_for_model_type, register_family, registered_families,
    supported_families,
)
# Registration order is the order in which hfmerge.testing.tiny lists the tiny models (tests parametrize by it).
from hfmerge.adapters import vit, resnet, mobilenet_v2, segformer, upernet, mask2former, mlp, vgg  # noqa: F401  (registration)
from hfmerge.adapters.layout import ModelLayout, TensorInfo, inspect_reference, inspect_source

__all__ = [
    "FamilyAdapter", "HeadSpec", "ModelLayout", "TensorInfo", "TinyVariant",
    "family_for_model_type", "inspect_reference", "inspect_source", "register_family", "registered_families", "supported_families",
]
