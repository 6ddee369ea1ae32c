"""CLAFusion benchmark: a ResNet-18 and a ResNet-34 at full size on the CPU, and a small quality run (Table 1).

**Speed** (``--part speed``): two ``ResNetForImageClassification`` models,
ResNet-18 (depths 2-2-2-2) and ResNet-34 (3-4-6-3), basic layers, widths
64-128-256-512, 1000 labels, random weights (BatchNorm running statistics
randomised), each saved with a 224 px image processor, beside a flat folder of
200 random 224 px PNGs. One run is the CLI a user types, in a fresh subprocess
with a fresh ``HF_HOME`` (no statistics cache):
``hfmerge merge resnet34 resnet18 --method clafusion --data FOLDER --param samples=200``.
Wall time is split with hfmerge's own log lines: planning, the statistics stage
(both models' data passes), the cross-layer alignment, the balancing, the
optimal transport, and the merge; peak RSS and anonymous memory are sampled from
``/proc/<pid>/status`` every 10 ms. ``--method average`` of two ResNet-18s is
the baseline in the same run.

**Quality** (``--part quality``): the digit ResNets of
:mod:`hfmerge.testing.digit_resnets` ``shallow`` (2-2 blocks) and ``deep``
(3-4 blocks), trained on the digits train split from different seeds; CLAFusion
of the two on 200 training images; then the fused model, the deep source and the
shallow source deepened with identity blocks ("depth-aligned", the paper's NET2NET
baseline) are each fine-tuned with the same loop for the same epochs (AdamW,
``--lr``, batch 32, no early stopping). Accuracy on the digits test split, as
the paper's Table 1 reports it.

Usage: ``python benchmarks/clafusion.py [--part speed|quality|both] [--samples 200] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from otfusion import run as run_cli  # noqa: E402  (the same subprocess runner and memory sampler)

STAGES = {
    "plan": re.compile(r"planned \w+ over \d+ sources in ([\d.]+) s"),
    "statistics": re.compile(r"statistics stage: ([\d.]+) s"),
    "alignment": re.compile(r"cross-layer alignment ([\d.]+) s"),
    "balancing": re.compile(r"balancing ([\d.]+) s"),
    "transport": re.compile(r"optimal transport ([\d.]+) s"),
    "merge": re.compile(r"merged \d+ tensors in ([\d.]+) s"),
}


def speed(samples: int) -> None:
    import numpy as np
    import otfusion
    from PIL import Image
    from transformers import ViTImageProcessorPil

    otfusion.STAGES.clear()
    otfusion.STAGES.update(STAGES)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        saved = {}
        for name, depths, seed in (("resnet34", [3, 4, 6, 3], 0), ("resnet18", [2, 2, 2, 2], 1),
                                   ("resnet18b", [2, 2, 2, 2], 2)):
            saved[name] = folder / name
            otfusion.resnet18(seed, depths).save_pretrained(saved[name])
            ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(saved[name])
        images = folder / "images"
        images.mkdir()
        generator = np.random.default_rng(0)
        for i in range(samples):
            Image.fromarray(generator.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        runs = {
            "clafusion 34+18": ["merge", str(saved["resnet34"]), str(saved["resnet18"]), "--method", "clafusion",
                                "--data", str(images), "--param", f"samples={samples}"],
            "average 18+18": ["merge", str(saved["resnet18"]), str(saved["resnet18b"]), "--method", "average"],
        }
        print("| run | wall | plan | statistics | alignment | balancing | transport | merge | peak RSS | peak anon |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, cli in runs.items():
            tag = name.replace(" ", "-").replace("+", "-")
            r = run_cli([*cli, "--output", str(folder / f"out-{tag}")], folder / f"hf-{tag}")
            print(f"| {name} | {r['wall']:.1f} s | {r['plan']:.1f} s | {r['statistics']:.1f} s | "
                  f"{r['alignment']:.1f} s | {r['balancing']:.1f} s | {r['transport']:.1f} s | {r['merge']:.1f} s | "
                  f"{r['rss'] / 2**20:.0f} MiB | {r['anon'] / 2**20:.0f} MiB |", flush=True)


def quality(samples: int, epochs: int, learning_rate: float) -> None:
    import torch
    from torch.utils.data import TensorDataset

    import hfmerge
    from hfmerge.adapters import family_for_model_type
    from hfmerge.methods.ot.balancing import deepen
    from hfmerge.testing.digit_models import accuracy, split_tensors
    from hfmerge.testing.digit_resnets import train_digit_resnets
    from hfmerge.testing.tasks import digit_task
    from hfmerge.train import TrainOptions, train_model

    class Pairs(TensorDataset):
        def __getitem__(self, index):
            pixels, labels = super().__getitem__(index)
            return {"pixel_values": pixels, "labels": labels}

    x, y, _ = split_tensors("digits", "train")
    train_set = Pairs(x, y)

    def fine_tune(model):
        model = model.train()
        train_model(model, train_set, TrainOptions(epochs=epochs, learning_rate=learning_rate, batch_size=32,
                                                   validation_fraction=0.0, seed=0), progress=False)
        return model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        folders = train_digit_resnets(folder, ("shallow", "deep"))
        data = folder / "digits"
        digit_task("digits").save_to_disk(str(data))
        fused = hfmerge.merge([str(folders["deep"]), str(folders["shallow"])], method="clafusion",
                              data=[f"{data}:train"], samples=samples, progress=False)
        fused_model = hfmerge.load(str(fused.save(folder / "fused"))).eval()
        deep, shallow = (hfmerge.load(str(folders[n])).eval() for n in ("deep", "shallow"))
        spec = family_for_model_type("resnet").depth
        mappings = [[s - 1 for s in seg["mapping"]] for seg in fused.details["alignment"][0]["segments"]]
        aligned = deepen(shallow, spec, mappings, list(deep.config.depths)).model
        rows = {"deep (3-4 blocks)": deep, "shallow (2-2 blocks)": shallow, "fused (CLAFusion)": fused_model,
                "shallow depth-aligned": aligned}
        before = {name: accuracy(model, "digits") for name, model in rows.items()}
        with torch.no_grad():
            ensemble_hits = 0
            xt, yt, _ = split_tensors("digits", "test")
            probabilities = sum(torch.softmax(m(xt).logits, -1) for m in (deep, shallow))
            ensemble_hits = int((probabilities.argmax(-1) == yt).sum())
        print(f"alignment: {fused.details['alignment'][0]['segments']}")
        print(f"| model | accuracy | after {epochs} epochs of fine-tuning |")
        print("|---|---|---|")
        for name in ("deep (3-4 blocks)", "shallow (2-2 blocks)", "fused (CLAFusion)", "shallow depth-aligned"):
            tuned = accuracy(fine_tune(rows[name]), "digits") if name != "shallow (2-2 blocks)" else None
            after = f"{tuned:.3f}" if tuned is not None else "—"
            print(f"| {name} | {before[name]:.3f} | {after} |", flush=True)
        print(f"| ensemble of the two sources | {ensemble_hits / len(yt):.3f} | — |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "quality", "both"), default="both")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.part in ("speed", "both"):
        speed(args.samples)
    if args.part in ("quality", "both"):
        quality(args.samples, args.epochs, args.lr)


if __name__ == "__main__":
    main()
