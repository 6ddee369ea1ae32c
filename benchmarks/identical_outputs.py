"""Do two versions of hfmerge make the same merges? The demo's merges, run by each, compared file by file.

Why: a refactor must not change behaviour. The bar is that the static methods'
outputs (no data read) are byte-identical to the reference commit's on the
demo's models, and the data methods' (statistics, fine-tuning, a trained gate)
equal to float tolerance. This script checks exactly that:

1. Builds the demo's source models and datasets once (``demo/offline_demo.py``'s
   settings: its ``DEMO_VIT`` ViTs, the tiny MobileNetV2 gate, the two digit
   ResNets, the five digit tasks) with the *new* version's
   :mod:`hfmerge.testing` code, and saves them as local folders (models as
   ``save_pretrained`` folders, datasets as ``save_to_disk`` folders), so no Hub
   server is needed. They are cached under ``--work`` by a hash of the settings
   (and library versions): a rerun skips training.
2. Installs each version into its own folder with a real, non-editable
   ``pip install --no-deps --target`` (the package maps the top-level
   ``model_cards/`` and ``spaces/`` folders into ``hfmerge.model_cards`` and
   ``hfmerge.spaces``, so a source tree on ``PYTHONPATH`` is not the package):
   a git ref from ``git archive``, a working tree from its tracked and
   untracked-but-not-ignored files. Reference commits' installs are cached.
3. Runs every merge of the demo (``merges()`` in ``demo/offline_demo.py``, its
   repo and dataset ids replaced by the local folders, plus ``otfusion_weights``:
   the ResNets' OTFusion with ``--param cost=weights``, which reads no data)
   with each version through the CLI, ``python -m hfmerge merge ... --output
   OUT``, in a fresh subprocess with ``PYTHONPATH`` = that version's install
   folder and ``-P`` (the venv's editable install of the working tree must not
   win). Every run asserts that each ``hfmerge`` module it imported came from
   that folder. Both versions run with the same command line, the same
   working directory, the same (emptied) ``HF_HOME``, the same output path
   (moved aside afterwards), ``HF_HUB_OFFLINE=1``, telemetry off and one
   thread, so that a card naming a path or the thread count reads the same.
4. Compares each merge's output folders: a merge that reads no ``--data`` is
   *static* and every file must match byte for byte (sha256); for a *data*
   merge each tensor of the ``.safetensors`` files must match to tolerance
   (``torch.allclose``, the max absolute difference reported) and every other
   file byte for byte. Some text differs between two runs of the *same* code:
   ``--self-check`` runs the reference a second time for the named merges and
   records what differed (in ``--work``, reused by later runs of that
   reference). A changed cell of a markdown table makes its column volatile in
   every table with that header (the evaluation table's latency column, at
   88f9d7a); a changed line elsewhere makes its changing numbers volatile.
   Cards and ``hfmerge.yaml`` are then compared with only those cells and
   numbers masked, and the report says so, per file, and lists what was seen
   to change. Files that change as a whole, or tensors that change run to run,
   are listed and never masked.
5. Prints a table (merge, kind, files compared, identical?, max tensor
   difference, seconds per version), the details of every difference, and
   exits 1 if anything differs beyond tolerance (or a merge failed).

Usage::

    .venv/bin/python -m benchmarks.identical_outputs --ref 88f9d7a \\
        [--against WORKTREE_OR_REF] [--work DIR] [--methods average,regmean,...] \\
        [--self-check [MERGE,...]] [--rtol 1e-5] [--atol 1e-6] [--threads 1]

``--against`` defaults to this working tree; give ``HEAD`` (or any ref) to
compare a commit instead, e.g. while the working tree is broken mid-refactor.
The one heavy process at a time (training, then each merge) runs on one CPU
thread by default.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path("demo") / "offline_demo.py"
DEFAULT_WORK = ROOT / "benchmarks" / "out" / "identical-outputs"
DEFAULT_SELF_CHECK = "fusion_finetuned"  # trains, evaluates and writes a card: where run-to-run noise would show
BUILD_COMMAND = "_build-sources"  # internal: the subprocess that builds the demo's models with the new code
# -P: no working directory or script folder on sys.path (Python 3.11+; the subprocesses run in folders of --work
# that hold no hfmerge, and the script is loaded by path, not run: benchmarks/statistics.py must not shadow statistics)
SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []
BUILD_WRAPPER = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("identical_outputs", sys.argv[1])
module = sys.modules["identical_outputs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))
"""
MERGE_TIMEOUT_S = 1800
EXTRA_MERGES = ("otfusion_weights",)  # not in the demo: OTFusion of the ResNets from their weights, no data

