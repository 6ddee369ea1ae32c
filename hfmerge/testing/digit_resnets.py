"""Tiny ResNets trained on the digits task from different seeds: the setting OTFusion is for.

Two networks of one architecture trained from different random initialisations
(and data orders) learn the same task with their channels in unrelated orders,
so averaging their weights mixes unrelated channels, while aligning the
channels first (OTFusion) keeps much of what they know. These models are what
the OTFusion tests fuse; ``wide`` has other widths, for the test that fuses
models of different widths into the target's; ``shallow`` and ``deep`` have 2-2
and 3-4 blocks, the ResNet-18/34 pair of CLAFusion at the digits' size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hfmerge.testing.digit_models import fit, processor, split_tensors


@dataclass(frozen=True)
class DigitResNet:
    """The size of a digit ResNet and how it is trained."""

    embedding_size: int = 16
    hidden_sizes: tuple[int, ...] = (16, 32)
    depths: tuple[int, ...] = (1, 1)
    epochs: int = 6
    learning_rate: float = 3e-3


SEEDS = {"seed0": (0, DigitResNet()), "seed1": (1, DigitResNet()),
         "wide": (2, DigitResNet(embedding_size=24, hidden_sizes=(24, 40))),
         "shallow": (3, DigitResNet(depths=(2, 2))), "deep": (4, DigitResNet(depths=(3, 4)))}
"""Name -> (seed, size) of the digit ResNets :func:`train_digit_resnets` trains."""


def digit_resnet(size: DigitResNet, labels: list[str], seed: int):
    """A randomly initialised ResNet classifier for the 16-px digits, initialised from ``seed``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=size.embedding_size, hidden_sizes=list(size.hidden_sizes),
                          depths=list(size.depths), layer_type="basic", downsample_in_first_stage=False,
                          id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    config.architectures = ["ResNetForImageClassification"]
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


def train_digit_resnets(folder: Path, names: tuple[str, ...] = ("seed0", "seed1"), *,
                        report: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Train the named digit ResNets (:data:`SEEDS`) on the ``digits`` train split; save each with its processor.

    Each trains from its own seed, with its own data order; one CPU thread, as the digit ViTs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.time()
    try:
        x, y, labels = split_tensors("digits", "train")
        folders = {}
        for name in names:
            seed, size = SEEDS[name]
            model = digit_resnet(size, labels, seed)
            _fit_seeded(model, x, y, size, seed)
            out = folder / f"resnet-digits-{name}"
            model.save_pretrained(out)
            processor().save_pretrained(out)
            (out / "README.md").write_text(
                "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n---\n"
                f"# resnet-digits-{name}\n\nA tiny ResNet trained from seed {seed} on scikit-learn's digits "
                "by hfmerge's test tasks.\n")
            folders[name] = out
            if report:
                report(f"{name} trained ({time.time() - started:.0f} s)")
        return folders
    finally:
        torch.set_num_threads(threads)


def _fit_seeded(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: DigitResNet, seed: int) -> None:
    """:func:`~hfmerge.testing.digit_models.fit`, with the data order drawn from ``seed`` too."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1000 + seed)
    order = torch.randperm(len(x))
    torch.random.set_rng_state(generator_state)
    fit(model, x[order], y[order], size.epochs, size.learning_rate)
