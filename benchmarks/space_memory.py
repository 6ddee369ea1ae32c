"""The demo Space's memory over many requests: RSS of the app's process, sampled after each request.

Builds a merge of two tiny ViTs, or with ``--size vit-b`` two ViT-B/16 (``hfmerge.merge(..., method="average")``), writes its Space with
``hfmerge.save_space`` (the files ``hfmerge space --output`` writes), starts ``app.py`` in its own
interpreter without hfmerge importable (as on the Hub, :func:`hfmerge.testing.space_app.running_space`)
and sends ``--requests`` predictions over HTTP with ``gradio_client`` from ``--clients`` clients at once, each a new image (random
pixels, sides cycling from 96 to 1,200 px, one in four a PNG, the others JPEG) so that every request is a new upload, as
users' are. After each request it reads the app's ``VmRSS`` and ``RssAnon`` from ``/proc`` and the
size of Gradio's upload folder (``GRADIO_TEMP_DIR``, set to a folder of the run).

The Space's ``app.py`` and ``inference.py`` are this checkout's ``spaces/`` files: where the package
that wrote the Space is installed from another checkout (an editable install maps ``hfmerge.spaces``
to its own folder), the run copies this checkout's files over them and says so.

Usage: ``python benchmarks/space_memory.py [--requests 1000] [--clients 4] [--every 50] [--template DIR]
[--workdir DIR] [--size tiny|vit-b]``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ("app.py", "inference.py")


def vit_b_sources(workdir: Path) -> list[Path]:
    """Two ViT-B/16 classifiers from ``stream.py``'s config (random weights, 1,000 labels), as the issue's Space had."""
    import torch
    from transformers import ViTForImageClassification, ViTImageProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stream import vit_b16_config

    folders = []
    for seed in (0, 1):
        folder = workdir / f"source-vit-b-{seed}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(seed)
            ViTForImageClassification(vit_b16_config()).save_pretrained(folder)
            ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
        folders.append(folder)
    return folders


def build_space(workdir: Path, template: Path, size: str = "tiny") -> Path:
    """A Space folder for an average of two ViTs (tiny ones, or ViT-B/16 with ``size="vit-b"``), with ``template``'s app files."""
    import hfmerge
    from hfmerge.testing.tiny import save_tiny

    if size == "vit-b":
        sources = vit_b_sources(workdir)
    else:
        sources = [save_tiny(workdir / f"source-{seed}", "vit", seed=seed) for seed in (0, 1)]
    hfmerge.merge([str(s) for s in sources], method="average").save(workdir / "merged")
    space = hfmerge.save_space(hfmerge.SpaceOptions(str(workdir / "merged")), workdir / "space")
    for name in TEMPLATE:
        ours = (template / name).read_bytes()
        if (space / name).read_bytes() != ours:
            print(f"{name}: the installed package wrote another file; using {template / name}")
            (space / name).write_bytes(ours)
    return space


def memory(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def folder_size(folder: Path) -> tuple[int, int]:
    """Files in ``folder`` and their bytes; a file Gradio removes meanwhile (its partial uploads) is not counted."""
    count = size = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                size += path.stat().st_size
                count += 1
        except FileNotFoundError:
            continue
    return count, size


def request_image(index: int, folder: Path) -> Path:
    """A new image for request ``index``: random pixels, its side cycling from 96 to 1,200 px."""
    import numpy as np
    import PIL.Image

    sides = (96, 224, 480, 800, 1200)
    side = sides[index % len(sides)]
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (side, side * 3 // 4, 3), dtype=np.uint8)
    suffix = ".png" if index % 4 == 3 else ".jpg"
    path = folder / f"request-{index}{suffix}"
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG" if suffix == ".png" else "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="print a row every this many requests")
    parser.add_argument("--clients", type=int, default=4, help="clients sending requests at once (default 4)")
    parser.add_argument("--template", type=Path, default=ROOT / "spaces",
                        help="folder of the app.py and inference.py to run (default: this checkout's spaces/)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds the app has to start (default 600)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, deleted after")
    parser.add_argument("--size", choices=("tiny", "vit-b"), default="tiny",
                        help="the merged models: tiny ViTs (default) or ViT-B/16, 86M parameters, as in the issue")
    args = parser.parse_args()

    import psutil
    from gradio_client import Client, handle_file

    from hfmerge.testing.space_app import running_space

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hfmerge-space-memory-"))
    shutil.rmtree(workdir / "space", ignore_errors=True)
    shutil.rmtree(workdir / "merged", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    uploads = workdir / "gradio-tmp"
    shutil.rmtree(uploads, ignore_errors=True)
    uploads.mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    space = build_space(workdir, args.template, args.size)
    images = workdir / "requests"
    images.mkdir(exist_ok=True)
    print(f"Space: {space}; {args.requests} requests from {args.clients} clients at once")
    print("| requests | VmRSS MiB | RssAnon MiB | upload folder (files, MiB) | s per request |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    with running_space(space, workdir / "space.log", without_hfmerge=True, timeout=args.start_timeout) as url:
        (app,) = [c for c in psutil.Process().children() if "app.py" in " ".join(c.cmdline())]
        clients = [Client(url, verbose=False) for _ in range(args.clients)]
        start = time.perf_counter()
        done = 0
        lock = threading.Lock()

        def row(count: int) -> None:
            mem = memory(app.pid)
            files, size = folder_size(uploads)
            per = (time.perf_counter() - start) / max(count, 1)
            rows.append((count, mem["VmRSS"], mem["RssAnon"]))
            print(f"| {count} | {mem['VmRSS'] / 2**20:.0f} | {mem['RssAnon'] / 2**20:.0f} | "
                  f"{files}, {size / 2**20:.1f} | {per:.3f} |", flush=True)

        def send(i: int) -> None:
            nonlocal done
            path = request_image(i, images)
            answer = clients[i % len(clients)].predict(handle_file(str(path)), api_name="/predict")
            path.unlink()
            if not answer.get("merged"):
                raise RuntimeError(f"request {i}: no prediction: {answer}")
            with lock:
                done += 1
                if done % args.every == 0 or done == args.requests:
                    row(done)

        row(0)
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(send, range(args.requests)))
        for client in clients:
            client.close()
    peak = max(r[1] for r in rows)
    print(f"VmRSS: {rows[0][1] / 2**20:.0f} MiB at start, {rows[-1][1] / 2**20:.0f} MiB after "
          f"{rows[-1][0]} requests, peak {peak / 2**20:.0f} MiB")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
