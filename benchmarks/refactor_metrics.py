"""Before/after numbers of a restructuring: the path a merge takes through the package, and its shape.

Measured the same way on two versions of hfmerge, each installed into its own
folder by :mod:`benchmarks.identical_outputs` (a real ``pip install --no-deps
--target``; a git ref from ``git archive``, a working tree as it is now) and
run on the demo's models that script builds and caches under ``--work``:

1. **The path of a run.** The demo's ``gating`` merge and its plain
   ``average`` merge (``merges()`` in ``demo/offline_demo.py``, with their
   ``--eval-data``, repo and dataset ids replaced by the local folders, run as
   ``identical_outputs`` runs them: ``merge ARGS --output OUT``, a fresh
   ``python -P`` with ``PYTHONPATH`` = the install, offline, one thread) under
   a ``sys.setprofile`` hook (and ``threading.setprofile``) installed by a
   small wrapper after ``import hfmerge.cli`` and before
   ``hfmerge.cli.main`` runs. It records, for every ``call`` event whose code
   file lies inside the install's ``hfmerge`` package, that file (an index;
   generator resumptions are ``call`` events too). From the sequence:
   distinct files entered; *moves*, consecutive recorded calls in different
   files; and how often the pipeline file and the stage file (old:
   ``hfmerge/pipeline.py``, ``hfmerge/stages.py``; new: ``hfmerge/run/...``)
   are entered, a run of consecutive calls in one file counting once. Module
   bodies run by imports during the merge (lazy imports) are recorded too
   (they are ``call`` events); the same numbers without them and without
   anything called while an ``hfmerge`` module is being imported are shown
   on the ``excl. imports`` rows.
2. **Hooks on MergeMethod** (``hfmerge.methods.base``): every method defined
   on the class, by introspection in a subprocess of that version; the public
   ones other than ``plan`` (abstract) and ``validate_parameters`` are the
   hooks a subclass may override (none is ``@final``); its ``ClassVar``
   declarations; and, per hook, how many registered methods override it.
3. **Largest file and function** of the installed package (lines; a
   function's ``end_lineno - lineno + 1`` by ``ast``, methods and nested
   functions included), ``hfmerge/testing/`` excluded.
4. **Package-root modules**: ``.py`` files directly in ``hfmerge/``.
5. **Old hooks called**: call sites of ``fine_tuning(`` and ``comparisons(``
   (not ``_fine_tuning(``; ``def`` lines counted apart), by regex over the
   package (``hfmerge/testing/`` excluded).

Usage::

    .venv/bin/python -m benchmarks.refactor_metrics --ref 88f9d7a [--against WORKTREE_OR_REF] [--work DIR]
        [--merges gating,average] [--files]

The merges run one at a time, on one thread; the tracer slows them (only counts are reported).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from benchmarks.identical_outputs import (
    DEFAULT_WORK,
    MERGE_TIMEOUT_S,
    ROOT,
    SAFE_PATH,
    Version,
    build,
    check_import,
    install,
    install_ref,
    local_args,
    run_env,
)

DEFAULT_MERGES = ("gating", "average")
PIPELINE_FILES = {"pipeline": ("hfmerge/run/pipeline.py", "hfmerge/pipeline.py"),
                  "stages": ("hfmerge/run/stages.py", "hfmerge/stages.py")}  # new first, then old
EXCLUDED = "hfmerge/testing/"

# argv: TARGET TRACE_FILE hfmerge-args...; writes TRACE_FILE.json (the files) and TRACE_FILE.bin (int32 per call:
# file index * 2 + 1 when the call happened while an hfmerge module was being imported, or is a module body)
TRACE_WRAPPER = """\
import os, sys, threading, json
from array import array
target, trace = sys.argv.pop(1), sys.argv.pop(1)
import hfmerge.cli
foreign = [m.__file__ for n, m in list(sys.modules.items()) if (n == "hfmerge" or n.startswith("hfmerge."))
           and getattr(m, "__file__", None) and not m.__file__.startswith(target)]
if foreign:
    sys.exit("refactor_metrics: hfmerge imported from outside " + target + ": " + ", ".join(foreign))
