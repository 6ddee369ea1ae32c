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
    from hfmerge.methods.ot.alignment import align_layer
    from hfmerge.methods.gating.similarity import layer_similarity, select_gated
    from hfmerge.methods.ot.cross_layer import cross_layer_alignment
    from hfmerge.io.loading import load
    from hfmerge.methods import available_methods
    from hfmerge.run.pipeline import merge, plan_merge, run_recipe
    from hfmerge.run.planned import PlannedMerge
    from hfmerge.recipe import Recipe
    from hfmerge.publish.result import MergeResult
    from hfmerge.source import SourceSpec
    from hfmerge.publish.space import SpaceOptions, push_space, save_space

__version__ = "0.1.0"

_LAZY = {
    "load": "hfmerge.io.loading",
    "align_layer": "hfmerge.methods.ot.alignment", "cross_layer_alignment": "hfmerge.methods.ot.cross_layer",
    "layer_similarity": "hfmerge.methods.gating.similarity", "select_gated": "hfmerge.methods.gating.similarity",
    "PlannedMerge": "hfmerge.run.planned", "merge": "hfmerge.run.pipeline", "plan_merge": "hfmerge.run.pipeline",
    "run_recipe": "hfmerge.run.pipeline",
    "available_methods": "hfmerge.methods",
    "Recipe": "hfmerge.recipe", "SourceSpec": "hfmerge.source",
    "MergeResult": "hfmerge.publish.result",
    "SpaceOptions": "hfmerge.publish.space", "push_space": "hfmerge.publish.space", "save_space": "hfmerge.publish.space",
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
