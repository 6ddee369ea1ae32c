"""Fine-tuning throughput: ``hfmerge.train.train_model`` against a plain PyTorch loop of the same model.

Both train the same small ViT classifier (random weights from a config) on the same synthetic,
learnable images (the label is the brightened colour channel) with the same batch size and AdamW,
in the same process, one after the other, best of ``--repeats`` wall times each. Modes:

* plain     — ``model.train()``; for each batch of a shuffled DataLoader: ``model(**batch).loss``,
              ``backward``, ``step``, ``zero_grad``; nothing else;
* train     — ``train_model`` with a separate validation set of ``--val-samples`` samples: the
              whole call (Accelerator, prepare, linear schedule, clipping, a validation pass and a
              best-weights copy per epoch, the restore at the end);
* train-noval — ``train_model`` with ``validation_fraction=0``: the per-step overheads alone.

Throughput is training samples per second of wall time (validation samples are not counted: the
validation pass is a cost of ``train``); the CPU seconds of the process (all threads) are reported
beside it, as on a shared machine they move less with other processes' load than wall time does. Every run builds its model from one seed before the clock
starts. Usage: ``python benchmarks/finetune.py [--repeats 3] [--epochs 2] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

MODES = ("plain", "train", "train-noval")


class ChannelImages(torch.utils.data.Dataset):
    """Random images whose label is the channel that was brightened (learnable, so training is real)."""

    def __init__(self, size: int, side: int, classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (size,), generator=generator)
        self.images = torch.randn(size, 3, side, side, generator=generator)
        self.images[torch.arange(size), self.labels % 3] += 0.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def small_vit(side: int, classes: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                       image_size=side, patch_size=4, num_labels=classes)
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def plain_loop(model: torch.nn.Module, data: ChannelImages, *, epochs: int, batch_size: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def run(mode: str, args: argparse.Namespace, train: ChannelImages, val: ChannelImages) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one run of ``mode``."""
    from hfmerge.train import TrainOptions, train_model

    model = small_vit(args.side, args.classes)
    started, cpu_started = time.perf_counter(), time.process_time()
    if mode == "plain":
        plain_loop(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    else:
        options = TrainOptions(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
                               validation_fraction=0.0, patience=args.epochs)
        train_model(model, train, options, val_set=val if mode == "train" else None, progress=False)
    return time.perf_counter() - started, time.process_time() - cpu_started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import accelerate  # noqa: F401  imported before the clock, as torch and transformers are
    import transformers  # noqa: F401

    import hfmerge.train  # noqa: F401

    train = ChannelImages(args.samples, args.side, args.classes, seed=0)
    val = ChannelImages(args.val_samples, args.side, args.classes, seed=1)
    model = small_vit(args.side, args.classes)
    parameters = sum(p.numel() for p in model.parameters())
    run("plain", args, train, val)  # warm-up: first-call allocations and kernels, not timed
    best = {mode: float("inf") for mode in MODES}
    best_cpu = dict(best)
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drifting machine load hits every mode alike
            wall, cpu = run(mode, args, train, val)
            best[mode], best_cpu[mode] = min(best[mode], wall), min(best_cpu[mode], cpu)
    trained = args.samples * args.epochs
    result = {
        "model": f"ViT {parameters / 1e6:.2f}M parameters ({parameters * 4 / 2**20:.1f} MiB float32), "
                 f"{args.side}px, patch 4, 4 layers, width 128",
        "torch_threads": torch.get_num_threads(),
        "samples": args.samples, "val_samples": args.val_samples, "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seconds": {mode: round(best[mode], 3) for mode in MODES},
        "samples_per_second": {mode: round(trained / best[mode], 1) for mode in MODES},
        "ratio_to_plain": {mode: round(best["plain"] / best[mode], 3) for mode in MODES},
        "cpu_seconds": {mode: round(best_cpu[mode], 3) for mode in MODES},
        "cpu_ratio_to_plain": {mode: round(best_cpu["plain"] / best_cpu[mode], 3) for mode in MODES},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
