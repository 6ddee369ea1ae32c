"""A disk too small for a merge: refused before anything is written, and a disk that fills anyway is one line.

Free space is simulated by a ``shutil.disk_usage`` that reports little room under one folder, a filling disk
by a file whose ``write`` raises ``ENOSPC`` (what the kernel does). One test mounts a real, small tmpfs in an
unprivileged user namespace, where the machine allows it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli


def _little_room(monkeypatch, folder: Path, free: int) -> None:
    """``shutil.disk_usage`` says ``folder``'s file system, and only it, has ``free`` bytes left."""
    real = shutil.disk_usage
    folder = folder.resolve()

    def disk_usage(path):
        usage = real(path)
        path = Path(path).resolve()
        return usage._replace(free=free) if path == folder or folder in path.parents else usage

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _weight_bytes(path: Path) -> int:
    """The bytes of a checkpoint's tensors, read from its own header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as checkpoint:
        return sum(checkpoint.get_tensor(key).nbytes for key in checkpoint.keys())


def _left_in(folder: Path, *kept: Path) -> set[str]:
    """What ``folder`` holds beyond ``kept``: a half-written output, a staging folder, a temporary file."""
    return set(os.listdir(folder)) - {p.name for p in kept}


def test_format_size_in_human_units():
    from hfmerge.io.disk import format_size

    assert format_size(0) == "0 B"
    assert format_size(999) == "999 B"
    assert format_size(12_345) == "12.3 kB"
    assert format_size(343_000_000) == "343 MB"
    assert format_size(2_150_000_000) == "2.15 GB"
    assert format_size(5 * 10**12) == "5 TB"


def test_a_merge_too_big_for_the_disk_is_refused_before_writing(make_source, tmp_path, monkeypatch, capsys):
    from hfmerge.io.disk import format_size

    a, b = make_source("vit", 3, seed=1), make_source("vit", 3, seed=2)
    weights = _weight_bytes(a / "model.safetensors")  # the average of two like models is as large as one
    _little_room(monkeypatch, tmp_path, free=12_345)
    code, _, err = run_cli(["merge", a, b, "--method", "average", "--output", tmp_path / "out", "-q"], capsys)
    assert_one_line_error(code, err, "not enough free space", str(tmp_path), f"needs {format_size(weights)}",
                          "12.3 kB free")
    assert _left_in(tmp_path, a, b) == set()


def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_nothing(make_source, tmp_path, monkeypatch, capsys):
    import hfmerge.io.writer as writer

    a, b = make_source("vit", 3, seed=1), make_source("vit", 3, seed=2)
    room = {"bytes": 4_000}  # the first tensors fit, then the disk is full

    class FillingFile:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            size = memoryview(data).nbytes
            if size > room["bytes"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room["bytes"] -= size
            return self.file.write(data)

        def close(self):
            self.file.close()

    monkeypatch.setattr(writer, "open", lambda *args, **kwargs: FillingFile(open(*args, **kwargs)), raising=False)
    code, _, err = run_cli(["merge", a, b, "--method", "average", "--output", tmp_path / "out", "-q"], capsys)
    assert_one_line_error(code, err, "filled", str(tmp_path))
    assert room["bytes"] < 4_000  # the writer did write until the disk was full
    assert _left_in(tmp_path, a, b) == set()


def _regmean_args(make_source, tmp_path):
    from test_every_method import random_images

    source = make_source("vit", 3, seed=1)
    images = random_images(tmp_path / "images")
    return source, images, ["merge", source, source, "--method", "regmean", "--data", images, "--param", "samples=4",
                            "--output", tmp_path / "out", "-q"]


def test_statistics_that_do_not_fit_the_cache_are_refused(make_source, tmp_path, monkeypatch, capsys):
    source, images, args = _regmean_args(make_source, tmp_path)
    (tmp_path / "hf_home").mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(tmp_path / "hf_home"))  # nothing to read back
    _little_room(monkeypatch, tmp_path / "hf_home", free=1_000)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "statistics", "1 kB free", str(tmp_path / "hf_home"))
    assert _left_in(tmp_path, source, images, tmp_path / "hf_home") == set()
    assert not list((tmp_path / "hf_home").rglob("*.safetensors*"))


def test_a_statistics_cache_that_fills_is_one_line_and_leaves_nothing(make_source, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    source, images, args = _regmean_args(make_source, tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(tmp_path / "hf_home"))
    cache = tmp_path / "hf_home" / "hfmerge" / "statistics"

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a part was written when the disk filled
        # safetensors' own words for ENOSPC (seen from a save_file on a full tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "filled", str(cache))
    assert list(cache.iterdir()) == []
    assert _left_in(tmp_path, source, images, tmp_path / "hf_home") == set()


def _user_namespaces() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
@pytest.mark.parametrize("case", ["too small", "fills anyway"])
def test_a_real_small_file_system(case, make_source, tmp_path):
    """On a real tmpfs, read by an unpatched hfmerge: refused up front, or filled by the files beside the weights.

    "fills anyway": a file takes all but the pages the weights need, so the check passes and the shard's header,
    the config or the card find the disk full.
    """
    import hfmerge

    a, b = make_source("vit", 3, seed=1), make_source("vit", 3, seed=2)
    weights, page = _weight_bytes(a / "model.safetensors"), 4096
    size, filler = (64 * 1024, 0) if case == "too small" else (200 * 1024, 200 * 1024 - -(-weights // page) * page)
    assert weights > 64 * 1024
    small = tmp_path / "small"
    small.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "{small}" && head -c {filler} /dev/zero > "{small}/filler" && '
              f'"{sys.executable}" -m hfmerge merge "{a}" "{b}" --method average --output "{small / "out"}" -q; '
              f'echo "rc=$?"; ls -A "{small}"')
    package = Path(hfmerge.__file__).parents[1]  # the hfmerge under test, whatever the installed one
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(package)})
    err = done.stderr.strip().splitlines()
    assert done.stdout.split() == ["rc=2", "filler"], (done.stdout, done.stderr)  # nothing else left on the disk
    assert len(err) == 1, done.stderr
    if case == "too small":
        assert err[0].startswith("hfmerge: error: not enough free space"), err[0]
        assert "65.5 kB free" in err[0], err[0]  # 64 KiB
    else:
        assert err[0].startswith("hfmerge: error: the disk filled while writing"), err[0]
        assert "No space left on device" in err[0], err[0]
