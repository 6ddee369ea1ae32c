"""Which files of an output folder hfmerge wrote, so that ``--overwrite`` replaces those and nothing of the user's.

An output folder (a merged model, a Space) ends with ``.hfmerge-files.json``:
each file's path, size and modification time as hfmerge left it. A file that is
not listed (a note, a picture the user added) or no longer matches (a card the
user edited) is the user's. ``hfmerge evaluate --update-card`` keeps the list
true when it writes the card and chart into such a folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MANIFEST_FILE = ".hfmerge-files.json"
SHOWN_NAMES = 3
"""How many of the user's files a message names before it says how many more there are."""


def record_files(folder: Path) -> None:
    """List every file under ``folder`` as it is now in its manifest: call it when the folder is complete."""
    files = {path: _stamp(folder / path) for path in _paths(folder)}
    _write(folder, files)


def read_manifest(folder: Path) -> dict[str, dict[str, int]] | None:
    """The files hfmerge wrote into ``folder`` (path -> size and time), or ``None`` where it keeps no list."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def users_files(folder: Path, manifest: dict[str, dict[str, int]]) -> list[str]:
    """The files under ``folder`` that ``manifest`` does not list as they are now: the user's, sorted."""
    return [path for path in _paths(folder) if manifest.get(path) != _stamp(folder / path)]


def describe_files(paths: list[str]) -> str:
    """``a, b, c and 4 more``: the first few of ``paths`` for a one-line message."""
    shown = ", ".join(paths[:SHOWN_NAMES])
    rest = len(paths) - SHOWN_NAMES
    return f"{shown} and {rest} more" if rest > 0 else shown


def replace_files(folder: Path, contents: dict[str, str]) -> None:
    """Write ``contents`` (file name -> text) into ``folder``, each file replaced at once by a rename.

    Where ``folder`` is an earlier output, a file that was hfmerge's, or new, is
    listed as hfmerge's again; one that was the user's stays the user's.
    """
    manifest = read_manifest(folder)
    users = set(users_files(folder, manifest)) if manifest is not None else set()
    for name, text in contents.items():
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, folder / name)
    if manifest is not None:
        manifest.update({name: _stamp(folder / name) for name in contents if name not in users})
        _write(folder, manifest)


def _paths(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest (links included, never followed), as POSIX paths."""
    found = []
    for root, folders, files in os.walk(folder):
        links = [name for name in folders if os.path.islink(os.path.join(root, name))]
        for name in files + links:
            found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(path for path in found if path != MANIFEST_FILE)


def _stamp(path: Path) -> dict[str, int]:
    status = os.lstat(path)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _write(folder: Path, files: dict[str, dict[str, int]]) -> None:
    fresh = folder / f"{MANIFEST_FILE}.new"
    fresh.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(fresh, folder / MANIFEST_FILE)