# Runs `python -m hfmerge ARGS` (runpy, as -m does) and checks that every hfmerge module came from the install.
MERGE_WRAPPER = """\
import runpy, sys
target = sys.argv.pop(1)
def foreign():
    return sorted(f"{name} ({getattr(module, '__file__', None)})" for name, module in list(sys.modules.items())
                  if (name == "hfmerge" or name.startswith("hfmerge.")) and getattr(module, "__file__", None)
                  and not module.__file__.startswith(target))
import hfmerge
if foreign():
    sys.exit("identical_outputs: hfmerge imported from outside " + target + ": " + ", ".join(foreign()))
sys.argv[0] = "hfmerge"
try:
    runpy.run_module("hfmerge", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
if foreign():
    print("identical_outputs: hfmerge modules imported from outside " + target + ": " + ", ".join(foreign()),
          file=sys.stderr)
    code = 97
sys.exit(code)
"""

# Prints where hfmerge and the folders the package maps (model_cards, spaces) are imported from.
WHERE_WRAPPER = """\
import json, sys
import hfmerge, hfmerge.model_cards, hfmerge.spaces
print(json.dumps({name: getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
                  for name, module in sys.modules.items() if name == "hfmerge" or name.startswith("hfmerge.")}))
"""

# a number in a line of text: a hex digest, or a decimal (thousands separators, exponent); masked as WILDCARD
NUMBER = re.compile(r"(?<![0-9a-z])[0-9a-f]{8,}(?![0-9a-z])|[0-9]+(?:[.,][0-9]+)*(?:e[-+]?[0-9]+)?", re.IGNORECASE)
WILDCARD = r"[0-9a-fA-F.,eE+-]+"
VOLATILE = "<volatile>"
TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


# --------------------------------------------------------------------------- the demo's models, with the new code

