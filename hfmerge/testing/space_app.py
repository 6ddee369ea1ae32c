"""Running a written Space's ``app.py`` in its own interpreter, as the Hub would, for tests and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hfmerge.testing.ports import free_port

# A Space must not need hfmerge: this makes ``import hfmerge`` fail inside the app, which otherwise runs
# as ``python app.py`` would (its folder first on sys.path, for the modules beside it).
_WITHOUT_HFMERGE = (
    "import os, runpy, sys; sys.modules['hfmerge'] = None; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')"
)


@contextmanager
def running_space(folder: Path, log_path: Path, *, without_hfmerge: bool = False,
                  timeout: float = 120.0) -> Iterator[str]:
    """Start ``folder/app.py`` on loopback; yield its URL once it answers, and stop it after the block.

    The environment (``HF_ENDPOINT``, ``HF_HOME``…) is this process's; the
    app's output goes to ``log_path``.

    Raises:
        RuntimeError: the app exited, or did not answer within ``timeout`` seconds; the message holds its log.
    """
    port = free_port()
    app = [str(folder / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    command = [sys.executable, "-c", _WITHOUT_HFMERGE, *app] if without_hfmerge else [sys.executable, *app]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": ""})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the Space exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Space did not answer within {timeout:g} s:\n{log_path.read_text()}") \
                        from None
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
