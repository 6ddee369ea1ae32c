"""A merge killed with SIGKILL leaves its staging folder; the next run in the same folder removes it, and says so.

The folders are marked with their process (pid, start time, host), so a later run removes only those whose
process is gone: never a live one's, never another host's, never a folder it did not mark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and pid liveness are POSIX")

SLOW_MERGE = r"""
import sys, time
from pathlib import Path

import hfmerge.io.writer as writer

marker = Path(sys.argv[1])
write = writer.ShardedSafetensorsWriter.write


def write_slowly(self, key, tensor):
    write(self, key, tensor)
    marker.write_text(key)  # inside the write: the staging folder holds part of the shard
    time.sleep(600)


writer.ShardedSafetensorsWriter.write = write_slowly
from hfmerge.cli import main

sys.exit(main(sys.argv[2:]))
"""

HALF_SAVED = r"""
import sys, time
from pathlib import Path

from hfmerge.publish.result import atomic_folder

marker, output = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_folder(output) as partial:
    (partial / "model.safetensors").write_bytes(b"\0" * 50_000)
    marker.write_text(str(partial))
    time.sleep(600)
"""


def _start(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before the marker (rc {child.returncode}): {child.stderr.read()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child never reached the write")
        time.sleep(0.1)


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)  # reaped: no zombie keeps the pid
    child.stdout.close()
    child.stderr.close()


def _hidden(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix))


def test_a_killed_merge_leaves_a_staging_folder_that_the_next_run_removes(make_source, tmp_path, capsys):
    a, b = make_source("vit", 3, seed=1), make_source("vit", 3, seed=2)
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "inside-the-write"
    child = _start(SLOW_MERGE, marker, "merge", a, b, "--method", "average", "--output", work / "first", "-q")
    try:
        _wait_for(marker, child)
        staging = _hidden(work, ".hfmerge-staging-")
        assert len(staging) == 1 and any(staging[0].iterdir())

        # while its merge runs, another merge beside it leaves its folder alone
        code, _, err = run_cli(["merge", a, b, "--method", "average", "--output", work / "second"], capsys)
        assert code == 0, err
        assert _hidden(work, ".hfmerge-staging-") == staging
        assert "removed" not in err
    finally:
        _kill(child)

    assert _hidden(work, ".hfmerge-staging-") == staging  # kill -9 runs no clean-up
    size = sum(f.stat().st_size for f in staging[0].rglob("*") if f.is_file())
    code, _, err = run_cli(["merge", a, b, "--method", "average", "--output", work / "third"], capsys)
    assert code == 0, err
    assert _hidden(work, ".hfmerge-staging-") == []
    said = [line for line in err.splitlines() if "removed" in line]
    assert len(said) == 1, err
    assert staging[0].name in said[0] and "killed" in said[0], said[0]
    from hfmerge.io.disk import format_size

    assert f"{format_size(size)} freed" in said[0], said[0]
    assert sorted(p.name for p in work.iterdir()) == ["second", "third"]


def test_a_killed_save_leaves_a_partial_folder_that_the_next_save_removes(tmp_path, caplog):
    from hfmerge.publish.result import atomic_folder

    marker, output = tmp_path / "inside-the-save", tmp_path / "merged"
    child = _start(HALF_SAVED, marker, output)
    try:
        _wait_for(marker, child)
        partial = Path(marker.read_text())
        assert partial.parent == tmp_path and partial.is_dir()
    finally:
        _kill(child)
    assert partial.is_dir()
    with caplog.at_level("INFO", logger="hfmerge"), atomic_folder(output) as fresh:
        (fresh / "hfmerge.yaml").write_text("method: average\n")
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside-the-save", "merged"]
    assert any(partial.name in r.getMessage() and "50 kB freed" in r.getMessage() for r in caplog.records)


def test_only_folders_whose_process_is_gone_are_removed(tmp_path, caplog):
    """Kept: a live owner's, this process's, another host's, an unmarked one; removed: a dead owner's, a reused pid's."""
    from hfmerge.io.disk import owned_temp_folder, owner_tag, remove_orphans

    _, _, _, host = owner_tag().split("-")
    done = subprocess.run([sys.executable, "-c", "from hfmerge.io.disk import owner_tag; print(owner_tag())"],
                          capture_output=True, text=True, check=True)  # a process that made its tag and ended
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        folders = {
            "alive": tmp_path / f".hfmerge-staging-{owner_tag(sleeper.pid)}.abcd1234",
            "another host": tmp_path / f".hfmerge-staging-owner-{sleeper.pid}-0-{'0' * 8 if host != '0' * 8 else '1' * 8}.x1",
            "unmarked": tmp_path / ".hfmerge-staging-k2j3h4g5",
            "dead": tmp_path / f".hfmerge-staging-{done.stdout.strip()}.zz9_0000",
        }
        linux = Path(f"/proc/{os.getpid()}/stat").is_file()
        if linux:  # the sleeper's pid with another start time: a process that ended, whose pid was reused
            folders["reused"] = tmp_path / f".out.partial-owner-{sleeper.pid}-1-{host}.reused00"
        for folder in folders.values():
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"\0" * 1_000)
        mine = owned_temp_folder(tmp_path, ".hfmerge-staging-")
        with caplog.at_level("INFO", logger="hfmerge"):
            removed = remove_orphans(tmp_path)
        gone = {"dead", "reused"} if linux else {"dead"}
        assert sorted(removed) == sorted((folders[name], 1_000) for name in gone)
        assert set(tmp_path.iterdir()) == {mine} | {folders[name] for name in folders.keys() - gone}
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and str(folders["unmarked"]) in warned[0] and "1 kB" in warned[0], warned
    finally:
        sleeper.kill()
        sleeper.wait()


def test_many_unmarked_staging_folders_get_one_warning(tmp_path, caplog):
    """Old hfmerge's staging folders (no owner in the name) are left alone, and said in one line however many."""
    from hfmerge.io.disk import remove_orphans

    folders = [tmp_path / f".hfmerge-staging-{c * 8}" for c in "abcde"]
    for folder in folders:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 2_000)
    with caplog.at_level("WARNING", logger="hfmerge"):
        assert remove_orphans(tmp_path) == []
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"5 folders in {tmp_path} (10 kB in all: .hfmerge-staging-aaaaaaaa, "), warned
    assert warned[0].count(".hfmerge-staging-") == 3 and "and 2 more" in warned[0]
    assert all(folder.is_dir() for folder in folders)