def demo_definitions(demo_file: Path) -> dict[str, Any]:
    """The demo's top-level imports, constants and functions (``merges``, ``repo``, ``DEMO_VIT``...), run.

    Only imports, assignments and definitions run: the demo's module body also
    binds a port and rewrites ``os.environ``, which this must not do. An import
    that fails is skipped (a name only the demo's other steps use).
    """
    tree = ast.parse(demo_file.read_text(), filename=str(demo_file))
    namespace: dict[str, Any] = {"__file__": str(demo_file), "__name__": "offline_demo_definitions"}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.FunctionDef)):
            continue
        code = compile(ast.Module(body=[node], type_ignores=[]), str(demo_file), "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the repository's own demo file
        except ImportError:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                raise
    return namespace


def build_sources(work: Path, demo_file: Path) -> dict[str, Any]:
    """Train and save the demo's models and datasets under ``work/sources/<key>`` unless saved already.

    Returns ``{"key", "folder", "cached", "seconds", "folders": {demo id: absolute path}, "merges": {name: args}}``.
    Runs in a subprocess whose ``hfmerge`` is the new version's install.
    """
    import datasets
    import torch
    import transformers

    from hfmerge.testing import digit_resnets
    from hfmerge.testing.tasks import TASKS, digit_task
    from hfmerge.testing.tiny_gate import save_tiny_gate

    demo = demo_definitions(demo_file)
    vits, seeds, gate = demo["GATING_MODELS"], demo["SEEDS"], demo["GATE"]
    namespace = gate.split("/")[0]  # the demo pushes everything under one namespace
    settings = {"vit": repr(demo["DEMO_VIT"]), "vits": list(vits), "gate": gate,
                "resnets": {name: repr(digit_resnets.SEEDS[name]) for name in seeds}, "tasks": list(TASKS),
                "versions": [torch.__version__, transformers.__version__, datasets.__version__]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = work / "sources" / key
    manifest = folder / "manifest.json"
    started = time.time()
    cached = manifest.exists()
    if not cached:
        partial = folder.with_name(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        torch.set_num_threads(1)
        trained = demo["train_digit_models"](partial / "models", demo["DEMO_VIT"], models=vits)
        local = {demo["repo"](name): path for name, path in trained.items()}
        local[gate] = save_tiny_gate(partial / "models" / gate.split("/")[1])
        resnets = demo["train_digit_resnets"](partial / "models", tuple(seeds))
        local.update({seeds[name]: path for name, path in resnets.items()})
        for task in TASKS:
            digit_task(task).save_to_disk(str(partial / "data" / task))
            local[f"{namespace}/{task}"] = partial / "data" / task
        relative = {repo_id: str(Path(path).relative_to(partial)) for repo_id, path in local.items()}
        (partial / "manifest.json").write_text(json.dumps({"settings": settings, "folders": relative}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    relative = json.loads(manifest.read_text())["folders"]
    return {"key": key, "folder": str(folder), "cached": cached, "seconds": time.time() - started,
            "folders": {repo_id: str(folder / path) for repo_id, path in relative.items()},
            "merges": demo["merges"]()}


# --------------------------------------------------------------------------- the versions, installed

@dataclass(frozen=True)
class Version:
    """One version of hfmerge, installed into its own folder."""

    label: str  # as the report names it
    target: Path  # the install folder that PYTHONPATH names
    source: Path  # the copy of its files it was installed from
    commit: str = ""  # a ref's commit sha ("" for a working tree)


def git(*args: str, cwd: Path = ROOT, text: bool = True) -> Any:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=text).stdout


def pip_install(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--target", str(target), str(source)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip could not install {source} into {target}:\n{done.stdout}{done.stderr}")
    (target / ".identical-outputs-installed").write_text(str(source))


def install_ref(ref: str, work: Path) -> Version:
    """``git archive`` of ``ref`` from this repository, installed (cached by commit)."""
    try:
        sha = git("rev-parse", "--verify", f"{ref}^{{commit}}").strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"{ref!r} is neither a folder nor a commit of {ROOT}") from None
    source, target = work / "src" / sha[:12], work / "installs" / sha[:12]
    if not (target / ".identical-outputs-installed").exists():
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        archive = git("archive", sha, text=False)
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        pip_install(source, target)
    label = sha[:7] if sha.startswith(ref) else f"{ref} ({sha[:7]})"
    return Version(label=label, target=target, source=source, commit=sha)


def install_tree(tree: Path, work: Path) -> Version:
    """A working tree's tracked and untracked-but-not-ignored files, as they are now, installed."""
    listed = git("ls-files", "-z", "-co", "--exclude-standard", cwd=tree).split("\0")
    files = sorted({name for name in listed if name and (tree / name).is_file()})
    source = work / "src" / "worktree"
    shutil.rmtree(source, ignore_errors=True)
    digest = hashlib.sha256()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / name, source / name)
        digest.update(name.encode() + b"\0" + (source / name).read_bytes() + b"\0")
    target = work / "installs" / f"worktree-{digest.hexdigest()[:12]}"
    if not (target / ".identical-outputs-installed").exists():
        pip_install(source, target)
    try:
        head = git("rev-parse", "--short=7", "HEAD", cwd=tree).strip()
        changed = git("status", "--porcelain", "--untracked-files=no", cwd=tree).strip()
        state = f"HEAD {head}" + (f" + {len(changed.splitlines())} changed files" if changed else ", clean")
    except subprocess.CalledProcessError:  # a repository with no commit yet
        state = f"{len(files)} files"
    return Version(label=f"worktree ({state})", target=target, source=source)


def install(what: str, work: Path) -> Version:
    path = Path(what).expanduser()
    if path.is_dir():
        return install_tree(path.resolve(), work)
    return install_ref(what, work)


def run_env(version: Version, hf_home: Path, threads: int) -> dict[str, str]:
    """The environment of every subprocess: the install first on the path, offline, quiet, ``threads`` threads."""
    dropped = ("HF_", "HUGGINGFACE_", "PYTHON", "TRANSFORMERS_", "GRADIO_", "OMP_", "MKL_")
    env = {name: value for name, value in os.environ.items() if not name.startswith(dropped)}
    env.update(PYTHONPATH=str(version.target), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", GRADIO_ANALYTICS_ENABLED="False",
               TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return env


def check_import(version: Version, work: Path, threads: int) -> None:
    """Fail unless ``hfmerge`` (with its mapped ``model_cards`` and ``spaces``) imports from the install alone."""
    done = subprocess.run([sys.executable, *SAFE_PATH, "-c", WHERE_WRAPPER], check=False, cwd=work,
                          capture_output=True, text=True, env=run_env(version, work / "hf_home-check", threads))
    if done.returncode != 0:
        raise SystemExit(f"{version.label}: hfmerge does not import from {version.target}:\n{done.stderr}")
    where = json.loads(done.stdout.strip().splitlines()[-1])
    outside = {name: path for name, path in where.items() if not path.startswith(str(version.target))}
    if outside:
        raise SystemExit(f"{version.label}: modules imported from outside {version.target}: {outside}")


# --------------------------------------------------------------------------- the merges

def local_args(args: list[str], folders: dict[str, str]) -> list[str]:
    """The demo's CLI arguments with every repo or dataset id (``id``, ``id:split``, ``key=id``) a local folder."""
    out = []
    for arg in args:
        prefix, _, rest = arg.rpartition("=") if re.match(r"^\w+=", arg) else ("", "", arg)
        name, colon, split = rest.partition(":")
        if name in folders:
            arg = f"{prefix}{'=' if prefix else ''}{folders[name]}{colon}{split}"
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
            raise SystemExit(f"the demo's argument {arg!r} names {name}, which this script does not build")
        out.append(arg)
    return out


def without_data(args: list[str]) -> list[str]:
    """``args`` without ``--data X`` and ``--param samples=N``."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--data" or (arg == "--param" and args[i + 1].startswith("samples=")):
            skip = True
            continue
        out.append(arg)
    return out


def all_merges(demo_merges: dict[str, list[str]]) -> dict[str, list[str]]:
    """The demo's merges, plus :data:`EXTRA_MERGES`."""
    merges = dict(demo_merges)
    if "otfusion" in merges:
        merges["otfusion_weights"] = [*without_data(merges["otfusion"]), "--param", "cost=weights"]
    return merges


def is_static(args: list[str]) -> bool:
    """A merge that reads no ``--data`` (``--eval-data`` only evaluates it)."""
    return "--data" not in args


@dataclass
class Run:
    """One merge by one version."""

    version: Version
    method: str
    output: Path
    code: int
    seconds: float
    log: Path


def run_merge(version: Version, method: str, args: list[str], work: Path, threads: int, results: str) -> Run:
    """``python -m hfmerge merge ARGS --output OUT`` by ``version``; the output is moved to ``results/method``.

    Every run has the same working directory, ``HF_HOME`` (emptied first) and output path.
    """
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "hf_home").mkdir(parents=True)
    output = run_dir / "merged" / method
    command = [sys.executable, *SAFE_PATH, "-c", MERGE_WRAPPER, str(version.target), "merge", *args,
               "--output", str(output)]
    destination = work / "results" / results / method
    shutil.rmtree(destination, ignore_errors=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    log = destination.with_name(method + ".log")
    started = time.time()
    with log.open("w") as stream:
        try:
            code = subprocess.run(command, check=False, cwd=run_dir, env=run_env(version, run_dir / "hf_home", threads),
                                  stdout=stream, stderr=subprocess.STDOUT, timeout=MERGE_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.time() - started
    if output.exists():
        shutil.move(str(output), str(destination))
    else:
        destination.mkdir()
    return Run(version=version, method=method, output=destination, code=code, seconds=seconds, log=log)


# --------------------------------------------------------------------------- comparing outputs

@dataclass
class Volatile:
    """What differs between two runs of the same version, by file (relative path in the output folder).

    Text is masked as finely as the self-check saw it change: a markdown table's
    column (by its header, in every table that has that column) or the numbers
    of one line (the rest of the line still compared); files that differ as a
    whole and run-to-run tensor noise are only listed.
    """

    columns: dict[str, list[str]] = field(default_factory=dict)  # file -> table column headers
    lines: dict[str, list[str]] = field(default_factory=dict)  # file -> regexes, each volatile number a group
    examples: dict[str, list[str]] = field(default_factory=dict)  # file -> what was seen to change
    files: set[str] = field(default_factory=set)  # files that differ as a whole (binary, or in one run only)
    tensor_noise: dict[str, float] = field(default_factory=dict)  # tensor file -> max |diff| between the runs
    methods: list[str] = field(default_factory=list)  # the merges the self-check ran

    def mask(self, name: str, text: str) -> tuple[list[str], int]:
        """The lines of ``text`` with each volatile cell or number replaced by a marker, and how many were."""
        lines = text.splitlines()
        columns = set(self.columns.get(name, []))
        patterns = [re.compile(pattern) for pattern in self.lines.get(name, [])]
        masked, count = [], 0
        for line, header in zip(lines, table_headers(lines)):
            if header is not None and columns & set(header):
                parts = line.split("|")  # the cells are parts[1:-1]; the rest of the row stays as it is
                for index, column in enumerate(header, start=1):
                    if column in columns:
                        parts[index] = f" {VOLATILE} "
                        count += 1
                line = "|".join(parts)
            else:
                for pattern in patterns:
                    match = pattern.fullmatch(line)
                    if match:
                        line = masked_groups(line, match)
                        count += 1
                        break
            masked.append(line)
        return masked, count

    def learn(self, name: str, a: str, b: str, header: list[str] | None) -> None:
        """Record that line ``a`` of one run is ``b`` in the other (``header``: its table's, if in one)."""
        cells_a, cells_b = table_cells(a), table_cells(b)
        examples = self.examples.setdefault(name, [])
        if header is not None and cells_a is not None and cells_b is not None and \
                len(cells_a) == len(cells_b) == len(header):
            for column, x, y in zip(header, cells_a, cells_b):
                if x != y:
                    if column not in self.columns.setdefault(name, []):
                        self.columns[name].append(column)
                    examples.append(f"table column {column!r}: {x} / {y}")
            return
        patterns = self.lines.setdefault(name, [])
        literal_a, literal_b = NUMBER.split(a), NUMBER.split(b)
        numbers_a, numbers_b = NUMBER.findall(a), NUMBER.findall(b)
        if literal_a == literal_b:
            # a number that changed makes every number of its word volatile: all of a timestamp, not its seconds
            words = [len(a[:match.start()].split()) - (not a[:match.start()][-1:].isspace())
                     for match in NUMBER.finditer(a)]
            changed = {word for word, x, y in zip(words, numbers_a, numbers_b) if x != y}
            pattern = number_pattern(literal_a, [None if word in changed else x for word, x in zip(words, numbers_a)])
            candidates = [pattern]
        else:  # not the same line with other numbers: each side's line, every number a wildcard
            candidates = [number_pattern(literal_a, [None] * len(numbers_a)),
                          number_pattern(literal_b, [None] * len(numbers_b))]
        for pattern in candidates:
            if pattern not in patterns:
                patterns.append(pattern)
        examples.append(f"line: {a.strip()[:70]!r} / {b.strip()[:70]!r}")

    def to_json(self) -> dict[str, Any]:
        return {"methods": self.methods, "columns": self.columns, "lines": self.lines, "examples": self.examples,
                "files": sorted(self.files), "tensor_noise": self.tensor_noise}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Volatile:
        return cls(columns=data["columns"], lines=data["lines"], examples=data["examples"], files=set(data["files"]),
                   tensor_noise=data["tensor_noise"], methods=data["methods"])


def masked_groups(line: str, match: re.Match[str]) -> str:
    """``line`` with the span of each of ``match``'s groups replaced by :data:`VOLATILE`."""
    out, last = [], 0
    for group in range(1, match.re.groups + 1):
        start, end = match.span(group)
        out += [line[last:start], VOLATILE]
        last = end
    return "".join([*out, line[last:]])


def number_pattern(literals: list[str], numbers: list[str | None]) -> str:
    """A regex of a line: its literal parts, each number as itself or (``None``) as a captured wildcard."""
    parts = [re.escape(literals[0])]
    for literal, number in zip(literals[1:], numbers):
        parts += [f"({WILDCARD})" if number is None else re.escape(number), re.escape(literal)]
    return "".join(parts)


def table_cells(line: str) -> list[str] | None:
    """The cells of a markdown table row, or ``None`` when ``line`` is not one."""
    stripped = line.strip()
    if len(stripped) < 2 or not stripped.startswith("|") or not stripped.endswith("|"):
        return None
    return [cell.strip() for cell in stripped[1:-1].split("|")]


def table_headers(lines: list[str]) -> list[list[str] | None]:
    """For each line, the header cells of the markdown table it is a body row of (``None`` outside tables)."""
    headers: list[list[str] | None] = [None] * len(lines)
    header = None
    for i, line in enumerate(lines):
        cells = table_cells(line)
        if cells is None:
            header = None
        elif TABLE_RULE.match(line.strip()) and i > 0 and table_cells(lines[i - 1]) is not None:
            header = table_cells(lines[i - 1])
        elif header is not None and len(cells) == len(header):
            headers[i] = header
    return headers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def tensor_diff(a: Path, b: Path, rtol: float, atol: float) -> tuple[bool, float, str]:
    """(every tensor close, max |a - b| over all tensors, what differs in names/shapes/dtypes/metadata if anything)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        meta_a, meta_b = fa.metadata() or {}, fb.metadata() or {}
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))
        return False, float("inf"), f"tensor names differ: {', '.join(only[:5])}{' ...' if len(only) > 5 else ''}"
    worst, close, notes = 0.0, True, []
    for name in sorted(ta):
        x, y = ta[name], tb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            notes.append(f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            close = False
            continue
        if x.is_floating_point():
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().nan_to_num(nan=0.0).max()))
            close &= torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        elif not torch.equal(x, y):
            worst = max(worst, float((x.double() - y.double()).abs().max()))
            close = False
    if meta_a != meta_b:
        notes.append("safetensors metadata differ")
        close = False
    return close, worst, "; ".join(notes[:3])


@dataclass
class FileResult:
    name: str
    status: str  # identical, masked, close, differs, missing
    detail: str = ""
    max_diff: float | None = None


def compare_file(name: str, a: Path, b: Path, *, static: bool, volatile: Volatile, rtol: float,
                 atol: float) -> FileResult:
    """One output file of two runs: bytes; else tensors (data merges) or text with volatile lines masked."""
    if not a.exists() or not b.exists():
        return FileResult(name, "missing", f"only in {'the first' if a.exists() else 'the second'} run")
    if sha256(a) == sha256(b):
        return FileResult(name, "identical", max_diff=0.0 if name.endswith(".safetensors") else None)
    if name.endswith(".safetensors"):
        close, worst, notes = tensor_diff(a, b, rtol, atol)
        if close and not static:
            return FileResult(name, "close", f"within rtol={rtol:g}, atol={atol:g}", worst)
        why = notes or ("bytes differ" + (", tensors within tolerance" if close else ", tensors beyond tolerance"))
        return FileResult(name, "differs", why, worst)
    text_a, text_b = read_text(a), read_text(b)
    if text_a is None or text_b is None:
        return FileResult(name, "differs", "binary file, bytes differ")
    lines_a, masked_count = volatile.mask(name, text_a)
    lines_b, _ = volatile.mask(name, text_b)
    if lines_a == lines_b:
        return FileResult(name, "masked", f"identical once {masked_count} volatile cell(s) or number(s) are masked")
    diff = [line for line in difflib.unified_diff(lines_a, lines_b, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    shown = "\n".join(f"        {line[:160]}" for line in diff[:6])
    more = f"\n        ... {len(diff) - 6} more changed lines" if len(diff) > 6 else ""
    return FileResult(name, "differs", f"{len(diff)} changed line(s):\n{shown}{more}")


def output_files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def compare_runs(a: Run, b: Run, *, static: bool, volatile: Volatile, rtol: float, atol: float) -> list[FileResult]:
    names = sorted(output_files(a.output) | output_files(b.output))
    return [compare_file(name, a.output / name, b.output / name, static=static, volatile=volatile, rtol=rtol,
                         atol=atol) for name in names]


def learn_volatile(first: Run, second: Run, volatile: Volatile) -> None:
    """Record in ``volatile`` what differs between two runs of the same version of one merge."""
    volatile.methods.append(first.method)
    for result in compare_runs(first, second, static=True, volatile=Volatile(), rtol=0.0, atol=0.0):
        if result.status == "identical":
            continue
        a, b = first.output / result.name, second.output / result.name
        if result.name.endswith(".safetensors") and result.max_diff is not None:
            volatile.tensor_noise[result.name] = max(result.max_diff, volatile.tensor_noise.get(result.name, 0.0))
            continue
        text_a = read_text(a) if a.exists() else None
        text_b = read_text(b) if b.exists() else None
        if text_a is None or text_b is None:
            volatile.files.add(result.name)
            continue
        lines_a, lines_b = text_a.splitlines(), text_b.splitlines()
        headers = table_headers(lines_a)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            pairs = list(zip(range(i1, i2), range(j1, j2)))
            for i, j in pairs:
                volatile.learn(result.name, lines_a[i], lines_b[j], headers[i])
            unpaired = [*lines_a[i1 + len(pairs):i2], *lines_b[j1 + len(pairs):j2]]
            if unpaired:  # lines in one run only: the file cannot be masked line by line
                volatile.files.add(result.name)
                volatile.examples.setdefault(result.name, []).extend(
                    f"line in one run only: {line.strip()[:70]!r}" for line in unpaired)


# --------------------------------------------------------------------------- the report

@dataclass
class MethodResult:
    method: str
    static: bool
    runs: tuple[Run, Run]
    files: list[FileResult]

    @property
    def failed(self) -> bool:
        return any(run.code != 0 for run in self.runs) or any(f.status in ("differs", "missing") for f in self.files)

    def verdict(self) -> str:
        codes = [run.code for run in self.runs]
        if any(codes):
            return f"MERGE FAILED (exit {codes[0]} / {codes[1]})"
        if not self.files:
            return "NO OUTPUT"
        bad = [f.name for f in self.files if f.status in ("differs", "missing")]
        if bad:
            return f"NO: {', '.join(bad)}"
        if all(f.status == "identical" for f in self.files):
            return "yes, byte for byte"
        close = [f.name for f in self.files if f.status == "close"]
        masked = [f.name for f in self.files if f.status == "masked"]
        parts = ([f"within tol.: {', '.join(close)}"] if close else []) + \
                ([f"masked: {', '.join(masked)}"] if masked else [])
        return "yes; " + "; ".join(parts)

    def max_diff(self) -> str:
        diffs = [f.max_diff for f in self.files if f.max_diff is not None]
        return f"{max(diffs):.3g}" if diffs else "-"


def report(results: list[MethodResult], old: Version, new: Version, volatile: Volatile, volatile_source: str,
           sources: dict[str, Any], started: float) -> None:
    print(f"\nOutputs of {old.label} (old) and {new.label} (new), the demo's merges on the same local models")
    built = "cached" if sources["cached"] else f"trained in {sources['seconds']:.0f} s"
    print(f"  models and datasets: {sources['folder']} ({built}, key {sources['key']})")
    print(f"\n  {'merge':18s} {'kind':6s} {'files':>5s}  {'identical?':52s} {'max |diff|':>10s} "
          f"{'old s':>6s} {'new s':>6s}")
    for result in results:
        print(f"  {result.method:18s} {'static' if result.static else 'data':6s} {len(result.files):5d}  "
              f"{result.verdict():52s} {result.max_diff():>10s} {result.runs[0].seconds:6.0f} "
              f"{result.runs[1].seconds:6.0f}")
    details = [r for r in results if r.failed or any(f.status in ("masked", "close") for f in r.files)]
    if details:
        print("\nDetails")
    for result in details:
        print(f"  {result.method}:")
        for run in result.runs:
            if run.code != 0:
                tail = run.log.read_text().strip().splitlines()[-3:]
                print(f"    {run.version.label} exited {run.code}; log {run.log}:")
                print("\n".join(f"        {line}" for line in tail))
        for f in result.files:
            if f.status != "identical":
                diff = f" (max |diff| {f.max_diff:.3g})" if f.max_diff else ""
                print(f"    {f.name}: {f.status}{diff}; {f.detail}")
    print(f"\nVolatile content: what differs between two runs of the same version ({volatile_source})")
    if not volatile.methods:
        print("  none known: run with --self-check to look for it (nothing was masked)")
    elif not (volatile.columns or volatile.lines or volatile.files or volatile.tensor_noise):
        print(f"  none: two runs of {old.label} gave byte-identical outputs for {', '.join(volatile.methods)}")
    for name in sorted(set(volatile.columns) | set(volatile.lines) | volatile.files):
        columns, lines = volatile.columns.get(name, []), volatile.lines.get(name, [])
        what = [f"table column(s) {', '.join(map(repr, columns))} masked in every table that has them"] \
            if columns else []
        what += [f"{len(lines)} line pattern(s), only their changing numbers masked"] if lines else []
        what += ["differs as a whole: not masked, still counts as a difference"] if name in volatile.files else []
        print(f"  {name}: {'; '.join(what)}; seen:")
        seen = list(dict.fromkeys(volatile.examples.get(name, [])))
        print("\n".join(f"      {example}" for example in seen[:6]))
        if len(seen) > 6:
            print(f"      ... {len(seen) - 6} more")
    for name, noise in volatile.tensor_noise.items():
        print(f"  {name}: tensors differ run to run by up to {noise:.3g}")
    print(f"\n{sum(r.failed for r in results)} of {len(results)} merges differ; "
          f"{time.time() - started:.0f} s in all")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.identical_outputs",
        description="Check that the demo's merges by two versions of hfmerge are identical (static methods, "
                    "byte for byte) or equal to float tolerance (methods that read data).")
    parser.add_argument("--ref", required=True, help="the reference version: a commit or ref of this repository")
    parser.add_argument("--against", default=str(ROOT),
                        help="the version to check: a working tree folder (default: this one, as it is now) or a ref")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"models, installs and outputs (default: {DEFAULT_WORK.relative_to(ROOT)})")
    parser.add_argument("--methods", help="comma-separated merges to run (default: all the demo's, plus "
                                          f"{', '.join(EXTRA_MERGES)})")
    parser.add_argument("--self-check", nargs="?", const=DEFAULT_SELF_CHECK, metavar="MERGE,...",
                        help="run the reference twice for these merges (default: %(const)s) and record what "
                             "differs between two runs of the same code")
    parser.add_argument("--rtol", type=float, default=1e-5, help="data merges' tensors: relative tolerance")
    parser.add_argument("--atol", type=float, default=1e-6, help="data merges' tensors: absolute tolerance")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each merge (OMP_NUM_THREADS)")
    return parser.parse_args(argv)


def build(new: Version, work: Path, threads: int) -> dict[str, Any]:
    """Run :func:`build_sources` in a subprocess with ``new``'s install."""
    answer = work / "sources" / "build.json"
    answer.parent.mkdir(parents=True, exist_ok=True)
    answer.unlink(missing_ok=True)
    log = work / "sources" / "build.log"
    with log.open("w") as stream:
        code = subprocess.run([sys.executable, *SAFE_PATH, "-c", BUILD_WRAPPER, str(Path(__file__).resolve()),
                               BUILD_COMMAND, str(work), str(new.source / DEMO), str(answer)],
                              check=False, cwd=answer.parent, stdout=stream,
                              stderr=subprocess.STDOUT, env=run_env(new, work / "hf_home-build", threads)).returncode
    if code != 0:
        raise SystemExit(f"building the demo's models with {new.label}'s hfmerge.testing failed (exit {code}; "
                         f"--against a ref whose hfmerge.testing works builds them); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return json.loads(answer.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [BUILD_COMMAND]:
        work, demo_file, answer = map(Path, argv[1:4])
        Path(answer).write_text(json.dumps(build_sources(work, demo_file)))
        return 0
    options = parse_args(argv)
    started = time.time()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    old = install_ref(options.ref, work)
    new = install(options.against, work)
    for version in (old, new):
        check_import(version, work, options.threads)
    sources = build(new, work, options.threads)
    merges = {name: local_args(args, sources["folders"]) for name, args in all_merges(sources["merges"]).items()}
    chosen = list(merges) if not options.methods else options.methods.split(",")
    unknown = [name for name in chosen if name not in merges]
    if unknown:
        print(f"unknown merge(s) {', '.join(unknown)}; the merges are: {', '.join(merges)}", file=sys.stderr)
        return 2
    checked = options.self_check.split(",") if options.self_check else []
    if any(name not in merges for name in checked):
        print(f"--self-check: unknown merge(s); the merges are: {', '.join(merges)}", file=sys.stderr)
        return 2

    saved = work / f"volatile-{old.commit[:12]}.json"
    volatile, volatile_source = Volatile(), "no self-check run"
    runs: dict[str, Run] = {}
    if checked:
        for method in checked:
            first = run_merge(old, method, merges[method], work, options.threads, "old")
            second = run_merge(old, method, merges[method], work, options.threads, "old-again")
            if first.code or second.code:
                raise SystemExit(f"--self-check: {method} failed with {old.label} (exit {first.code} / "
                                 f"{second.code}); see {first.log} and {second.log}")
            learn_volatile(first, second, volatile)
            runs[method] = first
        saved.write_text(json.dumps(volatile.to_json(), indent=1))
        volatile_source = f"self-check of {', '.join(checked)} in this run, saved to {saved}"
    elif saved.exists():
        volatile = Volatile.from_json(json.loads(saved.read_text()))
        volatile_source = f"from an earlier self-check of {', '.join(volatile.methods)}: {saved}"

    results = []
    for method in chosen:
        static = is_static(merges[method])
        first = runs[method] if method in runs else run_merge(
            old, method, merges[method], work, options.threads, "old")
        second = run_merge(new, method, merges[method], work, options.threads, "new")
        files = compare_runs(first, second, static=static, volatile=volatile, rtol=options.rtol, atol=options.atol)
        results.append(MethodResult(method, static, (first, second), files))
    report(results, old, new, volatile, volatile_source, sources, started)
    return 1 if any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
