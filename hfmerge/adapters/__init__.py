"""One adapter per model family; importing this package registers them all.

Every module here but the shared ones (:data:`SHARED`) is a family's adapter file, which registers
itself with :func:`register_family`: a new family is one file, found without editing this package.
Families register in the order of their file names, which is the order in which
:mod:`hfmerge.testing.tiny` lists their tiny models.
"""

import importlib
import pkgutil

from hfmerge.adapters.base import (
    FamilyAdapter,
    HeadSpec,
    OutputFormat,
    TinyVariant,
    family_for_model_type,
    mark_built_in,
    register_family,
    registered_families,
    supported_families,
)
from hfmerge.adapters.layout import ModelLayout, TensorInfo, inspect_reference, inspect_source

SHARED = frozenset({"base", "class_facts", "depth", "forward_order", "layout", "neurons", "transformer_neurons"})
"""The modules the adapters share (inspection and its cache, neuron groups and a transformer layer's, depth,
tracing)."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
mark_built_in()

__all__ = [
    "SHARED", "FamilyAdapter", "HeadSpec", "ModelLayout", "OutputFormat", "TensorInfo", "TinyVariant",
    "family_for_model_type", "inspect_reference", "inspect_source", "register_family", "registered_families",
    "supported_families",
]