prefix = os.path.join(target, "hfmerge") + os.sep
index, names, seq, importing = {}, [], array("i"), [0]
def profile(frame, event, arg):
    if event == "call":
        code = frame.f_code
        i = index.get(code.co_filename)
        if i is None:
            i = index[code.co_filename] = len(names) if code.co_filename.startswith(prefix) else -1
            if i >= 0:
                names.append(code.co_filename[len(target) + 1:])
        if i >= 0:
            if code.co_name == "<module>":
                importing[0] += 1
                seq.append(2 * i + 1)
            else:
                seq.append(2 * i + (importing[0] > 0))
    elif event == "return" and importing[0] and frame.f_code.co_name == "<module>" \\
            and frame.f_code.co_filename.startswith(prefix):
        importing[0] -= 1
main = hfmerge.cli.main
sys.argv[0] = "hfmerge"
threading.setprofile(profile)
sys.setprofile(profile)
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
finally:
    sys.setprofile(None)
    threading.setprofile(None)
with open(trace + ".bin", "wb") as stream:
    seq.tofile(stream)
with open(trace + ".json", "w") as stream:
    json.dump({"files": names, "calls": len(seq)}, stream)
sys.exit(code)
"""

# prints JSON: MergeMethod's methods and ClassVars, and how many registered methods override each method
HOOKS_WRAPPER = """\
import inspect, json, sys
from hfmerge.methods import base
cls = base.MergeMethod
names = base.available_methods()  # imports hfmerge's methods (and plug-ins)
methods = []
for name, value in vars(cls).items():
    if name.startswith("__"):
        continue
    kind = ("staticmethod" if isinstance(value, staticmethod) else "classmethod" if isinstance(value, classmethod)
            else "property" if isinstance(value, property) else "method" if inspect.isfunction(value) else None)
    if kind is None:
        continue
    function = value.__func__ if kind in ("staticmethod", "classmethod") else value.fget if kind == "property" else value
    overridden = sum(any(name in vars(k) for k in type(base._REGISTRY[m]).__mro__ if k is not cls)
                     for m in names)
    methods.append({"name": name, "kind": kind, "abstract": bool(getattr(function, "__isabstractmethod__", False)),
                    "final": bool(getattr(function, "__final__", False)), "overridden_by": overridden})
annotations = vars(cls).get("__annotations__", {})
classvars = [name for name, annotation in annotations.items() if "ClassVar" in str(annotation)]
print(json.dumps({"file": inspect.getsourcefile(cls), "methods": methods, "classvars": classvars,
                  "registered": len(names)}))
