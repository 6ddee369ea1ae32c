"""The merge methods; importing this package registers every one of them.

Every module and folder here is a method (it registers itself with
:func:`register_method`) except the shared ones in :data:`SHARED`: a new
method is one file (or folder), found without editing this package.

A method module imports the engine and ``hfmerge.engine.ops`` inside ``plan``, not
at its top: listing the methods (``hfmerge --help``, ``hfmerge methods``,
recipe validation) then needs no torch. A method's own tensor operations
(:class:`~hfmerge.engine.ops.MergeOp`) live beside it and import torch inside
``apply``, or in a module of its own that ``plan`` imports.
"""

from hfmerge.methods.base import MergeMethod, ParamSpec, available_methods, get_method, register_method
from hfmerge.methods.stages import (
    Analyse,
    Compare,
    Comparison,
    Derive,
    Derived,
    FineTune,
    FineTuning,
    Stage,
    Statistics,
)

SHARED = frozenset({"base", "heads", "labels", "stages", "task_vectors"})
"""The modules several methods share; they register nothing, and some import torch, which listing methods must not."""


def _import_methods() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in SHARED and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_methods()

__all__ = [
    "Analyse", "Compare", "Comparison", "Derive", "Derived", "FineTune", "FineTuning", "MergeMethod", "ParamSpec", "Stage",
    "Statistics", "available_methods", "get_method", "register_method",
]
