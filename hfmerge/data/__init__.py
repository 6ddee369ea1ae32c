"""Datasets for the data-dependent stages: what the user named (:mod:`.spec`), the images read from it (:mod:`.load`)
and the model's image processor they go through (:mod:`.processor`).

The loading names are imported on first use (PEP 562), so that a recipe can
parse ``--data`` without loading torch or ``datasets``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hfmerge.data.spec import DataSpec, resolve_data_specs

if TYPE_CHECKING:
    from hfmerge.data.load import ImageData, ProcessedImages, label_map_for, load_image_data

_LAZY = dict.fromkeys(("ImageData", "ProcessedImages", "label_map_for", "load_image_data"), "hfmerge.data.load")

__all__ = ["DataSpec", "ImageData", "ProcessedImages", "label_map_for", "load_image_data", "resolve_data_specs"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hfmerge.data' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
