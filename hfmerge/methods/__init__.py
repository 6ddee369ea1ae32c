"""The merge methods; importing this package registers every one of them.

A method module imports the engine and ``hfmerge.ops`` inside ``plan``, not
at its top: listing the methods (``hfmerge --help``, ``hfmerge methods``,
recipe validation) then needs no torch.
"""

from hfmerge.methods.base import Comparison, FineTuning, GateTraining, MergeMethod, ParamSpec, available_methods, get_method, register_method
from hfmerge.methods import (  # noqa: F401  (registration)
    average, clafusion, dare, fisher, fusion, gating, layerwise, otfusion, regmean, task_arithmetic, ties,
)

__all__ = ["Comparison", "FineTuning", "GateTraining", "MergeMethod", "ParamSpec", "available_methods", "get_method", "register_method"]
