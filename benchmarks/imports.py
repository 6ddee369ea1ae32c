"""A static merge as a whole process: imports against work, before and after the inspection cache.

Merges two ViT-B/16-sized classifiers (``stream.py``'s: built offline from a config, random weights,
float32, 330 MiB each) with ``python -m hfmerge merge a b -m average -o out -q``, the way a user runs
it, and times, in one run, interleaved within each repeat:

* ``import torch``  — ``python -c "import torch"``: what every process here pays at least;
* floor             — ``stream.py``'s physical floor in a fresh process: read both sources once from the
                      warm page cache, write one model's bytes, no library (``stream.py --measure floor``);
* for each version (``before``: ``--before``'s hfmerge, from ``git archive``, on PYTHONPATH; ``after``:
  this checkout's), and for ``after`` with an empty inspection cache (cold) and with the cache the
  previous run left (warm):
  * merge           — the whole CLI process, start to exit;
  * imports         — a process that imports exactly the modules that merge's process had loaded at its
                      end (recorded once per version and state by an untimed run), in their order, and
                      exits: interpreter start-up and imports, no work.

work = merge − imports, in wall seconds and in CPU seconds (user + system of the process, all threads;
the floor's: of its timed section), the second being what a busy machine changes least. Every process starts from a warm page cache (the sources are read before each
run), after ``os.sync()`` (so no run pays for an earlier one's writeback), with HF_HUB_OFFLINE=1 and a
private HF_HOME. Medians of ``--repeats``. Usage: ``python benchmarks/imports.py [--repeats 5]
[--before 065bc57] [--workdir DIR]``; the raw runs go to ``DIR/imports.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
sys.path.insert(0, str(HERE))

import stream  # noqa: E402  (the sources and the floor, as stream.py makes and measures them)

_RECORD = """
import json, sys
from hfmerge.cli import main
code = main(sys.argv[2:])
import hfmerge
json.dump({"code": code, "hfmerge": hfmerge.__file__, "modules": list(sys.modules)}, open(sys.argv[1], "w"))
"""

_IMPORT_ONLY = """
import importlib, json, sys
failed = []
for name in json.load(open(sys.argv[1])):
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
print(json.dumps(failed))
"""

_NOT_IMPORTED = {"__main__", "__mp_main__", "hfmerge.__main__"}
"""Modules of the merge's process that the imports-only process must not import (they would run the CLI)."""


def extract(ref: str, folder: Path) -> Path:
    """``ref``'s ``hfmerge`` package in ``folder`` (``git archive``), once."""
    if not (folder / "hfmerge" / "__init__.py").exists():
        archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", ref, "hfmerge"], capture_output=True,
                                 check=True).stdout
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    return folder


