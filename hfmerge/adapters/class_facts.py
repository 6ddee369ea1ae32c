"""What a model class says about one checkpoint's keys, and a cache of it on disk.

Inspecting a source (:func:`~hfmerge.adapters.layout.inspect_source`) builds its model class on the
meta device: the in-memory names of the checkpoint's keys (transformers 5 renames them on load), their
shapes in registration order, the keys ``from_pretrained`` skips, the module classes. Building it
imports transformers' modeling code (``modeling_utils`` brings torch's compiler, its distributed
tensors, scipy, accelerate), seconds that outweigh a static merge's own work several times over.

The facts depend only on the code (hfmerge's inspection, transformers, torch), the architecture, the
config and the checkpoint's keys, so :class:`FactsCache` keeps them as small JSON files in
``$HF_HOME/hfmerge/inspection``, named by a digest of all of those: a second merge of such sources
reads one file and imports no modeling code. Module classes are stored by import path and imported
when first asked for, which static methods never do. Only hfmerge's own families are cached
(:func:`~hfmerge.adapters.base.is_built_in`); a plug-in's classes are code hfmerge cannot fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfmerge.adapters.base import FamilyAdapter

logger = logging.getLogger(__name__)

FACTS_FORMAT = 1
"""The layout of a cache file; a file of another format is rebuilt."""

_CLASS_PACKAGES = ("torch", "transformers", "hfmerge")
"""The packages whose classes a cache file may name (a file naming another is ignored as corrupt)."""

_CODE = ("hfmerge.adapters.class_facts", "hfmerge.adapters.layout", "hfmerge.adapters.base", "hfmerge.io.renaming")
"""The modules whose code computes the facts: a change to any of them makes every cached file stale."""


@dataclass(frozen=True)
class ClassFacts:
    """What the model class says about one checkpoint's keys.

    Attributes:
        shapes: every tensor of the class's ``state_dict()``, by in-memory name, in registration order.
        names: checkpoint key -> in-memory name, in the checkpoint's key order.
        ignored: in-memory names of checkpoint tensors that ``from_pretrained`` skips.
        absent: in-memory names of the class's tensors that the checkpoint lacks.
        module_classes: every module name (the root is ``""``) and its class.
        parameter_names: the in-memory names of the parameters (the rest of ``shapes`` are buffers).
    """

    shapes: dict[str, tuple[int, ...]]
    names: dict[str, str]
    ignored: frozenset[str]
    absent: tuple[str, ...]
    module_classes: Mapping[str, type]
    parameter_names: frozenset[str]


class ModuleClasses(Mapping[str, type]):
    """Module name -> class, each class imported by its path (``module:qualname``) when first asked for.

    Names and membership need no import; a class read from the cache is imported only when a method
    asks for it (RegMean's linear groups, neuron groups, depth), so a static merge never imports
    transformers' modeling modules.
    """

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = dict(paths)

    def __getitem__(self, name: str) -> type:
        return _import_class(self._paths[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths


@functools.cache
def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def class_path(cls: type) -> str | None:
    """``cls``'s import path as :class:`ModuleClasses` stores it; None for a class that cannot be imported by
    path (defined in a function) or that belongs to no package the cache may name."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__.split(".")[0] not in _CLASS_PACKAGES or "<" in cls.__qualname__:
        return None
    try:
        return path if _import_class(path) is cls else None
    except (ImportError, AttributeError):
        return None


@functools.cache
def _code_digest(classes: str | None) -> str:
    """A digest of the source files of the modules that compute the facts, and of ``classes`` (a family's own
    model classes), so that a checkout whose code changed without a new version never reads stale facts."""
    digest = hashlib.sha256()
    for name in (*_CODE, *([classes] if classes else [])):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        digest.update(name.encode() + b"\0" + (Path(origin).read_bytes() if origin else b"") + b"\0")
    return digest.hexdigest()


def facts_key(family: FamilyAdapter, architecture: str, config_text: bytes, keys: Sequence[str]) -> dict[str, Any]:
    """Everything the facts depend on: the versions and code that compute them, and what they are computed from.

    Args:
        family: the source's adapter (its name, and its own classes' code when it has some).
        architecture: the class built.
        config_text: the bytes of the source's ``config.json``.
        keys: the checkpoint's tensor names, in its order.
    """
    import torch
    import transformers

    import hfmerge

    return {
        "format": FACTS_FORMAT,
        "hfmerge": hfmerge.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "code": _code_digest(family.classes),
        "family": family.name,
        "architecture": architecture,
        "config": hashlib.sha256(config_text).hexdigest(),
        "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
    }


class FactsCache:
    """:class:`ClassFacts` as JSON files, one per :func:`facts_key`, in ``$HF_HOME/hfmerge/inspection``.

    Files are written to a temporary file in the same folder and renamed, so a reader never sees half
    a file. A file that cannot be read, parsed or checked (its payload digest, its key, the classes it
    names) is ignored with a warning and written again; a folder that cannot be written only costs the
    next merge the meta model again. The cache never makes a merge fail.
    """

    def __init__(self, folder: Path | None = None) -> None:
        if folder is None:
            from huggingface_hub import constants

            folder = Path(constants.HF_HOME) / "hfmerge" / "inspection"
        self.folder = Path(folder)

    def path(self, key: Mapping[str, Any]) -> Path:
        """The file for ``key``."""
        return self.folder / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"

    def load(self, key: Mapping[str, Any]) -> ClassFacts | None:
        """The facts stored for ``key``, or None when there are none or they are unreadable."""
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("ignoring the unreadable inspection cache file %s (%s); it is rebuilt", path, exc)
            return None
        try:
            return _parse(text, key)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the corrupt inspection cache file %s (%s); it is rebuilt", path, exc)
            return None

    def save(self, key: Mapping[str, Any], facts: ClassFacts) -> None:
        """Store ``facts`` for ``key``; nothing is stored when a module class cannot be named by path."""
        modules = {name: class_path(cls) for name, cls in facts.module_classes.items()}
        if None in modules.values():
            logger.debug("not caching the inspection of %s: a module class has no import path", key["architecture"])
            return
        payload = {
            "shapes": [[name, list(shape)] for name, shape in facts.shapes.items()],
            "names": [[key_, name] for key_, name in facts.names.items()],
            "ignored": sorted(facts.ignored),
            "absent": list(facts.absent),
            "modules": [[name, path] for name, path in modules.items()],
            "parameters": sorted(facts.parameter_names),
        }
        record = {"key": dict(key), "digest": _digest(payload), "facts": payload}
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record))
            os.replace(temporary, path)
        except OSError as exc:
            logger.debug("could not write the inspection cache file %s (%s)", path, exc)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _parse(text: str, key: Mapping[str, Any]) -> ClassFacts:
    """The facts in a cache file's ``text``, checked against ``key``.

    Raises:
        ValueError, KeyError, TypeError: the file is not one :meth:`FactsCache.save` wrote for ``key``.
    """
    record = json.loads(text)
    if record["key"] != dict(key):
        raise ValueError("it was written for another key")
    payload = record["facts"]
    if record["digest"] != _digest(payload):
        raise ValueError("its content does not match its digest")
    modules = {_string(name): _string(path) for name, path in payload["modules"]}
    if any(path.split(".")[0] not in _CLASS_PACKAGES or ":" not in path for path in modules.values()):
        raise ValueError("it names a class outside torch, transformers and hfmerge")
    return ClassFacts(
        shapes={_string(name): tuple(_integer(d) for d in shape) for name, shape in payload["shapes"]},
        names={_string(key_): _string(name) for key_, name in payload["names"]},
        ignored=frozenset(_string(name) for name in payload["ignored"]),
        absent=tuple(_string(name) for name in payload["absent"]),
        module_classes=ModuleClasses(modules),
        parameter_names=frozenset(_string(name) for name in payload["parameters"]),
    )


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value
