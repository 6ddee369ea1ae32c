"""hfmerge: merge fine-tuned vision models from the Hugging Face Hub and publish the result."""

from hfmerge.errors import (
    HfMergeError,
    HubUnreachableError,
    IncompatibleModelsError,
    MergeNumericError,
    OutputExistsError,
    PublishError,
    RecipeError,
    SourceError,
)
from hfmerge.loading import load
from hfmerge.pipeline import PlannedMerge, merge, plan_merge, run_recipe
from hfmerge.methods import available_methods
from hfmerge.recipe import Recipe, SourceSpec
from hfmerge.result import MergeResult
from hfmerge.space import SpaceOptions, push_space, save_space

__version__ = "0.1.0"

__all__ = [
    "HfMergeError", "HubUnreachableError", "IncompatibleModelsError", "MergeNumericError", "MergeResult",
    "OutputExistsError",
    "PlannedMerge", "PublishError", "Recipe", "RecipeError", "SourceError", "SourceSpec", "SpaceOptions",
    "available_methods", "load", "merge", "plan_merge", "push_space", "run_recipe", "save_space",
]