"""


# --------------------------------------------------------------------------- 1. the path of a run

def run_traced(version: Version, merge: str, args: list[str], work: Path, slot: str) -> dict[str, Any]:
    """Run ``merge`` with ``version`` under the tracer; the recorded files and call sequence."""
    folder = work / "metrics" / slot
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "hf_home").mkdir(parents=True)
    trace, log = folder / "trace", folder / f"{merge}.log"
    command = [sys.executable, *SAFE_PATH, "-c", TRACE_WRAPPER, str(version.target), str(trace), "merge", *args,
               "--output", str(folder / "merged" / merge)]
    started = time.time()
    with log.open("w") as stream:
        code = subprocess.run(command, check=False, cwd=folder, env=run_env(version, folder / "hf_home", 1),
                              stdout=stream, stderr=subprocess.STDOUT, timeout=MERGE_TIMEOUT_S).returncode
    seconds = time.time() - started
    if code != 0 or not trace.with_suffix(".bin").exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{merge} with {version.label} failed (exit {code}); see {log}:\n{tail}")
    files = json.loads(trace.with_suffix(".json").read_text())["files"]
    seq = array("i")
    with trace.with_suffix(".bin").open("rb") as stream:
        seq.frombytes(stream.read())
    shutil.rmtree(folder / "merged", ignore_errors=True)
    roles = {role: next((c for c in candidates if (version.target / c).exists()), candidates[-1])
             for role, candidates in PIPELINE_FILES.items()}
    return {"files": files, "seq": seq, "seconds": seconds, "roles": roles}


def runs_of(sequence: list[int]) -> list[int]:
    """``sequence`` with consecutive repeats collapsed: one entry per run of calls in one file."""
    return [x for i, x in enumerate(sequence) if i == 0 or sequence[i - 1] != x]


def path_metrics(traced: dict[str, Any], *, imports: bool) -> dict[str, Any]:
    """Distinct files, moves, runs per file of a traced sequence (``imports``: keep import-time calls)."""
    files = traced["files"]
    sequence = [code >> 1 for code in traced["seq"] if imports or not code & 1]
    runs = runs_of(sequence)
    entered: dict[str, int] = {}
    for i in runs:
        entered[files[i]] = entered.get(files[i], 0) + 1
    metrics = {"calls": len(sequence), "files": len(entered), "moves": max(len(runs) - 1, 0), "entered": entered}
    for role, name in traced["roles"].items():
        metrics[role] = (name, entered.get(name, 0))
    return metrics


# --------------------------------------------------------------------------- 2-5. the package's shape

def hooks(version: Version, work: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *SAFE_PATH, "-c", HOOKS_WRAPPER], check=False, cwd=work,
                          capture_output=True, text=True, env=run_env(version, work / "hf_home-check", 1))
    if done.returncode != 0:
        raise SystemExit(f"{version.label}: introspecting MergeMethod failed:\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["hooks"] = [m for m in data["methods"] if not m["name"].startswith("_") and not m["final"]
                     and m["name"] not in ("plan", "validate_parameters")]
    return data


def package_files(version: Version) -> list[Path]:
    package = version.target / "hfmerge"
    return sorted(p for p in package.rglob("*.py")
                  if not str(p.relative_to(version.target)).startswith(EXCLUDED) and "__pycache__" not in p.parts)


def functions(tree: ast.AST) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method of a module, nested ones included."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


OLD_HOOK_CALL = {name: re.compile(rf"(?<![\w]){name}\(") for name in ("fine_tuning", "comparisons")}
# the new code's counterparts: a method's private function, handed to a stage it declares
NEW_EQUIVALENT = {"fine_tuning": ("_fine_tuning", "FineTune"), "comparisons": ("_comparisons", "Compare")}
NEW_PATTERNS = {name: (re.compile(rf"(?<![\w]){private}\("), re.compile(rf"(?<![\w.]){stage}\("))
                for name, (private, stage) in NEW_EQUIVALENT.items()}


def shape(version: Version) -> dict[str, Any]:
    files = package_files(version)
    sizes, largest_function = {}, ("", "", 0)
    calls = {name: {"calls": 0, "defs": 0, "private_calls": 0, "stages": 0} for name in OLD_HOOK_CALL}
    for path in files:
        relative = str(path.relative_to(version.target))
        text = path.read_text()
        sizes[relative] = len(text.splitlines())
        for qualname, lines in functions(ast.parse(text, filename=relative)):
            if lines > largest_function[2]:
                largest_function = (relative, qualname, lines)
        for line in text.splitlines():
            is_def = line.lstrip().startswith(("def ", "async def "))
            for name, pattern in OLD_HOOK_CALL.items():
                private, stage = NEW_PATTERNS[name]
                if pattern.search(line):
                    calls[name]["defs" if is_def else "calls"] += 1
                if private.search(line) and not is_def:
                    calls[name]["private_calls"] += 1
                if stage.search(line) and not line.lstrip().startswith(("class ", "def ")):
                    calls[name]["stages"] += 1
    largest_file = max(sizes.items(), key=lambda item: item[1])
    root = sorted(p.name for p in (version.target / "hfmerge").glob("*.py"))
    return {"largest_file": largest_file, "largest_function": largest_function, "root": root,
            "hook_calls": calls, "files": len(files), "lines": sum(sizes.values())}


# --------------------------------------------------------------------------- the report

def table(rows: list[tuple[str, str, str]], old: Version, new: Version) -> str:
    lines = [f"| metric | old: {old.label} | new: {new.label} |", "|---|---|---|"]
    lines += [f"| {metric} | {a} | {b} |" for metric, a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refactor_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="the old version: a commit or ref of this repository")
    parser.add_argument("--against", default=str(ROOT),
                        help="the new version: a working tree folder (default: this one, as it is now) or a ref")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="models and installs, shared with benchmarks.identical_outputs "
                             f"(default: {DEFAULT_WORK.relative_to(ROOT)})")
    parser.add_argument("--merges", default=",".join(DEFAULT_MERGES), help="the demo's merges to trace")
    parser.add_argument("--files", action="store_true", help="also list, per merge, the files entered and how often")
    options = parser.parse_args(argv)
    started = time.time()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    old, new = install_ref(options.ref, work), install(options.against, work)
    for version in (old, new):
        check_import(version, work, 1)
    sources = build(new, work, 1)
    merges = {name: local_args(args, sources["folders"]) for name, args in sources["merges"].items()}
    chosen = options.merges.split(",")
    unknown = [name for name in chosen if name not in merges]
    if unknown:
        print(f"unknown merge(s) {', '.join(unknown)}; the demo's merges are: {', '.join(merges)}", file=sys.stderr)
        return 2

    rows: list[tuple[str, str, str]] = []
    traces: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, list[float]] = {}
    for merge in chosen:
        traced = [run_traced(version, merge, merges[merge], work, slot)
                  for version, slot in ((old, "old"), (new, "new"))]
        seconds[merge] = [t["seconds"] for t in traced]
        for imports in (True, False):
            metrics = [path_metrics(t, imports=imports) for t in traced]
            if imports:
                traces[merge] = metrics
            tag = f"`{merge}`" + ("" if imports else ", excl. imports")
            rows.append((f"{tag}: hfmerge calls recorded", *(f"{m['calls']:,}" for m in metrics)))
            rows.append((f"{tag}: distinct hfmerge files entered", *(str(m["files"]) for m in metrics)))
            rows.append((f"{tag}: moves (consecutive calls in different files)", *(f"{m['moves']:,}" for m in metrics)))
            for role in PIPELINE_FILES:
                rows.append((f"{tag}: {role} file entered (runs)",
                             *(f"{m[role][1]:,} (`{m[role][0]}`)" for m in metrics)))

    shapes = [shape(v) for v in (old, new)]
    hook_data = [hooks(v, work) for v in (old, new)]
    rows.append(("MergeMethod: methods defined", *(", ".join(
        f"`{m['name']}`" + (" (abstract)" if m["abstract"] else "") + ("" if m["kind"] == "method" else f" ({m['kind']})")
        for m in h["methods"]) for h in hook_data)))
    rows.append(("MergeMethod: overridable hooks (public, not `plan`/`validate_parameters`)",
                 *(str(len(h["hooks"])) for h in hook_data)))
    rows.append(("MergeMethod: hooks overridden by ≥1 registered method",
                 *(f"{sum(m['overridden_by'] > 0 for m in h['hooks'])} of {len(h['hooks'])} "
                   f"({h['registered']} methods registered)" for h in hook_data)))
    rows.append(("MergeMethod: ClassVar declarations", *(str(len(h["classvars"])) for h in hook_data)))
    rows.append(("largest file (lines, excl. `hfmerge/testing/`)",
                 *(f"`{s['largest_file'][0]}` ({s['largest_file'][1]})" for s in shapes)))
    rows.append(("largest function (lines, methods incl.)",
                 *(f"`{s['largest_function'][0]}:{s['largest_function'][1]}` ({s['largest_function'][2]})"
                   for s in shapes)))
    rows.append(("package-root modules (`hfmerge/*.py`)", *(str(len(s["root"])) for s in shapes)))
    rows.append(("package files / lines (excl. `hfmerge/testing/`)",
                 *(f"{s['files']} / {s['lines']:,}" for s in shapes)))
    for name in OLD_HOOK_CALL:
        rows.append((f"call sites of `{name}(` (defs apart)",
                     *(f"{s['hook_calls'][name]['calls']} ({s['hook_calls'][name]['defs']} defs)" for s in shapes)))
    for name, (private, stage) in NEW_EQUIVALENT.items():
        rows.append((f"counterpart: call sites of `{private}(` / `{stage}(` stage declarations",
                     *(f"{s['hook_calls'][name]['private_calls']} / {s['hook_calls'][name]['stages']}" for s in shapes)))

    print(f"\nold: {old.label} (installed at {old.target}); new: {new.label} (installed at {new.target})")
    print(f"models: {sources['folder']} ({'cached' if sources['cached'] else 'trained now'})\n")
    print(table(rows, old, new))
    print("\nHooks:")
    for version, h in zip((old, new), hook_data):
        listed = ", ".join(f"`{m['name']}` ({m['overridden_by']})" for m in h["hooks"])
        print(f"- {version.label}: {listed} — (n) = registered methods overriding it; "
              f"ClassVars: {', '.join(h['classvars'])}")
    print("\nPackage-root modules:")
    for version, s in zip((old, new), shapes):
        print(f"- {version.label}: {', '.join(s['root'])}")
    if options.files:
        for merge, metrics in traces.items():
            print(f"\nFiles entered by `{merge}` (runs of consecutive calls, all calls):")
            for version, m in zip((old, new), metrics):
                print(f"- {version.label}: " + ", ".join(f"{name} {count}" for name, count in
                                                        sorted(m["entered"].items(), key=lambda item: -item[1])))
    timing = "; ".join(f"{merge} {a:.0f} s / {b:.0f} s" for merge, (a, b) in seconds.items())
    print(f"\nTraced merges, old / new (slowed by the tracer): {timing}. {time.time() - started:.0f} s in all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
