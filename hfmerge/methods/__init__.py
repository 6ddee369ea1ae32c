"""The merge methods; importing this package registers every one of them.

A method module imports the engine and ``hfmerge.ops`` inside ``plan``, not
at its top: listing the methods (``hfmerge --help``, ``hfmerge methods``,
recipe validation) then needs no torch.
"""

from hfmerge.methods.base import FineTuning, MergeMethod, ParamSpec, available_methods, get_method, register_method
from hfmerge.methods import average, dare, fisher, fusion, layerwise, regmean, task_arithmetic, ties  # noqa: F401  (registration)

__all__ = ["FineTuning", "MergeMethod", "ParamSpec", "available_methods", "get_method", "register_method"]
