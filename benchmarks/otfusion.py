"""OTFusion benchmark: two ResNet-18-sized transformers ResNets, 200 images at 224 px, on the CPU.

Two ``ResNetForImageClassification`` models (basic layers, widths 64-128-256-512,
depths 2-2-2-2, 1000 labels: 11.7M parameters, random weights from seeds 0 and 1,
BatchNorm running statistics randomised) are saved to temporary folders with a
224 px image processor, beside a flat folder of 200 random 224 px PNGs. Each run
is the CLI a user types, in a fresh subprocess with a fresh ``HF_HOME`` (no
statistics cache) unless said otherwise:

* otfusion         — ``hfmerge merge A B --method otfusion --data FOLDER --param samples=200``
                     (activation-based cost, ``ot.emd``);
* otfusion cached  — the same again with the first run's ``HF_HOME``: statistics read back;
* otfusion weights — ``--param cost=weights``: no data pass;
* average          — ``--method average`` of the same models: the baseline in the same run.

Wall time is split with hfmerge's own stage lines: planning, the
statistics stage (both sources' data passes), the derive stage (every transport
plan) and the merge (streaming the aligned tensors into the output). Peak RSS and
peak anonymous memory are sampled from ``/proc/<pid>/status`` every 10 ms. The
size of the statistics cache (the activations kept on disk) is reported too.

Usage: ``python benchmarks/otfusion.py [--samples 200] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = {
    "plan": re.compile(r"planned otfusion over \d+ sources in ([\d.]+) s|planned average over \d+ sources in ([\d.]+) s"),
    "statistics": re.compile(r"statistics stage: ([\d.]+) s"),
    "transport": re.compile(r"derive stage \(otfusion\): ([\d.]+) s"),
    "merge": re.compile(r"merged \d+ tensors in ([\d.]+) s"),
}


def resnet18(seed: int, depths: tuple[int, ...] = (2, 2, 2, 2)):
    """A ResNet-18-sized classifier (``depths`` (3, 4, 6, 3): ResNet-34), random weights and BatchNorm statistics."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(layer_type="basic", embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                          depths=list(depths), num_labels=1000)
    config.architectures = ["ResNetForImageClassification"]
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model


def prepare(folder: Path, samples: int) -> tuple[list[Path], Path]:
    """Two saved models and a folder of ``samples`` random 224 px images."""
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessorPil

    models = []
    for seed in (0, 1):
        out = folder / f"resnet18-seed{seed}"
        resnet18(seed).save_pretrained(out)
        ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(out)
        models.append(out)
    images = folder / "images"
    images.mkdir()
    generator = np.random.default_rng(0)
    for i in range(samples):
        pixels = generator.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"image-{i:03d}.png")
    return models, images


def _memory(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    while not done.is_set():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for key in ("VmRSS", "RssAnon"):
            match = re.search(rf"{key}:\s+(\d+) kB", text)
            if match:
                peaks[key] = max(peaks.get(key, 0), int(match[1]) * 1024)
        time.sleep(0.01)


def run(args: list[str], hf_home: Path) -> dict[str, float]:
    """One CLI run: wall time, stage times, peak memory."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "hfmerge", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=_memory, args=(process.pid, peaks, done))
    sampler.start()
    out, err = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"hfmerge failed ({process.returncode}):\n{err[-3000:]}")
    result = {"wall": wall, "rss": peaks.get("VmRSS", 0), "anon": peaks.get("RssAnon", 0)}
    for stage, pattern in STAGES.items():
        match = pattern.search(err)
        result[stage] = float(next(g for g in match.groups() if g)) if match else 0.0
    cache = hf_home / "hfmerge" / "statistics"
    result["cache"] = sum(f.stat().st_size for f in cache.glob("*.safetensors")) if cache.is_dir() else 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (a, b), images = prepare(folder, args.samples)
        runs = {
            "otfusion": ["merge", str(a), str(b), "--method", "otfusion", "--data", str(images),
                         "--param", f"samples={args.samples}"],
            "otfusion weights": ["merge", str(a), str(b), "--method", "otfusion", "--param", "cost=weights"],
            "average": ["merge", str(a), str(b), "--method", "average"],
        }
        print("| run | wall | plan | statistics | transport | merge | peak RSS | peak anon | statistics on disk |")
        print("|---|---|---|---|---|---|---|---|---|")
        for repeat in range(args.repeats):
            for name, cli in runs.items():
                home = folder / f"hf-{name.replace(' ', '-')}-{repeat}"
                out = folder / f"out-{name.replace(' ', '-')}-{repeat}"
                rows = [(name, run([*cli, "--output", str(out)], home))]
                if name == "otfusion":
                    rows.append(("otfusion cached", run([*cli, "--output", str(out) + "-again"], home)))
                for label, r in rows:
                    print(f"| {label} | {r['wall']:.1f} s | {r['plan']:.1f} s | {r['statistics']:.1f} s | "
                          f"{r['transport']:.1f} s | {r['merge']:.1f} s | {r['rss'] / 2**20:.0f} MiB | "
                          f"{r['anon'] / 2**20:.0f} MiB | {r['cache'] / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
