"""RegMean against FusionBench: wall time, peak memory and bytes written for two ViT-B/16 sources.

Two synthetic ViT-B/16 classifiers (``stream.py``'s: one random
``ViTForImageClassification`` from a config, 86M parameters, float32, and a
copy with independent noise of std 0.01 on every tensor; no download, no
trained weights) and one folder of random 224 px PNG images per source
(``regmean_memory.py``'s). Each run is a fresh subprocess that imports its
libraries before the clock starts, then merges and saves:

* ``hfmerge``          — ``hfmerge.merge(sources, method="regmean", data=folders, samples=S, alpha=A,
                         batch_size=B).save(out)`` with a fresh, empty ``HF_HOME``: a cold run that computes
                         both sources' Gram matrices and writes them to the statistics cache;
* ``hfmerge-nocache``  — the same with ``cache=False`` (nothing written but the merge);
* ``fusionbench``      — FusionBench's ``RegMeanAlgorithm.run`` (``fusion_bench.method.regmean.regmean``) on a
                         ``BaseModelPool`` whose models are ``from_pretrained`` configs (loaded one at a
                         time by ``run``, as FusionBench does) and whose train datasets are the same images
                         through the same ViT image processor; ``get_regmean_weights``, which FusionBench
                         leaves to each model family, is written here with the hook of its CLIP version
                         (``clip_regmean.py``: running means of XᵀX in float32 for every ``nn.Linear``),
                         ``reduce_non_diagonal_ratio`` = α, the same batch size; the merged model is saved with
                         ``save_pretrained``. It runs in FusionBench's own virtual environment (``--fusionbench-python``,
                         default ``/work/fb/venv/bin/python``); when that python cannot import ``fusion_bench``
                         the script says so and runs the hfmerge modes alone.

The modes are interleaved (hfmerge, hfmerge-nocache, fusionbench, then again), ``--repeats`` rounds; each
mode's minimum wall time and its peak memory are reported. Peak RSS is the kernel's high-water mark
(``VmHWM``: anonymous memory and the file pages mapped, such as memory-mapped weights and cache files);
peak anon is ``RssAnon`` sampled every 5 ms. Bytes written: the statistics cache (``HF_HOME``) and the output
folder. At the end the two merges are compared tensor by tensor (largest difference over the linear weights
RegMean solves, relative to the largest weight; the classifier is left out: hfmerge averages heads with the
same labels, FusionBench solves every ``nn.Linear``). The hfmerge code measured is the one ``import hfmerge``
finds: run from the repository root with ``PYTHONPATH=.`` (or point ``PYTHONPATH`` at another checkout to
measure it).

Usage: ``PYTHONPATH=. python benchmarks/fusionbench_regmean.py [--samples 64] [--repeats 2]
[--modes hfmerge,hfmerge-nocache,fusionbench] [--fusionbench-python PATH] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("hfmerge", "hfmerge-nocache", "fusionbench")
FUSIONBENCH_PYTHON = "/work/fb/venv/bin/python"


class AnonSampler:
    """Peak RssAnon of this process, sampled on a background thread."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(self.period)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``RssAnon``...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def run_hfmerge(args: argparse.Namespace, cache: bool) -> dict[str, object]:
    """One hfmerge RegMean merge in this (fresh) process; imports are not timed."""
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    from transformers import ViTForImageClassification  # noqa: F401

    import hfmerge
    import hfmerge.data.load  # noqa: F401  (hfmerge imports its modules lazily; importing is not merge time)
    import hfmerge.engine.statistics  # noqa: F401
    import hfmerge.methods.regmean  # noqa: F401
    import hfmerge.run.pipeline  # noqa: F401

    params = {"alpha": args.alpha, "batch_size": args.batch_size}
    if not cache:
        params["cache"] = False
    with AnonSampler() as sampler:
        started = time.perf_counter()
        result = hfmerge.merge([str(s) for s in args.sources], method="regmean", data=[str(d) for d in args.data],
                               samples=args.samples, progress=False, **params)
        result.save(args.output)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "peak_rss": status_bytes("VmHWM"), "peak_anon": sampler.peak,
            "hfmerge": str(Path(hfmerge.__file__).parent)}


