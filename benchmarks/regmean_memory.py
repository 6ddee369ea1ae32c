"""RegMean memory benchmark: peak anonymous memory of N = 2 and N = 8 ViT-B/16-sized sources.

Builds N synthetic checkpoints of a ViT-B/16 classifier (86M parameters,
float32, random weights from a config plus independent noise per source, as
``stream.py`` does, each with a ViT image processor) and one local folder of
random 224 px images per source (a flat folder: unlabeled data). For each N it
runs, in a fresh subprocess with a fresh ``HF_HOME`` (so the statistics cache
is empty and every run computes the statistics)::

    hfmerge.merge(sources, method="regmean", data=[folder, ...], samples=S).save(output)

Torch, transformers, accelerate, the ViT modeling module and hfmerge's
pipeline, statistics engine and data loader are imported before the clock
starts. RssAnon is sampled every 2 ms on a background thread; the sample is
attributed to the stage running at that moment (the statistics stage,
``hfmerge.run.stages.run_statistics``; the execute stage, the streaming merge into
the staging folder (``run_materialise``); or the rest: resolve, inspect, plan, save), so the result says
where the peak is. After the statistics stage the script also counts the
``torch.nn.Module`` objects still alive (a source model kept alive by a
reference would show here).

The design holds one source's model and one source's Gram matrices at a time
(the statistics stage drops each model before loading the next, and the Gram
matrices go to memory-mapped cache files), and RegMean accumulates Σ G̃ᵢ and
Σ G̃ᵢWᵢᵀ source by source: the target is peak anonymous memory at N = 8 ≤ 1.2×
that at N = 2.

Usage: ``python benchmarks/regmean_memory.py [--sizes 2,8] [--samples 64] [--repeats 1]
[--data FOLDER ...] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stream import Sampler  # noqa: E402  (stream.py's sources and RssAnon reader)
from stream import prepare as prepare_models  # noqa: E402

PHASES = ("other", "statistics", "execute")


def prepare_sources(workdir: Path, count: int) -> list[Path]:
    """N ViT-B/16 source folders (stream.py's), each with the image processor the statistics stage loads."""
    from transformers import ViTImageProcessor

    folders = prepare_models(workdir, count)
    for folder in folders:
        if not (folder / "preprocessor_config.json").exists():
            ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folders


def prepare_images(folder: Path, count: int, seed: int) -> Path:
    """A flat folder of ``count`` random 224 × 224 RGB PNG images (unlabeled data)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.png"))
    if len(existing) >= count:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image-{i:04d}.png")
    return folder


class PhaseSampler:
    """Peak RssAnon of this process, overall and per pipeline stage, sampled on a background thread."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.phase = "other"
        self.start = self.read()
        self.peak = dict.fromkeys(PHASES, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    read = staticmethod(Sampler.read)  # stream.py's RssAnon reader

    def sample(self) -> None:
        value = self.read()
        self.peak[self.phase] = max(self.peak[self.phase], value)

    def enter(self, phase: str) -> str:
        """Switch to ``phase`` (sampling at the boundary) and return the previous one."""
        self.sample()
        previous, self.phase = self.phase, phase
        self.sample()
        return previous

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def __enter__(self) -> PhaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def live_modules() -> dict[str, int]:
    """Counts of the ``torch.nn.Module`` objects alive now, by class name (after a full collection)."""
    import torch

    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("ForImageClassification"):
            counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    return counts


def measure(sources: list[Path], data: list[Path], output: Path, samples: int) -> dict[str, object]:
    """Run one RegMean merge in this (fresh) process and return its measurements."""
    import accelerate  # noqa: F401  (library import is not merge time)
    import torch
    from transformers import ViTForImageClassification  # noqa: F401

    import hfmerge
    import hfmerge.data.load  # noqa: F401  (hfmerge imports its modules lazily; importing is not merge time)
    import hfmerge.engine.statistics  # noqa: F401
    import hfmerge.methods.regmean  # noqa: F401
    import hfmerge.run.pipeline  # noqa: F401
    from hfmerge.methods.stages import Statistics
    from hfmerge.run.stages import RUNNERS as runners
    from hfmerge.run.stages import Materialise

    shutil.rmtree(output, ignore_errors=True)
    seconds = dict.fromkeys(PHASES, 0.0)  # the time spent in each stage (and the census)
    after_statistics: dict[str, int] = {}
    sampler = PhaseSampler()

    def timed(phase: str, function):
        def wrapper(*args, **kwargs):
            previous = sampler.enter(phase)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - started
                sampler.enter(previous)
                if phase == "statistics":
                    census = time.perf_counter()
                    after_statistics.update(live_modules())
                    seconds["census"] = time.perf_counter() - census

        return wrapper

    runners[Statistics] = timed("statistics", runners[Statistics])
    runners[Materialise] = timed("execute", runners[Materialise])
    with sampler:
        started = time.perf_counter()
        result = hfmerge.merge([str(s) for s in sources], method="regmean", data=[str(d) for d in data],
                               samples=samples, progress=False)
        result.save(output)
        wall = time.perf_counter() - started
    wall_merge = wall - seconds.get("census", 0.0)  # the live-module census is not merge work
    written = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    return {
        "wall_s": wall_merge,
        "statistics_s": seconds["statistics"],
        "execute_s": seconds["execute"],
        "peak_anon": max(sampler.peak.values()),
        "peak_anon_by_stage": sampler.peak,
        "anon_at_start": sampler.start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_written": written,
        "models_alive_after_statistics": after_statistics,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,8")
    parser.add_argument("--samples", type=int, default=64, help="images per source (the issue's 64 by default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", action="append", default=[],
                        help="a folder of images: once per source, or once for all (default: random images)")
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.measure:
        sources = [workdir / f"source-{i}" for i in range(args.count)]
        data = [Path(d) for d in args.data]
        print(json.dumps(measure(sources, data, workdir / "out-regmean", args.samples)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    largest = max(sizes)
    if args.data and len(args.data) not in (1, largest):
        parser.error(f"give --data once for all sources or once per source ({largest}), not {len(args.data)} times")
    workdir.mkdir(parents=True, exist_ok=True)
    sources = prepare_sources(workdir, largest)
    if args.data:
        data = [Path(d) for d in args.data] * (largest if len(args.data) == 1 else 1)
    else:
        data = [prepare_images(workdir / f"images-{i}", args.samples, seed=i) for i in range(largest)]
    model_bytes = (sources[0] / "model.safetensors").stat().st_size
    results = []
    for n in sizes:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="hfmerge-bench-home-") as home:
                env = {**os.environ, "HF_HOME": home, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1"}
                command = [sys.executable, __file__, "--workdir", str(workdir), "--measure", "--count", str(n),
                           "--samples", str(args.samples)]
                for folder in data[:n]:
                    command += ["--data", str(folder)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    return done.returncode
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["wall_s"])
        best.update(n=n, samples=args.samples, repeats=args.repeats)
        results.append(best)
        stage = best["peak_anon_by_stage"]
        print(f"N={n} wall {best['wall_s']:6.1f} s (statistics {best['statistics_s']:6.1f} s = "
              f"{best['statistics_s'] / best['wall_s']:.0%}, execute {best['execute_s']:5.1f} s)  peak anon "
              f"{best['peak_anon'] / 2**20:6.0f} MiB (statistics {stage['statistics'] / 2**20:.0f}, execute "
              f"{stage['execute'] / 2**20:.0f}, other {stage['other'] / 2**20:.0f}; at start "
              f"{best['anon_at_start'] / 2**20:.0f})  models alive after statistics "
              f"{best['models_alive_after_statistics']}", flush=True)
    (workdir / "regmean_memory.json").write_text(json.dumps({"model_bytes": model_bytes, "runs": results}, indent=2))
    by = {r["n"]: r for r in results}
    small, big = by[min(sizes)], by[largest]
    print(f"\none model: {model_bytes / 2**20:.0f} MiB; peak anon N={largest} / N={min(sizes)}: "
          f"{big['peak_anon'] / small['peak_anon']:.2f} (target ≤ 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
