"""The suite's ViT zoo: one small ViT pre-trained on a mixture of the tasks, then fine-tuned on each task.

This is the setting task vectors and the gating merge assume (vit-gating-merge
§4.1; task arithmetic): every source starts from one pre-trained model. The
base is pre-trained on the mixture of every task's training images with a head
over the union of all labels (a multi-task model that knows each task
moderately, as a CLIP or ImageNet backbone does); each fine-tuned model then
knows its own task better than the base, so merging has something to lose.
A MobileNetV2 gate is pre-trained on the same mixture (the paper's gate starts
from ImageNet weights; Table 8 shows that matters). Each fine-tuned model starts from the base, its head
initialised from the base's rows of its task's labels, and is trained on its
task's training split read by dataset id through its saved image processor, as
a user's data would be.

Models are cached (``Bench.push_model``) under a fingerprint of their size and
their data, so a second run only pushes them to the local Hub.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite.bench import Bench, fingerprint
from hfmerge.testing.digit_models import train_epoch

LICENSE_CARD = ("---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n---\n"
                "# {name}\n\n{text}\n")


@dataclass(frozen=True)
class ViTSize:
    """The zoo's ViT and how long each model trains."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    layers: int = 6
    heads: int = 4
    pretrain_fraction: float = 1.0
    pretrain_epochs: int = 8
    finetune_epochs: int = 8
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-3
    batch_size: int = 32
    gate_epochs: int = 3
    """Epochs of the gate's pre-training (a MobileNetV2 on the same mixture, as ImageNet is for the paper's)."""


def vit_processor(size: ViTSize) -> Any:
    """Resize to the model's size, scale to [-1, 1]: the processor every zoo ViT saves."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size.image_size, "width": size.image_size},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)


def new_vit(size: ViTSize, labels: list[str]) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=size.hidden_size, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       intermediate_size=2 * size.hidden_size, image_size=size.image_size,
                       patch_size=size.patch_size, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    config.architectures = ["ViTForImageClassification"]
    return ViTForImageClassification(config)


def fit(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, *, epochs: int, learning_rate: float,
        batch_size: int, seed: int) -> None:
    """AdamW with a linear decay, seeded batch order, one CPU thread (tiny batches gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
        steps = epochs * -(-len(labels) // batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / max(steps, 1))
        model.train()
        for _ in range(epochs):
            train_epoch(model, pixels, labels, optimiser, generator, batch_size=batch_size, after_step=schedule.step)
        model.eval()
    finally:
        torch.set_num_threads(threads)


def labelled_pixels(bench: Bench, dataset: str, split: str, processor: Any,
                    labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A split read by dataset id, through ``processor``; targets as indices into ``labels`` (by name)."""
    data = bench.split(dataset, split)
    names = data.features["label"].names
    pixels = processor(images=[image.convert("RGB") for image in data["image"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor([labels.index(names[t]) for t in data["label"]])


def save(model: torch.nn.Module, size: ViTSize, folder: Path, name: str, text: str) -> None:
    model.save_pretrained(folder)
    vit_processor(size).save_pretrained(folder)
    (folder / "README.md").write_text(LICENSE_CARD.format(name=name, text=text))


def vit_zoo(bench: Bench, datasets: dict[str, str], labels: dict[str, list[str]], size: ViTSize,
            seed: int = 0) -> dict[str, str]:
    """Push the base ViT and one fine-tuned ViT per task; returns ``{"base": repo, task: repo, ...}``.

    ``datasets`` maps task name → dataset repo id, ``labels`` task name → its label names.
    """
    key = fingerprint(asdict(size), sorted(datasets.items()), seed, "vit-zoo-2")
    processor = vit_processor(size)
    union = [label for task in datasets for label in labels[task]]

    def build_base(folder: Path) -> None:
        torch.manual_seed(seed)
        model = new_vit(size, union)
        parts = []
        for task, dataset in datasets.items():
            pixels, targets = labelled_pixels(bench, dataset, "train", processor, labels[task])
            keep = max(1, int(len(targets) * size.pretrain_fraction))
            offset = union.index(labels[task][0])
            parts.append((pixels[:keep], targets[:keep] + offset))
        fit(model, torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]), epochs=size.pretrain_epochs,
            learning_rate=size.learning_rate, batch_size=size.batch_size, seed=seed)
        save(model, size, folder, "vit-base", f"A small ViT pre-trained weakly on a mixture of {len(datasets)} "
             "benchmark tasks (hfmerge's benchmark suite).")

    repos = {"base": bench.push_model("vit-base", key, build_base)}
    base_folder = bench.cache / f"model-vit-base-{key}"
    for index, (task, dataset) in enumerate(datasets.items()):
        def build(folder: Path, task: str = task, dataset: str = dataset, index: int = index) -> None:
            started = time.perf_counter()
            base = _load(base_folder)
            model = new_vit(size, labels[task])
            state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
            rows = torch.tensor([union.index(label) for label in labels[task]])
            state["classifier.weight"] = base.classifier.weight.detach()[rows].clone()
            state["classifier.bias"] = base.classifier.bias.detach()[rows].clone()
            model.load_state_dict(state)
            pixels, targets = labelled_pixels(bench, dataset, "train", processor, labels[task])
            fit(model, pixels, targets, epochs=size.finetune_epochs, learning_rate=size.finetune_learning_rate,
                batch_size=size.batch_size, seed=seed + 1 + index)
            save(model, size, folder, f"vit-{task}", f"The suite's base ViT fine-tuned on the {task} task "
                 f"({time.perf_counter() - started:.0f} s on a CPU).")

        repos[task] = bench.push_model(f"vit-{task}", key, build)
    return repos


def _load(folder: Path) -> torch.nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(folder).eval()


def gate_zoo(bench: Bench, datasets: dict[str, str], labels: dict[str, list[str]], size: ViTSize,
             seed: int = 0) -> str:
    """Push a gate for the gating merge: hfmerge's tiny MobileNetV2 (32 px, depth 0.35) pre-trained on the mixture.

    It stands in for ``google/mobilenet_v2_1.0_224`` (ImageNet): a classifier whose
    features already tell the tasks' images apart. The gating merge gives it a new
    head of N outputs and fine-tunes it to say which task an image comes from.
    """
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from hfmerge.testing.tiny_gate import GATE_IMAGE_SIZE, gate_processor

    union = [label for task in datasets for label in labels[task]]
    key = fingerprint(asdict(size), sorted(datasets.items()), seed, "gate-1")

    def build(folder: Path) -> None:
        processor = gate_processor()
        config = MobileNetV2Config(image_size=GATE_IMAGE_SIZE, depth_multiplier=0.35,
                                   id2label=dict(enumerate(union)), label2id={l: i for i, l in enumerate(union)})
        config.architectures = ["MobileNetV2ForImageClassification"]
        torch.manual_seed(seed)
        model = MobileNetV2ForImageClassification(config)
        parts = []
        for task, dataset in datasets.items():
            pixels, targets = labelled_pixels(bench, dataset, "train", processor, labels[task])
            parts.append((pixels, targets + union.index(labels[task][0])))
        fit(model, torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]), epochs=size.gate_epochs,
            learning_rate=3e-3, batch_size=size.batch_size, seed=seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "README.md").write_text(LICENSE_CARD.format(
            name="mobilenet-gate", text="A tiny MobileNetV2 pre-trained on the benchmark tasks' mixture: the suite's "
            "stand-in for google/mobilenet_v2_1.0_224 as the gating merge's gate."))

    return bench.push_model("mobilenet-gate", key, build)