def images_dataset(folder: str, source: str):
    """The images of ``folder`` through the source's ViT image processor: a dataset of ``pixel_values`` tensors."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(source)
    paths = sorted(Path(folder).glob("*.png"))
    pixels = [processor(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"][0] for p in paths]
    return torch.utils.data.TensorDataset(torch.stack(pixels))


def fusionbench_regmean_module():
    """``fusion_bench.method.regmean.regmean``, without its package's ``__init__``.

    That ``__init__`` also imports the CLIP and GPT-2 versions, whose mixins need ``lightning``, which
    FusionBench does not install; ``regmean.py`` itself needs only its sibling ``utils.py``.
    """
    import importlib.util
    import types

    import fusion_bench.method

    folder = Path(fusion_bench.method.__path__[0]) / "regmean"
    package = types.ModuleType("fusion_bench.method.regmean")
    package.__path__ = [str(folder)]
    sys.modules.setdefault(package.__name__, package)
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.regmean", folder / "regmean.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_fusionbench(args: argparse.Namespace) -> dict[str, object]:
    """FusionBench's RegMeanAlgorithm on the same sources and images, in FusionBench's venv; imports not timed."""
    import torch
    from fusion_bench.modelpool import BaseModelPool
    from omegaconf import DictConfig
    from torch import nn
    from transformers import ViTForImageClassification  # noqa: F401

    RegMeanAlgorithm = fusionbench_regmean_module().RegMeanAlgorithm
    batch_size = args.batch_size

    class RegMeanForViT(RegMeanAlgorithm):
        """FusionBench's RegMean with the data pass of its CLIP version (``clip_regmean.py``), for HF ViTs."""

        def get_regmean_weights(self, model_name, model, train_dataset, linear_modules_to_merge):
            # the hook of RegMeanAlgorithmForCLIP.get_regmean_weights, unchanged: running means of XᵀX in float32
            regmean_weights, num_computed_examples, num_actual_examples = {}, {}, {}

            def compute_regmean_weights(module_name):
                def hook(module: nn.Module, input: tuple, output: torch.Tensor):
                    x = input[0].detach()
                    batch_num_actual_examples = x.shape[0]
                    x = x.reshape(-1, x.shape[-1])
                    xtx = torch.matmul(x.transpose(0, 1), x)
                    if module_name not in regmean_weights:
                        regmean_weights[module_name] = xtx / x.shape[0]
                        num_computed_examples[module_name] = x.shape[0]
                        num_actual_examples[module_name] = batch_num_actual_examples
                    else:
                        regmean_weights[module_name] = (
                            regmean_weights[module_name] * num_computed_examples[module_name] + xtx
                        ) / (num_computed_examples[module_name] + x.shape[0])
                        num_computed_examples[module_name] += x.shape[0]
                        num_actual_examples[module_name] += batch_num_actual_examples

                return hook

            handles = [m.register_forward_hook(compute_regmean_weights(n)) for n, m in linear_modules_to_merge.items()]
            loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch_size, shuffle=False)
            for (pixels,) in loader:
                if num_actual_examples and next(iter(num_actual_examples.values())) >= self.num_regmean_examples:
                    break
                model(pixel_values=pixels)
            for handle in handles:
                handle.remove()
            return {name: weights.detach().cpu() for name, weights in regmean_weights.items()}

    def model_config(source: Path) -> dict[str, str]:
        return {"_target_": "transformers.ViTForImageClassification.from_pretrained",
                "pretrained_model_name_or_path": str(source)}

    names = [f"source{i}" for i in range(len(args.sources))]
    models = {"_pretrained_": model_config(args.sources[0]),  # the container run() loads the merge into
              **{name: model_config(source) for name, source in zip(names, args.sources)}}
    datasets = {name: {"_target_": "__main__.images_dataset", "folder": str(folder), "source": str(source)}
                for name, folder, source in zip(names, args.data, args.sources)}
    with AnonSampler() as sampler:
        started = time.perf_counter()
        pool = BaseModelPool(DictConfig(models), train_datasets=DictConfig(datasets))
        algorithm = RegMeanForViT(num_regmean_examples=args.samples, exclude_param_names_regex=[],
                                  reduce_non_diagonal_ratio=args.alpha, weight_transpose=True)
        with torch.no_grad():
            merged = algorithm.run(pool)
        merged.save_pretrained(args.output)
        wall = time.perf_counter() - started
    import fusion_bench

    return {"wall_s": wall, "peak_rss": status_bytes("VmHWM"), "peak_anon": sampler.peak,
            "fusion_bench": getattr(fusion_bench, "__version__", "?")}


def has_fusionbench(python: str) -> bool:
    if not Path(python).exists():
        return False
    done = subprocess.run([python, "-c", "import fusion_bench"], capture_output=True)
    return done.returncode == 0


