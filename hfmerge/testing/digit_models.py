"""Small ViTs trained on the digit tasks (:mod:`hfmerge.testing.tasks`), from one shared initialisation.

The models the offline demo and the data tests merge: a base "pre-trained" a
little on upright and mirrored digits, then fine-tuned copies — ``upright``
and ``mirrored`` (two domains, ten labels each), ``low`` and ``high`` (digits
0–4 and 5–9, two tasks); on request (:data:`GATING_MODELS`, for the gating
merge's tests) also ``inverted``: upright digits with inverted intensities, a
domain told apart from the others at a glance. Training is a plain seeded
PyTorch loop on the tasks' train splits, read exactly as a user's data would
be: each image through the saved image processor.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hfmerge.testing.tasks import DIGIT_NAMES, SIZE, digit_split

MODELS = ("base", "upright", "mirrored", "low", "high")
GATING_MODELS = (*MODELS, "inverted")
TASK_OF = {"upright": "digits", "mirrored": "digits-mirrored", "low": "digits-low", "high": "digits-high",
           "inverted": "digits-inverted"}


@dataclass(frozen=True)
class DigitViT:
    """The size of the digit ViTs and how long each is trained."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    base_epochs: int = 12
    finetune_epochs: int = 5
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 1e-3
    inverted_epochs: int = 8  # the base never saw white backgrounds: it needs longer, at the base's rate


def processor():
    """The image processor every digit model saves: 16 px, values scaled to [-1, 1]."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@functools.cache
def split_tensors(task: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A task split as (pixel_values, labels, label names), the pixels as :func:`processor` makes them.

    The images are 16 px already, so the processor only rescales to [0, 1] and
    normalises with mean and std 0.5 per channel: done here on the arrays at
    once (``tests/test_digit_tasks.py`` checks it equals the processor's output).
    """
    images, targets, names = digit_split(task, split)
    grey = torch.from_numpy(images).to(torch.float32) / 255.0
    pixels = ((grey - 0.5) / 0.5)[:, None].repeat(1, 3, 1, 1).contiguous()
    return pixels, torch.from_numpy(targets).long(), names


def _vit(size: DigitViT, labels: list[str]):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=size.hidden_size, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       intermediate_size=2 * size.hidden_size, image_size=SIZE, patch_size=4,
                       id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    return ViTForImageClassification(config)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Train ``model`` in place on (pixel_values, labels): AdamW, batches of 64 in a seeded order; then eval mode."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        train_epoch(model, x, y, optimiser, generator)
    model.eval()


def train_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimiser: torch.optim.Optimizer,
                generator: torch.Generator, *, batch_size: int = 64,
                after_step: Callable[[], object] | None = None) -> None:
    """One epoch of cross-entropy steps over (pixel_values, labels) in an order drawn from ``generator``."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        batch = order[start:start + batch_size]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[batch]).logits, y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if after_step is not None:
            after_step()


def train_digit_models(folder: Path, size: DigitViT = DigitViT(), *, models: tuple[str, ...] = MODELS,
                       report: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Train the digit ViTs and save each, with its processor and a license card, to ``folder/<name>``.

    Training runs on one CPU thread: batches of 64 tiny images gain nothing from
    more, and on a busy machine threads that wait for each other cost ten times as much.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_save(folder, size, models, report)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(folder: Path, size: DigitViT, models: tuple[str, ...],
                    report: Callable[[str], None] | None) -> dict[str, Path]:
    torch.manual_seed(0)
    started = time.time()
    upright_x, upright_y, names = split_tensors("digits", "train")
    mirrored_x, _, _ = split_tensors("digits-mirrored", "train")
    base = _vit(size, names)
    half = len(upright_x) // 2  # "pre-training": a little on both domains, so the base knows no domain well
    fit(base, torch.cat([upright_x[:half], mirrored_x[half:]]), upright_y, size.base_epochs, size.learning_rate)
    trained = {"base": base}
    if report:
        report(f"base trained ({time.time() - started:.0f} s)")
    for name in models:
        if name == "base":
            continue
        x, y, labels = split_tensors(TASK_OF[name], "train")
        model = _vit(size, labels)
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        if labels == DIGIT_NAMES:
            state = base.state_dict()
        model.load_state_dict(state, strict=False)
        if name == "inverted":
            fit(model, x, y, size.inverted_epochs, size.learning_rate)
        else:
            fit(model, x, y, size.finetune_epochs, size.finetune_learning_rate)
        trained[name] = model
        if report:
            report(f"{name} trained ({time.time() - started:.0f} s)")
    folders = {}
    for name in models:
        out = folder / f"vit-digits-{name}"
        trained[name].save_pretrained(out)
        processor().save_pretrained(out)
        (out / "README.md").write_text(
            "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n---\n"
            f"# vit-digits-{name}\n\nA tiny ViT trained on scikit-learn's digits by hfmerge's test tasks.\n")
        folders[name] = out
    return folders


@torch.inference_mode()
def accuracy(model: torch.nn.Module, task: str, split: str = "test") -> float:
    """Top-1 accuracy on a digit task, matching predictions to the task's labels by name."""
    x, y, names = split_tensors(task, split)
    predicted = model.eval()(pixel_values=x).logits.argmax(-1)
    predicted_names = [model.config.id2label[int(i)] for i in predicted]
    return sum(p == names[int(t)] for p, t in zip(predicted_names, y)) / len(y)
