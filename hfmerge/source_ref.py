"""What a model reference names: a Hub repo (``org/name``, ``org/name@revision``) or a local folder.

The one parser of model references for hfmerge (recipes, ``--anchor``,
resolution, ``hfmerge space``) and for the demo Space, which ships this file
beside ``app.py`` and runs without hfmerge: so it uses the standard library only.

A reference is read the way ``from_pretrained`` reads a name, in this order:

1. written as a path (``./runs/a``, ``../a``, ``/data/a``, ``~/a``): that folder,
   whole (an ``@`` is part of the folder's name);
2. a relative path that exists (``models/vit-a``): that folder, even when the
   same text is a valid Hub repo id; ``shadows_repo_id`` tells the caller to
   say that the Hub repo of that name was not used (``models/vit-a@main``
   names the Hub repo);
3. ``namespace/name`` with an optional ``@revision`` (branch, tag or commit sha): a Hub repo;
4. anything else: a folder that does not exist, which the caller refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PATH_PREFIXES = (".", "/", "~")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_MAX_REPO_ID = 96  # huggingface_hub's validate_repo_id limit


class SourceRefError(ValueError):
    """A reference that is neither a folder nor a Hub repo id; the message says how to write it."""


@dataclass(frozen=True)
class SourceRef:
    """A parsed model reference.

    Attributes:
        model: the Hub repo id, or the folder as written.
        revision: the branch, tag or commit sha after ``@`` (Hub repos only).
        is_folder: the reference names a local folder (which may not exist).
        shadows_repo_id: a relative folder whose path is also a valid Hub repo id.
    """

    model: str
    revision: str | None = None
    is_folder: bool = False
    shadows_repo_id: bool = False

    @property
    def ref(self) -> str:
        """The reference as a user would type it."""
        return f"{self.model}@{self.revision}" if self.revision else self.model

    @property
    def path(self) -> Path:
        """The folder, with ``~`` expanded (meaningful for folders only)."""
        return Path(self.model).expanduser()

    @property
    def display_name(self) -> str:
        """A short name for people: a folder's own name, or the repo id with a short commit sha."""
        if self.is_folder:
            return self.path.resolve().name if self.path.is_dir() else self.model
        revision = self.revision[:7] if self.revision and is_commit_sha(self.revision) else self.revision
        return f"{self.model}@{revision}" if revision else self.model


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a Hub repo id ``namespace/name`` as the Hub accepts it."""
    return (bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text
            and len(text) <= _MAX_REPO_ID)


def is_commit_sha(text: str) -> bool:
    """Whether ``text`` is a full 40-character commit sha."""
    return bool(_COMMIT_SHA.match(text))


def written_as_path(text: str) -> bool:
    """Whether ``text`` can only be a path: it starts with ``.``, ``/`` or ``~``."""
    return text.startswith(PATH_PREFIXES)


def parse_source_ref(text: str) -> SourceRef:
    """Read a model reference by the rules in this module's docstring.

    Raises:
        SourceRefError: the text is empty, or ``@`` leaves the repo id or the revision empty.
    """
    if not isinstance(text, str) or not text.strip():
        raise SourceRefError(f"{text!r} names no model: give a Hub repo id org/name[@revision] or a folder")
    text = text.strip()
    if written_as_path(text):
        return SourceRef(text, is_folder=True)
    if Path(text).exists():
        return SourceRef(text, is_folder=True, shadows_repo_id=is_repo_id(text))
    model, at, revision = text.rpartition("@") if "@" in text else (text, "", "")
    if at and (not model or not revision):
        raise SourceRefError(f"{text!r}: write org/name@revision with both parts")
    if is_repo_id(model):
        return SourceRef(model, revision or None)
    return SourceRef(text, is_folder=True)
