"""The merge methods; importing this package registers every one of them.

A method module imports the engine and ``hfmerge.engine.ops`` inside ``plan``, not
at its top: listing the methods (``hfmerge --help``, ``hfmerge methods``,
recipe validation) then needs no torch. A method's own tensor operations
(:class:`~hfmerge.engine.ops.MergeOp`) live beside it and import torch inside
``apply``, or in a module of its own that ``plan`` imports.
"""

from hfmerge.methods.base import MergeMethod, ParamSpec, available_methods, get_method, register_method
from hfmerge.methods.stages import Analyse, Compare, Comparison, Derive, Derived, FineTune, FineTuning, Stage, Statistics
from hfmerge.methods import (  # noqa: F401  (registration)
    average, dare, fisher, fusion, gating, layerwise, ot, regmean, task_arithmetic, ties,
)

__all__ = [
    "Analyse", "Compare", "Comparison", "Derive", "Derived", "FineTune", "FineTuning", "MergeMethod", "ParamSpec", "Stage",
    "Statistics", "available_methods", "get_method", "register_method",
]
