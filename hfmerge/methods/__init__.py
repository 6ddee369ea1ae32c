"""The merge methods; importing this package registers every one of them."""

from hfmerge.methods.base import MergeMethod, ParamSpec, available_methods, get_method, register_method
from hfmerge.methods import average, dare, fusion, layerwise, task_arithmetic, ties  # noqa: F401  (registration)

__all__ = ["MergeMethod", "ParamSpec", "available_methods", "get_method", "register_method"]
