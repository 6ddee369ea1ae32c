"""The disk under a merge: room checked before writing, a full disk said in one line, killed runs' folders reclaimed.

A merge knows its output's size before it writes a byte (its plan names every
tensor's shape and dtype), so a disk that cannot hold it is refused up front
(:func:`check_free_space`); one that fills anyway, because something else wrote
meanwhile, becomes a :class:`~hfmerge.errors.DiskSpaceError` (:func:`full_disk_is_an_error`)
once what was written is removed.

A process killed with SIGKILL runs no clean-up, and its temporary folder, as large
as the model, would stay for good. So every temporary folder hfmerge makes beside
the user's files is named by its owner (:func:`owned_temp_folder`): pid, the
process's start time and the host. A later run in the same folder removes those
whose process is gone (:func:`remove_orphans`), and never one whose owner is
alive, runs on another host, or that carries no such name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hfmerge.errors import DiskSpaceError

logger = logging.getLogger(__name__)

FULL_DISK_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
"""No space left on the device, or the user's disk quota exceeded."""

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How safetensors (Rust) reports an OS error: its message ends with ``(os error 28)``, the type is not OSError."""

UNMARKED_STAGING = re.compile(r"\.hfmerge-staging-[a-z0-9_]{8}")
"""A staging folder of an hfmerge older than owner names (``tempfile.mkdtemp``'s eight characters): only mentioned."""

OWNED_NAME = re.compile(r"\..*owner-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{8})\.[A-Za-z0-9_]+")
"""A hidden temporary file or folder hfmerge made and named by its owner (see :func:`owner_tag`)."""


def format_size(size: int) -> str:
    """``size`` bytes in decimal units with three significant digits, as ``ls -h --si`` and the Hub show sizes."""
    if size < 1000:
        return f"{size} B"
    value, unit = size / 1000, "kB"
    for larger in ("MB", "GB", "TB"):
        if round(value) < 1000:  # 999.7 kB would print as 1e+03 kB: it is 1 MB
            break
        value, unit = value / 1000, larger
    return f"{value:.3g} {unit}"


def free_space(folder: str | Path) -> int:
    """Bytes this user may still write on ``folder``'s file system; a folder not made yet counts as its parent's."""
    return shutil.disk_usage(_existing(folder)).free


@dataclass(frozen=True)
class SpaceNeed:
    """``size`` bytes that will be written in ``folder``: ``what`` says what, for the message."""

    folder: Path
    size: int
    what: str


def check_free_space(needs: list[SpaceNeed], fix: str) -> None:
    """Refuse, before anything is written, needs that their file systems cannot hold.

    Needs on one file system add up (a merge's staging folder and the copy saved
    beside it, when they cannot share blocks).

    Raises:
        DiskSpaceError: a file system has less free space than what goes on it; ``fix``
            ends the message (what the user can do).
    """
    by_device: dict[int, list[SpaceNeed]] = {}
    for need in needs:
        by_device.setdefault(_device(need.folder), []).append(need)
    for group in by_device.values():
        needed = sum(need.size for need in group)
        free = free_space(group[0].folder)
        if needed > free:
            what = " and ".join(f"{need.what} in {need.folder}" for need in group)
            raise DiskSpaceError(f"not enough free space for {what}: it needs {format_size(needed)} and its file "
                                 f"system has {format_size(free)} free; {fix}")


def is_full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full or the quota exceeded (an OSError, or safetensors' own error)."""
    return not isinstance(exc, DiskSpaceError) and _errno(exc) in FULL_DISK_ERRNOS


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    return int(match.group(1)) if match is not None else None


@contextmanager
def full_disk_is_an_error(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """Turn a disk that fills inside the block into one :class:`~hfmerge.errors.DiskSpaceError`.

    The message says that what was written is removed: the caller removes it (its ``except``
    or ``finally`` around the block) before the error reaches the user. It names the file that
    could not be written when the error does, else ``folder``; ``fix`` ends it.
    """
    try:
        yield
    except Exception as exc:
        if not is_full_disk(exc):
            raise
        place = getattr(exc, "filename", None) or Path(folder)
        reason = os.strerror(_errno(exc) or errno.ENOSPC)
        raise DiskSpaceError(f"the disk filled while writing {what} in {place} ({reason}); what was written "
                             f"is removed: {fix}") from None


# -- temporary folders named by their owner -------------------------------------------------------------------------

def owner_tag(pid: int | None = None) -> str:
    """``owner-<pid>-<start>-<host>``: who made a temporary folder, as a later run can check it.

    ``start`` is the process's start time in clock ticks after boot (``/proc/<pid>/stat``, field 22), so
    a pid that a later process reuses is not taken for the owner; 0 where the system does not say (not
    Linux: the pid alone decides). ``host`` is a digest of the host name: a folder on a shared disk made
    by another machine is never judged from this one.
    """
    pid = os.getpid() if pid is None else pid
    return f"owner-{pid}-{_start_time(pid) or 0}-{_host_digest()}"


def owned_temp_folder(parent: str | Path | None, prefix: str) -> Path:
    """A new hidden folder ``<prefix>owner-…-<host>.<random>`` in ``parent`` (the temporary folder when ``None``)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}.", dir=parent))


def remove_orphans(parent: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary files and folders in ``parent`` whose owner process is gone; say so in one log line.

    Only names made by :func:`owner_tag` count, only this host's, and only when the owner's pid no longer
    runs or now belongs to a process that started later. A staging folder of an older hfmerge (no owner
    in its name) is left alone, with one warning for all of them.

    Returns:
        What was removed, with the bytes it held.
    """
    try:
        entries = list(Path(parent).iterdir())
    except OSError:  # no folder (yet), or one this user cannot list: nothing of ours there
        return []
    removed, unmarked = [], []
    for path in entries:
        if UNMARKED_STAGING.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            unmarked.append(path)
            continue
        match = OWNED_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or _owner_may_run(match):
            continue
        size = _size(path)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            logger.warning("could not remove %s, left by an hfmerge run that was killed: %s", path, exc)
            continue
        removed.append((path, size))
    _warn_unmarked(sorted(unmarked))
    if removed:
        names = ", ".join(path.name for path, _ in removed)
        logger.info("removed what hfmerge runs that were killed left in %s (%s): %s freed", Path(parent), names,
                    format_size(sum(size for _, size in removed)))
    return removed


def _owner_may_run(match: re.Match[str]) -> bool:
    """False only when the owner is known to be gone; whatever cannot be told counts as running."""
    if match["host"] != _host_digest():
        return True
    pid, start = int(match["pid"]), int(match["start"])
    if os.name != "posix":  # os.kill(pid, 0) would signal the process on Windows, not test it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        pass
    now = _start_time(pid)
    if now is None:  # no /proc: the pid alone decides
        return True
    return not (start and now != start) and not _is_zombie(pid)


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None  # field 22 of proc(5); the list starts at field 3


def _is_zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet: it holds its pid, but it is gone."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "Z"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _host_digest() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _existing(folder: str | Path) -> Path:
    """``folder``, or its nearest ancestor that exists: where a folder not made yet will be."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _device(folder: Path) -> int:
    return _existing(folder).stat().st_dev


def _warn_unmarked(folders: list[Path], named: int = 3) -> None:
    """One warning for the staging folders of older hfmerge runs (no owner in their names), however many."""
    if not folders:
        return
    size = format_size(sum(_size(path) for path in folders))
    if len(folders) == 1:
        logger.warning("%s (%s) looks like the staging folder of an earlier hfmerge run that was killed; it does "
                       "not say which process made it, so it is left alone: remove it if no merge runs there",
                       folders[0], size)
        return
    names = ", ".join(path.name for path in folders[:named])
    more = f" and {len(folders) - named} more" if len(folders) > named else ""
    logger.warning("%d folders in %s (%s in all: %s%s) look like the staging folders of earlier hfmerge runs that "
                   "were killed; they do not say which process made them, so they are left alone: remove them if "
                   "no merge runs there", len(folders), folders[0].parent, size, names, more)


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total
