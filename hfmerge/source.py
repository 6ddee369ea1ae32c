"""A model to merge, as the user named it: a Hub repo id with an optional revision, or a folder.

The text of a reference is read by :mod:`hfmerge.source_ref`, the one
parser that hfmerge and the demo Space share; :class:`SourceSpec` adds what a
recipe records beside it (the pinned commit, the weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hfmerge.errors import RecipeError
from hfmerge.source_ref import SourceRef, SourceRefError, is_repo_id, parse_source_ref


@dataclass(frozen=True)
class SourceSpec:
    """A model to merge, as the user named it.

    ``model`` is a Hub repo id or a local folder; ``revision`` a branch, tag or
    commit sha; ``commit`` the sha a previous run resolved it to (recipes
    written by hfmerge carry it so that ``hfmerge run`` reproduces exactly).
    """

    model: str
    revision: str | None = None
    commit: str | None = None
    weight: float | None = None

    @classmethod
    def parse(cls, ref: str | dict[str, Any] | SourceSpec) -> SourceSpec:
        """Read ``org/name``, ``org/name@rev``, a folder, or a YAML mapping (see ``source_ref``)."""
        if isinstance(ref, SourceSpec):
            return ref
        if isinstance(ref, dict):
            unknown = set(ref) - {"model", "revision", "commit", "weight"}
            if unknown:
                raise RecipeError(
                    f"unknown field(s) {sorted(unknown)} in source {ref!r}; "
                    "a source takes model, revision, commit and weight"
                )
            if "model" not in ref:
                raise RecipeError(f"source {ref!r} has no 'model'; write model: org/name or a folder")
            pinned = ref.get("revision") or ref.get("commit")
            spec = cls.parse(str(ref["model"]))
            if pinned and spec.is_local:
                # A revision or commit names a Hub repo: a folder has none.
                if not is_repo_id(spec.model):
                    raise RecipeError(f"source {ref!r}: a folder has no revision or commit; drop them")
                spec = cls(model=spec.model)
            weight = ref.get("weight")
            return cls(
                model=spec.model,
                revision=ref.get("revision") or spec.revision,
                commit=ref.get("commit"),
                weight=None if weight is None else finite_float(weight, "weight"),
            )
        try:
            parsed = parse_source_ref(ref)
        except SourceRefError as exc:
            raise RecipeError(f"source {exc}") from None
        return cls(model=parsed.model, revision=parsed.revision)

    @property
    def source_ref(self) -> SourceRef:
        """What the source names: a folder, or a Hub repo; a revision or commit always means the Hub."""
        if (self.revision or self.commit) and is_repo_id(self.model):
            return SourceRef(self.model, self.revision)
        return parse_source_ref(self.model)

    @property
    def is_local(self) -> bool:
        """Whether the source is a local folder (one that exists, or one written as a path)."""
        return self.source_ref.is_folder

    @property
    def ref(self) -> str:
        """The source as a user would type it."""
        return f"{self.model}@{self.revision}" if self.revision else self.model

    def matches(self, ref: str) -> bool:
        """Whether ``ref`` (as given to ``--anchor`` or ``--base``) names this source."""
        if ref in (self.ref, self.model):
            return True
        try:
            other = parse_source_ref(ref)
        except SourceRefError:
            return False
        return other.is_folder and self.is_local and other.path.resolve() == self.source_ref.path.resolve()


def finite_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RecipeError(f"{name} must be finite, got {value!r}")
    return number
