"""`hfmerge --help`, `hfmerge methods` and usage errors answer without loading torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hfmerge
from hfmerge.publish.manifest import MANIFEST_FILE

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
    assert seen["hfmerge.merge"][0] == "hfmerge.run.pipeline"    # ...and still resolve
    assert "torch" in seen["hfmerge.merge"][1]


_STATIC_MERGE = """
import sys
from hfmerge.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "torchmetrics"})
state = sys.modules.get("accelerate.state")  # transformers imports accelerate itself; no Accelerator is made
made = bool(state and (state.PartialState._shared_state or state.AcceleratorState._shared_state))
print(code, loaded, made)
"""


def test_a_method_that_reads_no_data_runs_without_the_data_stages(make_source, tmp_path):
    """average makes no Accelerator and imports neither datasets nor torchmetrics: it streams as it always did."""
    a, b = make_source("vit", seed=1), make_source("vit", seed=2)
    done = subprocess.run([sys.executable, "-c", _STATIC_MERGE, "merge", str(a), str(b), "-m", "average",
                           "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["0", "[]", "False"]


_MERGE = """
import sys
from hfmerge.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in MODELING if m in sys.modules))
""".replace("MODELING", repr(("transformers.modeling_utils", "accelerate", "scipy", "torch._dynamo")))


def test_a_second_static_merge_imports_no_modeling_code(make_source, tmp_path):
    """The first merge of a model reads what its class says from the class itself (transformers' modeling code,
    which imports torch's compiler, scipy and accelerate: seconds); the second reads it from the inspection
    cache in HF_HOME, imports none of them, and writes the same files."""
    a, b = make_source("vit", seed=1), make_source("vit", seed=2)
    checkout = str(Path(hfmerge.__file__).parent.parent)  # this checkout's hfmerge, whatever is installed
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))}
    seen = {}
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", _MERGE, "merge", str(a), str(b), "-m", "average",
                               "-o", str(tmp_path / run), "-q"], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        seen[run] = done.stdout.splitlines()[-1]
    assert seen["first"].startswith("0 ") and "transformers.modeling_utils" in seen["first"]
    assert seen["second"] == "0 []"
    first, second = tmp_path / "first", tmp_path / "second"
    assert sorted(p.name for p in second.iterdir()) == sorted(p.name for p in first.iterdir())
    # the list of hfmerge's files holds their modification times; every file it lists is compared
    assert all((second / p.name).read_bytes() == p.read_bytes() for p in first.iterdir() if p.name != MANIFEST_FILE)