def compare(hf: Path, fb: Path) -> dict[str, float]:
    """Largest |hfmerge − FusionBench| over the RegMean-solved weights and over the rest, classifier left out."""
    from safetensors.torch import load_file

    a, b = load_file(hf / "model.safetensors"), load_file(fb / "model.safetensors")
    solved, rest, scale = 0.0, 0.0, 0.0
    for key in a:
        if key.startswith("classifier.") or not a[key].dtype.is_floating_point:
            continue
        difference = float((a[key].double() - b[key].double()).abs().max())
        if key.endswith(".weight") and a[key].dim() == 2:
            solved, scale = max(solved, difference), max(scale, float(b[key].abs().max()))
        else:
            rest = max(rest, difference)
    return {"solved_max_abs": solved, "solved_max_rel": solved / scale, "rest_max_abs": rest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="images per source (the issue's 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--fusionbench-python", default=FUSIONBENCH_PYTHON)
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--source", action="append", type=Path, dest="sources", help=argparse.SUPPRESS)
    parser.add_argument("--data", action="append", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # benchmarks/ holds a statistics.py, which would shadow the standard library's for every import below
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        measured = run_fusionbench(args) if args.child == "fusionbench" else run_hfmerge(args, args.child == "hfmerge")
        print(json.dumps(measured))
        return 0

    sys.path.insert(0, str(HERE))
    from regmean_memory import prepare_images, prepare_sources

    modes = [m for m in args.modes.split(",") if m]
    if "fusionbench" in modes and not has_fusionbench(args.fusionbench_python):
        print(f"FusionBench is not installed for {args.fusionbench_python} (no importable fusion_bench): "
              "measuring hfmerge alone; give --fusionbench-python to compare", flush=True)
        modes.remove("fusionbench")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources = prepare_sources(workdir, 2)
    # a folder per count: FusionBench's dataset decodes every image of its folder, hfmerge reads ``samples``
    data = [prepare_images(workdir / f"images-{args.samples}-{i}", args.samples, seed=i) for i in range(2)]
    runs: dict[str, list[dict[str, object]]] = {m: [] for m in modes}
    for round_ in range(args.repeats):
        for mode in modes:
            output = workdir / f"out-{mode}"
            shutil.rmtree(output, ignore_errors=True)
            os.sync()  # no mode pays for an earlier one's writeback
            python = args.fusionbench_python if mode == "fusionbench" else sys.executable
            with tempfile.TemporaryDirectory(prefix="hfmerge-bench-home-") as home:
                env = {**os.environ, "HF_HOME": home, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1"}
                command = [python, __file__, "--child", mode, "--output", str(output), "--samples", str(args.samples),
                           "--batch-size", str(args.batch_size), "--alpha", str(args.alpha)]
                for source, folder in zip(sources, data):
                    command += ["--source", str(source), "--data", str(folder)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    print(f"{mode} failed (exit {done.returncode}): its error is above", flush=True)
                    return done.returncode
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                measured["cache_bytes"] = folder_bytes(Path(home))
            measured["output_bytes"] = folder_bytes(output)
            runs[mode].append(measured)
            print(f"round {round_ + 1} {mode:16s} wall {measured['wall_s']:7.1f} s  peak RSS "
                  f"{measured['peak_rss'] / 1e9:5.2f} GB  peak anon {measured['peak_anon'] / 1e9:5.2f} GB  "
                  f"cache written {measured['cache_bytes'] / 1e9:5.2f} GB", flush=True)

    print(f"\n{args.samples} images per source, batch {args.batch_size}, alpha {args.alpha}, "
          f"minimum of {args.repeats} interleaved runs")
    best = {m: min(r["wall_s"] for r in runs[m]) for m in modes}
    for mode in modes:
        rss = max(r["peak_rss"] for r in runs[mode])
        anon = max(r["peak_anon"] for r in runs[mode])
        ratio = f"  {best[mode] / best['fusionbench']:.2f}× FusionBench's time, " \
                f"{rss / max(r['peak_rss'] for r in runs['fusionbench']):.2f}× its peak RSS" \
            if "fusionbench" in best else ""
        print(f"{mode:16s} {best[mode]:7.1f} s  peak RSS {rss / 1e9:5.2f} GB  peak anon {anon / 1e9:5.2f} GB  "
              f"cache {runs[mode][-1]['cache_bytes'] / 1e9:5.2f} GB{ratio}")
    if "fusionbench" in modes and "hfmerge" in modes:
        print("hfmerge vs FusionBench merged weights:", json.dumps(compare(workdir / "out-hfmerge",
                                                                            workdir / "out-fusionbench")))
    (workdir / "fusionbench_regmean.json").write_text(json.dumps({"args": vars(args) | {
        "sources": None, "data": None, "output": None}, "runs": runs}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
