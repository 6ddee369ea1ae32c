"""hfmerge: merge fine-tuned vision models from the Hugging Face Hub and publish the result.

The public names below are imported on first use (PEP 562), so that
``import hfmerge`` — and with it ``hfmerge --help`` — loads neither torch nor
transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hfmerge.errors import (
    HfMergeError,
    HubUnreachableError,
    IncompatibleModelsError,
    MergeNumericError,
    OutputExistsError,
    PublishError,
    RecipeError,
    SourceError,
    TransportError,
)

if TYPE_CHECKING:
    from hfmerge.alignment import align_layer
    from hfmerge.analysis import layer_similarity, select_gated
    from hfmerge.cross_layer import cross_layer_alignment
    from hfmerge.loading import load
    from hfmerge.methods import available_methods
    from hfmerge.pipeline import merge, plan_merge, run_recipe
    from hfmerge.planned import PlannedMerge
    from hfmerge.recipe import Recipe
    from hfmerge.result import MergeResult
    from hfmerge.source import SourceSpec
    from hfmerge.space import SpaceOptions, push_space, save_space

__version__ = "0.1.0"

_LAZY = {
    "load": "hfmerge.loading",
    "align_layer": "hfmerge.alignment", "cross_layer_alignment": "hfmerge.cross_layer",
    "layer_similarity": "hfmerge.analysis", "select_gated": "hfmerge.analysis",
    "PlannedMerge": "hfmerge.planned", "merge": "hfmerge.pipeline", "plan_merge": "hfmerge.pipeline",
    "run_recipe": "hfmerge.pipeline",
    "available_methods": "hfmerge.methods",
    "Recipe": "hfmerge.recipe", "SourceSpec": "hfmerge.source",
    "MergeResult": "hfmerge.result",
    "SpaceOptions": "hfmerge.space", "push_space": "hfmerge.space", "save_space": "hfmerge.space",
}

__all__ = [
    "HfMergeError", "HubUnreachableError", "IncompatibleModelsError", "MergeNumericError", "MergeResult",
    "OutputExistsError",
    "PlannedMerge", "PublishError", "Recipe", "RecipeError", "SourceError", "SourceSpec", "SpaceOptions",
    "TransportError", "align_layer", "available_methods", "cross_layer_alignment", "layer_similarity", "load", "merge", "plan_merge",
    "push_space", "run_recipe", "save_space", "select_gated",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hfmerge' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