def _median(values: list[float]) -> float:
    """(``statistics`` is this folder's statistics.py here, the script's folder being first on sys.path.)"""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds and CPU seconds (user + system, all threads) of ``command`` as a fresh process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=env["BENCH_CWD"])
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{done.stderr[-3000:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(HERE / "out-imports"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="065bc57", help="the version to compare against (a git ref)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sources = stream.prepare(workdir, 2)
    roots = {"before": extract(args.before, workdir / f"before-{args.before}"), "after": CHECKOUT}
    home = workdir / "hf-home"
    inspection = home / "hfmerge" / "inspection"
    base_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HOME": str(home), "BENCH_CWD": str(workdir)}
    base_env.pop("PYTHONPATH", None)

    def env_of(version: str) -> dict[str, str]:
        return {**base_env, "PYTHONPATH": str(roots[version])}

    def merge_command(output: Path, *prefix: str) -> list[str]:
        return [sys.executable, *prefix, "merge", *map(str, sources), "-m", "average", "-o", str(output), "-q"]

    cases = [("before", "no cache"), ("after", "cold"), ("after", "warm")]  # in this order: cold leaves warm's cache
    output = workdir / "out-merge"

    def prepare_run(version: str, state: str) -> None:
        shutil.rmtree(output, ignore_errors=True)
        if state == "cold" or version == "before":
            shutil.rmtree(inspection, ignore_errors=True)
        os.sync()
        stream.warm(sources)

    modules: dict[tuple[str, str], Path] = {}
    for version, state in cases:  # what each merge's process loads, recorded by an untimed run
        prepare_run(version, state)
        record = workdir / f"modules-{version}-{state.replace(' ', '-')}.json"
        timed(merge_command(output, "-c", _RECORD, str(record)), env_of(version))
        loaded = json.loads(record.read_text())
        if not loaded["hfmerge"].startswith(str(roots[version])):
            raise RuntimeError(f"{version} ran {loaded['hfmerge']}, not the hfmerge in {roots[version]}")
        names = [m for m in loaded["modules"] if m not in _NOT_IMPORTED]
        listing = workdir / f"import-{version}-{state.replace(' ', '-')}.json"
        listing.write_text(json.dumps(names))
        modules[(version, state)] = listing
        print(f"{version} ({state}): {len(names)} modules, "
              f"modeling_utils {'loaded' if 'transformers.modeling_utils' in names else 'not loaded'}", flush=True)

    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[float]] = {}
    failed_imports: dict[str, list[str]] = {}

    def record(name: str, wall: float, cpu: float) -> None:
        runs.setdefault(f"{name} wall", []).append(wall)
        runs.setdefault(f"{name} cpu", []).append(cpu)

    for repeat in range(args.repeats):
        os.sync()
        record("import torch", *timed([sys.executable, "-c", "import torch"], env_of("after"))[:2])
        shutil.rmtree(stream.output_folder(workdir, "floor"), ignore_errors=True)
        os.sync()
        stream.warm(sources)
        _, _, out = timed([sys.executable, str(HERE / "stream.py"), "--workdir", str(workdir), "--measure", "floor",
                           "--count", "2"], env_of("after"))
        floor = json.loads(out.strip().splitlines()[-1])
        record("floor", floor["wall_s"], floor["cpu_s"])
        for key in ("read_s", "write_s"):
            runs.setdefault(f"floor {key}", []).append(floor[key])
        for version, state in cases:
            label = f"{version} ({state})"
            prepare_run(version, state)
            wall, cpu, out = timed([sys.executable, "-c", _IMPORT_ONLY, str(modules[(version, state)])],
                                   env_of(version))
            record(f"{label} imports", wall, cpu)
            failed_imports[label] = json.loads(out.strip().splitlines()[-1])
            prepare_run(version, state)
            if state == "warm" and not any(inspection.glob("*.json")):
                raise RuntimeError("the warm run found no inspection cache: the cold run before it should have left one")
            record(f"{label} merge", *timed(merge_command(output, "-m", "hfmerge"), env_of(version))[:2])
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) +
              f"; load {os.getloadavg()[0]:.2f}", flush=True)

    median = {k: _median(v) for k, v in runs.items()}
    (workdir / "imports.json").write_text(json.dumps({"runs": runs, "median": median, "failed_imports": failed_imports,
                                                      "before": args.before}, indent=2))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; medians of {args.repeats}")
    print(f"floor (read 2 models + write 1): {median['floor wall']:.2f} s wall (read {median['floor read_s']:.2f} + "
          f"write {median['floor write_s']:.2f}), {median['floor cpu']:.2f} s CPU")
    for measure in ("wall", "cpu"):
        floor = median[f"floor {measure}"]
        print(f"\n{measure} seconds{' (user + system, all threads)' if measure == 'cpu' else ''}; "
              f"`python -c \"import torch\"`: {median[f'import torch {measure}']:.2f} s")
        print("| version | merge (whole process) | imports | work = merge − imports | floor | merge / floor | "
              "work / floor |")
        print("|---|---|---|---|---|---|---|")
        for version, state in cases:
            label = f"{version} ({state})"
            merge, imports = median[f"{label} merge {measure}"], median[f"{label} imports {measure}"]
            print(f"| {label} | {merge:.2f} s | {imports:.2f} s | {merge - imports:.2f} s | {floor:.2f} s | "
                  f"{merge / floor:.1f} | {(merge - imports) / floor:.1f} |")
    if any(failed_imports.values()):
        print(f"modules the imports-only process could not import alone: {failed_imports}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
