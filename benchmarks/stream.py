"""Streaming-merge benchmark: hfmerge's `average` against the physical I/O floor and the naive way.

Builds N = 2, 4, 8 synthetic checkpoints of a ViT-B/16-sized classifier (86M
parameters, float32, random weights from a config) and, for each N, runs in a
fresh subprocess each of:

* floor     — the physical floor, no library: (a) read every input
              ``model.safetensors`` once from the warm page cache with
              ``readinto`` in 1 MiB chunks into one reused buffer (what
              ``cat file > /dev/null`` does), then (b) write as many bytes as
              one model file (the size of the merged output) in 1 MiB chunks
              to a new file in this mode's output folder (same filesystem as
              every other mode's output), closed without ``fsync``, as
              hfmerge's writer (``hfmerge/engine/writer.py``) closes its
              shards without ``fsync``. Reported as read + write; a ``cat``
              of the same files to /dev/null is timed afterwards as a check
              of (a) and not counted;
* load+save — the naive library path: read every input tensor with
              safetensors (``get_tensor`` + ``clone``) and write the first
              source's tensors with ``safetensors.torch.save_file``; no
              arithmetic (this was called "floor" before 2026-12-06; it is
              slower than hfmerge and so no floor);
* hfmerge   — ``hfmerge.merge(..., method="average").save(dir)``, the whole
              pipeline (inspect, plan, stream, config, card);
* ties      — ``hfmerge.merge(..., method="ties", base=source 0)``: the same
              pipeline for a method that reads every source twice per tensor
              (trim, then sign election and disjoint mean) plus the base;
* naive     — ``from_pretrained`` every model, average the state dicts, and
              ``save_pretrained``.

Each process imports torch, transformers, the ViT modeling module and
hfmerge's pipeline before the clock starts, so library import time (about 3 s
here) is not counted for any mode.

Each run reports wall time, bytes read and written (tensor bytes touched, and
the kernel's /proc/self/io counters), peak RSS and peak anonymous memory
(RssAnon sampled every 2 ms; file-backed mmap pages are not anonymous).
Before each run the mode's previous output is deleted, dirty pages are
flushed (``os.sync``, so no mode pays for an earlier mode's writeback) and
all input files are read once, so every mode starts from a warm page cache.
The modes are interleaved within each repeat (floor, load+save, hfmerge,
ties, naive, then again), and each mode's best wall time of ``--repeats`` is
kept. Usage: ``python benchmarks/stream.py [--sizes 2,4,8] [--repeats 3]
[--workdir DIR] [--modes hfmerge,ties]`` (``--modes hfmerge,ties``: TIES against ``average`` alone, with
their ratio). Each mode's process imports the hfmerge its interpreter finds: run it with
``PYTHONPATH=.`` from a checkout that is not the installed one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("floor", "load+save", "hfmerge", "ties", "naive")
CHUNK = 1 << 20  # the floor's read and write size


def vit_b16_config():
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, num_labels=1000)
    config.architectures = ["ViTForImageClassification"]
    return config


def prepare(workdir: Path, count: int) -> list[Path]:
    """N source folders: one random ViT-B/16, then copies with independent noise on every tensor."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import ViTForImageClassification

    folders = [workdir / f"source-{i}" for i in range(count)]
    if all((f / "model.safetensors").exists() for f in folders):
        return folders
    torch.manual_seed(0)
    first = folders[0]
    if not (first / "model.safetensors").exists():
        ViTForImageClassification(vit_b16_config()).save_pretrained(first)
    state = load_file(first / "model.safetensors")
    for i, folder in enumerate(folders[1:], start=1):
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / "config.json", folder / "config.json")
        generator = torch.Generator().manual_seed(i)
        noisy = {k: (v + 0.01 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in state.items()}
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    return folders


class Sampler:
    """Peak RssAnon of this process, sampled on a background thread."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.peak = self.start = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (less disturbed by other jobs than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def io_counters() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def measure(mode: str, sources: list[Path], output: Path) -> dict[str, float]:
    """Run one mode in this (fresh) process and return its measurements."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import ViTForImageClassification  # noqa: F401  (library import is not merge time)

    import hfmerge
    import hfmerge.run.pipeline  # noqa: F401  (hfmerge imports its modules lazily; importing is not merge time)

    shutil.rmtree(output, ignore_errors=True)
    tensor_bytes_read = 0
    extra: dict[str, float] = {}
    io_before = io_counters()
    with Sampler() as sampler:
        cpu_started = cpu_seconds()
        started = time.perf_counter()
        if mode == "floor":
            files = [s / "model.safetensors" for s in sources]
            buffer = memoryview(bytearray(CHUNK))
            for file in files:
                with open(file, "rb", buffering=0) as f:
                    while count := f.readinto(buffer):
                        tensor_bytes_read += count
            read_done = time.perf_counter()
            output.mkdir(parents=True)
            left = files[0].stat().st_size  # the merged model.safetensors: the same tensors, so the same size
            with open(output / "floor.safetensors", "wb", buffering=0) as f:  # closed, not fsynced: as the writer
                while left > 0:
                    left -= f.write(buffer[: min(left, CHUNK)])
            ended = time.perf_counter()
            extra = {"read_s": read_done - started, "write_s": ended - read_done}
        elif mode == "load+save":
            handles = [safe_open(str(s / "model.safetensors"), "pt") for s in sources]
            kept = {}
            for key in handles[0].keys():
                for i, handle in enumerate(handles):
                    # clone: get_tensor may hand out a lazy memory map; this mode must really read the bytes
                    tensor = handle.get_tensor(key).clone()
                    tensor_bytes_read += tensor.numel() * tensor.element_size()
                    if i == 0:
                        kept[key] = tensor
            output.mkdir(parents=True)
            save_file(kept, output / "model.safetensors", metadata={"format": "pt"})
        elif mode == "hfmerge":
            result = hfmerge.merge([str(s) for s in sources], method="average", progress=False)
            result.save(output)
            tensor_bytes_read = sum(m.reader.nbytes(k) for m in result.planned.context.models for k in m.reader.keys())
        elif mode == "ties":
            result = hfmerge.merge([str(s) for s in sources], method="ties", base=str(sources[0]), progress=False)
            result.save(output)
            tensor_bytes_read = sum(m.reader.nbytes(k) for m in result.planned.context.models for k in m.reader.keys())
        elif mode == "naive":
            from transformers import ViTForImageClassification

            models = [ViTForImageClassification.from_pretrained(source) for source in sources]
            states = [m.state_dict() for m in models]
            tensor_bytes_read = sum(t.numel() * t.element_size() for s in states for t in s.values())
            average = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
            models[0].load_state_dict(average)
            models[0].save_pretrained(output)
        else:
            raise ValueError(mode)
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_started
    io_after = io_counters()
    if mode == "floor":  # a check of the read half, after the clock: coreutils cat over the same cached files
        cat_started = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        extra["cat_s"] = time.perf_counter() - cat_started
    written = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tensor_bytes_read": tensor_bytes_read,
        "bytes_written": written,
        "io_read_bytes": io_after["read_bytes"] - io_before["read_bytes"],
        "io_write_bytes": io_after["write_bytes"] - io_before["write_bytes"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": sampler.peak,
        "anon_at_start": sampler.start,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def warm(sources: list[Path]) -> None:
    for source in sources:
        with open(source / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass


def output_folder(workdir: Path, mode: str) -> Path:
    return workdir / f"out-{mode.replace('+', '')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4,8")
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES), help="which of %(default)s to run (floor always runs)")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.measure:
        sources = [workdir / f"source-{i}" for i in range(args.count)]
        print(json.dumps(measure(args.measure, sources, output_folder(workdir, args.measure))))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m for m in MODES if m == "floor" or m in args.modes.split(",")]
    workdir.mkdir(parents=True, exist_ok=True)
    sources = prepare(workdir, max(sizes))
    model_bytes = (sources[0] / "model.safetensors").stat().st_size
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for n in sizes:
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:  # interleaved, so that a burst of load from elsewhere hits every mode alike
                shutil.rmtree(output_folder(workdir, mode), ignore_errors=True)
                os.sync()  # no mode pays for the writeback of an earlier mode's output
                warm(sources[:n])
                done = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--measure", mode,
                                       "--count", str(n)], capture_output=True, text=True, env=env, check=True)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                run["load_average"] = os.getloadavg()[0]
                runs[mode].append(run)
        for mode in modes:
            best = min(runs[mode], key=lambda r: r["wall_s"])
            best.update(mode=mode, n=n, all_wall_s=[r["wall_s"] for r in runs[mode]])
            results.append(best)
            detail = (f"  (read {best['read_s']:.3f} s + write {best['write_s']:.3f} s; cat {best['cat_s']:.3f} s)"
                      if mode == "floor" else "")
            print(f"N={n} {mode:9s} wall {best['wall_s']:6.2f} s  cpu {best['cpu_s']:6.2f} s  "
                  f"peak anon {best['peak_anon'] / 2**20:7.0f} MiB  peak RSS {best['peak_rss'] / 2**20:7.0f} MiB  "
                  f"read {best['tensor_bytes_read'] / 2**20:6.0f} MiB  "
                  f"written {best['bytes_written'] / 2**20:5.0f} MiB  load {best['load_average']:.1f}{detail}",
                  flush=True)
    (workdir / "results.json").write_text(json.dumps({"model_bytes": model_bytes, "runs": results}, indent=2))

    by = {(r["mode"], r["n"]): r for r in results}
    print(f"\none model: {model_bytes / 2**20:.0f} MiB; load average at the end: {os.getloadavg()[0]:.2f}")
    others = modes[1:]
    print("| N | floor read | floor write | floor (read + write) | " + " | ".join(others) + " | "
          + " | ".join(f"{mode} / floor" for mode in others) + " |")
    print("|---|---|---|---|" + "---|" * 2 * len(others))
    for n in sizes:
        f = by[("floor", n)]
        print(f"| {n} | {f['read_s']:.2f} s | {f['write_s']:.2f} s | {f['wall_s']:.2f} s | "
              + " | ".join(f"{by[(mode, n)]['wall_s']:.2f} s" for mode in others) + " | "
              + " | ".join(f"{by[(mode, n)]['wall_s'] / f['wall_s']:.2f}" for mode in others) + " |")
    print("\nCPU seconds (user + system, all threads) of the runs above:")
    print("| N | " + " | ".join(modes) + " | " + " | ".join(f"{mode} / floor" for mode in others) + " |")
    print("|---|" + "---|" * (len(modes) + len(others)))
    for n in sizes:
        f = by[("floor", n)]
        print(f"| {n} | " + " | ".join(f"{by[(mode, n)]['cpu_s']:.2f} s" for mode in modes) + " | "
              + " | ".join(f"{by[(mode, n)]['cpu_s'] / f['cpu_s']:.2f}" for mode in others) + " |")
    print("\n| N | " + " | ".join(f"{mode} peak anon" for mode in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for n in sizes:
        print(f"| {n} | " + " | ".join(f"{by[(mode, n)]['peak_anon'] / 2**20:.0f} MiB" for mode in modes) + " |")
    if "hfmerge" in modes and "ties" in modes:
        print("\n| N | hfmerge (average) | ties | ties / average, wall | ties / average, CPU |")
        print("|---|---|---|---|---|")
        for n in sizes:
            average, ties = by[("hfmerge", n)], by[("ties", n)]
            print(f"| {n} | {average['wall_s']:.2f} s | {ties['wall_s']:.2f} s | "
                  f"{ties['wall_s'] / average['wall_s']:.2f} | {ties['cpu_s'] / average['cpu_s']:.2f} |")
        print("target: ties / average <= 3 at every N")
    for mode in [m for m in ("hfmerge", "ties") if m in modes]:
        big, small = by[(mode, max(sizes))], by[(mode, min(sizes))]
        print(f"\n{mode} peak anon N={max(sizes)} / N={min(sizes)}: {big['peak_anon'] / small['peak_anon']:.2f}  "
              f"(target ≤ 1.2); N={max(sizes)} / one model: {big['peak_anon'] / model_bytes:.2f} (target ≤ 1.3); "
              f"wall / floor at N={max(sizes)}: {big['wall_s'] / by[('floor', max(sizes))]['wall_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
