"""A dataset as the user named it: a Hub dataset id with optional revision and split, or a local folder.

``--data`` and the recipe's ``data`` field take, as text::

    org/ds            org/ds@revision          org/ds:split          org/ds@revision:split
    ./folder          /abs/folder              folder:split

or, in YAML, a mapping with ``dataset``, ``revision``, ``split`` and ``commit``
(the sha a previous run resolved it to, which ``hfmerge.yaml`` pins). The
dataset part is read as model references are (:mod:`hfmerge.source_ref`):
a path that exists, or text written as a path, is a local folder even when it
is also a valid repo id. A local folder is an image folder (flat: unlabeled;
one subfolder per class: labeled, as ``datasets``' ``imagefolder`` reads it)
or a ``save_to_disk`` folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmerge.errors import DataError
from hfmerge.source_ref import SourceRefError, is_repo_id, parse_source_ref, written_as_path

_SPLIT = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")
_FIELDS = ("dataset", "revision", "split", "commit")


@dataclass(frozen=True)
class DataSpec:
    """A dataset as the user named it.

    Attributes:
        dataset: a Hub dataset id, or a local folder (image folder or ``save_to_disk`` folder).
        revision: a branch, tag or commit sha of the Hub dataset.
        split: the split to read; ``None`` reads ``train`` if there is one, else the only split.
        commit: the sha a previous run resolved it to (``hfmerge.yaml`` pins it).
    """

    dataset: str
    revision: str | None = None
    split: str | None = None
    commit: str | None = None

    @classmethod
    def parse(cls, ref: str | dict[str, Any] | DataSpec) -> DataSpec:
        """Read the text or YAML forms in this module's docstring.

        Raises:
            DataError: the reference is empty or malformed, the mapping has
                unknown fields or no ``dataset``, or a folder is given a revision.
        """
        if isinstance(ref, DataSpec):
            return ref
        if isinstance(ref, dict):
            return cls._from_dict(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise DataError(f"{ref!r} names no dataset: give a Hub dataset id org/name[@revision][:split] "
                            "or a folder of images")
        text = ref.strip()
        split = None
        if not Path(text).expanduser().exists():  # an existing path wins, ':' and all
            head, colon, tail = text.rpartition(":")
            if colon and head and _SPLIT.match(tail):
                text, split = head, tail
            elif colon:
                raise DataError(f"data {ref!r}: write the split after ':' as a name, e.g. org/ds:validation")
        try:
            parsed = parse_source_ref(text)
        except SourceRefError as exc:
            raise DataError(f"data {str(exc).replace('names no model', 'names no dataset')}") from None
        return cls(dataset=parsed.model, revision=parsed.revision, split=split)

    @classmethod
    def _from_dict(cls, ref: dict[str, Any]) -> DataSpec:
        unknown = set(ref) - set(_FIELDS)
        if unknown:
            raise DataError(f"unknown field(s) {sorted(unknown)} in data {ref!r}; "
                            "a dataset takes dataset, revision, split and commit")
        if not ref.get("dataset"):
            raise DataError(f"data {ref!r} has no 'dataset'; write dataset: org/name or a folder")
        split = ref.get("split")
        if split is not None and not _SPLIT.match(str(split)):
            raise DataError(f"data {ref!r}: split {split!r} is not a split name, e.g. train or validation")
        parsed = cls.parse(str(ref["dataset"]))
        revision = ref.get("revision") or parsed.revision
        commit = ref.get("commit")
        if (revision or commit) and parsed.is_local and not is_repo_id(parsed.dataset):
            raise DataError(f"data {ref!r}: a folder has no revision or commit; drop them")
        return cls(dataset=parsed.dataset, revision=None if revision is None else str(revision),
                   split=str(split) if split is not None else parsed.split,
                   commit=None if commit is None else str(commit))

    @property
    def is_local(self) -> bool:
        """Whether the dataset is a local folder (one that exists, or one written as a path)."""
        if (self.revision or self.commit) and is_repo_id(self.dataset):
            return False
        return parse_source_ref(self.dataset).is_folder

    def check_folder(self, option: str = "data") -> None:
        """Refuse a local dataset whose folder does not exist, before a merge spends anything on it.

        Only what :attr:`is_local` calls a folder: ``org/name`` that is no folder here is a Hub dataset id.

        Args:
            option: how the message names where the dataset was given (``--data``, ``--eval-data``).

        Raises:
            DataError: the folder does not exist.
        """
        if not self.is_local or self.path.exists():
            return
        if written_as_path(self.dataset):
            raise DataError(f"{option} {self.dataset!r}: there is no such folder ({self.path.absolute()}); "
                            "give an existing folder of images, or a Hub dataset id org/name[@revision][:split]")
        raise DataError(f"{option} {self.dataset!r} is neither an existing folder nor a Hub dataset id; "
                        "give a folder of images or org/name[@revision][:split]")

    @property
    def path(self) -> Path:
        """The folder, ``~`` expanded (meaningful for local datasets only)."""
        return Path(self.dataset).expanduser()

    @property
    def ref(self) -> str:
        """The dataset as a user would type it."""
        text = f"{self.dataset}@{self.revision}" if self.revision else self.dataset
        return f"{text}:{self.split}" if self.split else text

    def to_dict(self) -> dict[str, str]:
        """The YAML form: ``dataset`` and whichever of ``revision``, ``split``, ``commit`` are set."""
        return {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}


def resolve_data_specs(specs: list[DataSpec | str | dict[str, Any]], n_sources: int) -> list[DataSpec]:
    """One dataset per source: ``specs`` given once per source (in source order), or once for all.

    An empty list stays empty (the method decides whether it needs data).

    Raises:
        DataError: more datasets than sources, or neither one nor one per source.
    """
    parsed = [DataSpec.parse(spec) for spec in specs]
    if not parsed or len(parsed) == n_sources:
        return parsed
    if len(parsed) > n_sources:
        raise DataError(f"{len(parsed)} datasets (--data) for {n_sources} sources; "
                        "give --data once per source, in source order, or once for all")
    if len(parsed) == 1:
        return parsed * n_sources
    raise DataError(f"{len(parsed)} datasets (--data) for {n_sources} sources; "
                    "give --data once per source, in source order, or once for all")
