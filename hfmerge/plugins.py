"""Merge methods and model families from other packages, found through entry points.

A package adds a method by naming its class (a :class:`~hfmerge.methods.base.MergeMethod`
subclass) in the entry-point group ``hfmerge.methods``, and a model family by naming an
adapter (a :class:`~hfmerge.adapters.base.FamilyAdapter` instance) in ``hfmerge.families``::

    [project.entry-points."hfmerge.methods"]
    my_soup = "my_package.methods:MySoup"

    [project.entry-points."hfmerge.families"]
    convnext = "my_package.families:CONVNEXT"

Each group is loaded once, the first time its registry is consulted
(:func:`~hfmerge.methods.base.get_method`, :func:`~hfmerge.methods.base.available_methods`;
:func:`~hfmerge.adapters.base.family_for_model_type`, :func:`~hfmerge.adapters.base.supported_families`),
and what it names is registered then. An entry point that cannot be imported, names
something else, or clashes with a name already registered is left out with one warning
that names it (``hfmerge: warning: …`` on the command line); hfmerge goes on without it.

A method module is imported whenever the methods are listed (``hfmerge --help``,
``hfmerge methods``): like hfmerge's own methods, it should import torch inside
``plan``, not at its top, so that these stay fast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

METHODS_GROUP = "hfmerge.methods"
FAMILIES_GROUP = "hfmerge.families"

_loaded: set[str] = set()
_lock = threading.RLock()
_origins: dict[tuple[str, str], str] = {}
"""(group, registered name) -> the distribution that provided it, as ``name version``."""


def load_entry_points(group: str, register: Callable[[Any], list[str]]) -> None:
    """Load the entry points of ``group`` once, handing each loaded object to ``register``.

    ``register`` registers the object and returns the names it registered under (method names, model
    types), or raises ``TypeError``/``ValueError`` saying why it cannot. Any failure, of the import or of
    the registration, is one warning naming the entry point; the other entry points still load.
    A call made while the group is loading (a plug-in that lists the methods as it is imported) returns
    at once, with what is registered so far.
    """
    with _lock:
        if group in _loaded:
            return
        _loaded.add(group)
        for entry in _entry_points(group):
            where = _describe(group, entry)
            try:
                loaded = entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break hfmerge
                logger.warning("plug-in %s could not be loaded and is left out: %s", where, _one_line(exc))
                continue
            try:
                names = register(loaded)
            except Exception as exc:  # noqa: BLE001
                logger.warning("plug-in %s is left out: %s", where, _one_line(exc))
                continue
            for name in names:
                _origins[group, name] = _distribution(entry) or entry.value


def origin(group: str, name: str) -> str | None:
    """The distribution (``name version``) whose entry point registered ``name`` in ``group``; ``None``: not a plug-in."""
    return _origins.get((group, name))


def _entry_points(group: str) -> list[Any]:
    from importlib import metadata

    try:
        return sorted(metadata.entry_points(group=group), key=lambda e: (_distribution(e) or "", e.name))
    except Exception as exc:  # noqa: BLE001 - unreadable package metadata on the path
        logger.warning("the %s plug-ins could not be listed and are left out: %s", group, _one_line(exc))
        return []


def _distribution(entry: Any) -> str | None:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.metadata['Name'] or dist.name} {dist.version}"
    except Exception:  # noqa: BLE001 - a METADATA file without a name or version
        return getattr(dist, "name", None)


def _describe(group: str, entry: Any) -> str:
    dist = _distribution(entry)
    return f"'{entry.name} = {entry.value}' (entry point of group {group}" + (f", from {dist})" if dist else ")")


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
