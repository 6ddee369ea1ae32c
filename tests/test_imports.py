"""`hfmerge --help`, `hfmerge methods` and usage errors answer without loading torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import contextlib, io, json, sys
from hfmerge.cli import main
heavy = lambda: sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
seen = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    seen[" ".join(argv)] = [code, heavy()]
import hfmerge
seen["hfmerge.Recipe"] = [hfmerge.Recipe.__module__, heavy()]
seen["hfmerge.merge"] = [hfmerge.merge.__module__, heavy()]
print(json.dumps(seen))
"""

COMMANDS = [
    ["--help"],
    ["--version"],
    ["methods"],
    ["merge", "org/a"],                                          # argparse: no --method
    ["merge", "org/a", "org/b", "--method", "nope", "-o", "x"],  # recipe: unknown method
    ["merge", "org/a", "org/b", "-m", "average", "--weights", "1,x", "-o", "x"],
    ["merge", "org/a@", "org/b", "-m", "average", "-o", "x"],    # a malformed source
    ["space", "--help"],
]


def test_help_methods_and_usage_errors_load_neither_torch_nor_transformers(tmp_path):
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(COMMANDS)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    expected_codes = {"--help": 0, "--version": 0, "methods": 0, "space --help": 0}
    for argv in COMMANDS:
        code, heavy = seen[" ".join(argv)]
        assert code == expected_codes.get(" ".join(argv), 2), argv
        assert heavy == [], argv
    assert seen["hfmerge.Recipe"] == ["hfmerge.recipe", []]  # the public names load lazily...
    assert seen["hfmerge.merge"][0] == "hfmerge.pipeline"    # ...and still resolve
    assert "torch" in seen["hfmerge.merge"][1]
