"""hfmerge: merge fine-tuned vision models from the Hugging Face Hub and publish the result.

The public names below are imported on first use (PEP 562), so that
``import hfmerge`` — and with it ``hfmerge --help`` — loads neither torch nor
transformers.

Other packages add merge methods and model families through the entry-point
groups ``hfmerge.methods`` and ``hfmerge.families`` (:mod:`hfmerge.plugins`):
a :class:`MergeMethod` subclass, a :class:`FamilyAdapter` instance.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hfmerge.errors import (
    DataError,
    DiskSpaceError,
    EvaluationError,
    HfMergeError,
    HubUnreachableError,
    IncompatibleModelsError,
    MergeNumericError,
    OutputExistsError,
    PublishError,
    RecipeError,
    SourceError,
    StatisticsError,
    TrainingError,
    TransportError,
)

if TYPE_CHECKING:
    from hfmerge.adapters.base import FamilyAdapter, HeadSpec, SharedInput, register_family, supported_families
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.loading import load
    from hfmerge.methods import MergeMethod, ParamSpec, available_methods, get_method, register_method
    from hfmerge.methods.gating.similarity import layer_similarity, select_gated
    from hfmerge.methods.ot.alignment import align_layer
    from hfmerge.methods.ot.cross_layer import cross_layer_alignment
    from hfmerge.methods.stages import (
        Analyse,
        Compare,
        Comparison,
        DataNeed,
        Derive,
        Derived,
        FineTune,
        FineTuning,
        Phase,
        Stage,
        Statistics,
    )
    from hfmerge.publish.result import MergeResult
    from hfmerge.publish.space import SpaceOptions, push_space, save_space
    from hfmerge.recipe import PlannedMerge, Recipe
    from hfmerge.run.pipeline import merge, plan_merge, run_recipe
    from hfmerge.source import SourceSpec

__version__ = "0.1.0"

_LAZY = {
    "load": "hfmerge.loading",
    "align_layer": "hfmerge.methods.ot.alignment", "cross_layer_alignment": "hfmerge.methods.ot.cross_layer",
    "layer_similarity": "hfmerge.methods.gating.similarity", "select_gated": "hfmerge.methods.gating.similarity",
    "PlannedMerge": "hfmerge.recipe", "merge": "hfmerge.run.pipeline", "plan_merge": "hfmerge.run.pipeline",
    "run_recipe": "hfmerge.run.pipeline",
    # plug-ins: a method, its stages and plan, a family (the packages import the built-in ones as they register)
    "MergeMethod": "hfmerge.methods", "ParamSpec": "hfmerge.methods", "register_method": "hfmerge.methods",
    "get_method": "hfmerge.methods", "available_methods": "hfmerge.methods",
    **dict.fromkeys(["Analyse", "Compare", "Comparison", "DataNeed", "Derive", "Derived", "FineTune", "FineTuning",
                     "Phase", "Stage", "Statistics"], "hfmerge.methods.stages"),
    "MergeContext": "hfmerge.engine.plan", "MergePlan": "hfmerge.engine.plan",
    **dict.fromkeys(["FamilyAdapter", "HeadSpec", "SharedInput", "register_family", "supported_families"],
                    "hfmerge.adapters.base"),
    "Recipe": "hfmerge.recipe", "SourceSpec": "hfmerge.source",
    "MergeResult": "hfmerge.publish.result",
    "SpaceOptions": "hfmerge.publish.space", "push_space": "hfmerge.publish.space", "save_space": "hfmerge.publish.space",
}

__all__ = [  # every error class of hfmerge.errors, and the names above
    "Analyse", "Compare", "Comparison", "DataError", "DataNeed", "Derive", "Derived", "DiskSpaceError",
    "EvaluationError", "FamilyAdapter", "FineTune", "FineTuning", "HeadSpec", "HfMergeError", "HubUnreachableError",
    "IncompatibleModelsError", "MergeContext", "MergeMethod", "MergeNumericError", "MergePlan", "MergeResult",
    "OutputExistsError", "ParamSpec", "Phase", "PlannedMerge", "PublishError", "Recipe", "RecipeError",
    "SharedInput", "SourceError", "SourceSpec", "SpaceOptions", "Stage", "Statistics", "StatisticsError",
    "TrainingError", "TransportError", "align_layer", "available_methods", "cross_layer_alignment", "get_method",
    "layer_similarity", "load", "merge", "plan_merge", "push_space", "register_family", "register_method",
    "run_recipe", "save_space", "select_gated", "supported_families",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hfmerge' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
