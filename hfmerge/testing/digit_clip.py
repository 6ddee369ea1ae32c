"""Small CLIP models on the digit tasks (:mod:`hfmerge.testing.tasks`): a ``CLIPModel`` and task towers from it.

The model-merging papers merge CLIP image encoders, each fine-tuned on one task
under a frozen zero-shot head (Ilharco et al., *Editing Models with Task
Arithmetic*, ICLR 2023, §2 and appendix B): the head's rows are the text tower's
prompt ensembles of the task's class names, and only the image encoder learns.
This module makes such models small enough for the offline demo:

- ``base``: a ``CLIPModel`` (vision and text towers, a character-level
  tokenizer) "pre-trained" on upright, mirrored and inverted digits, a third
  of the images from each, with the image-text objective restricted to the ten
  class prompts: it has a zero-shot accuracy on every domain to start from,
  and knows none well;
- one ``CLIPVisionModel`` per task in :data:`TOWERS` (mirrored and inverted
  digits), its encoder fine-tuned from the base's under the frozen head; the
  visual projection stays the base's, as a ``CLIPVisionModel`` checkpoint has
  none.

Scoring is :mod:`hfmerge.eval.zero_shot`'s, with its default prompts: the head a
tower trains under is the one it is evaluated with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfmerge.eval.zero_shot import PROMPTS, class_weights
from hfmerge.testing.digit_models import fit, split_tensors
from hfmerge.testing.tasks import SIZE

TOWERS = {"mirrored": "digits-mirrored", "inverted": "digits-inverted"}
"""The task towers, by name, and the digit task each is fine-tuned on."""


@dataclass(frozen=True)
class DigitCLIP:
    """The size of the digit CLIP models and how long each is trained."""

    hidden_size: int = 64
    layers: int = 3
    heads: int = 4
    text_hidden_size: int = 32
    text_layers: int = 1
    projection_dim: int = 32
    base_epochs: int = 12
    finetune_epochs: int = 8
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 1e-3


def processor() -> Any:
    """The base's processor: 16 px images scaled to [-1, 1] (as the digit ViTs'), and the character-level tokenizer."""
    from transformers import CLIPProcessor

    from hfmerge.adapters.clip import tiny_tokenizer

    return CLIPProcessor(image_processor=image_processor(), tokenizer=tiny_tokenizer())


def image_processor() -> Any:
    """A tower's image processor: 16 px, mean and std 0.5 per channel, so that :func:`split_tensors`'s pixels are
    what it makes of the digit datasets' images."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _clip(size: DigitCLIP) -> Any:
    from transformers import CLIPConfig, CLIPModel

    from hfmerge.adapters.clip import tiny_tokenizer

    text = {"hidden_size": size.text_hidden_size, "intermediate_size": 2 * size.text_hidden_size,
            "num_hidden_layers": size.text_layers, "num_attention_heads": size.heads, "max_position_embeddings": 40,
            "vocab_size": len(tiny_tokenizer()), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": size.hidden_size, "intermediate_size": 2 * size.hidden_size,
              "num_hidden_layers": size.layers, "num_attention_heads": size.heads, "image_size": SIZE, "patch_size": 4}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.projection_dim))


class _ZeroShotHead(torch.nn.Module):
    """A ``CLIPModel``'s image side under the zero-shot head of ``names``: the head is recomputed from the text
    tower at every step while the base is pre-trained, and computed once and frozen while a tower is fine-tuned."""

    def __init__(self, clip: Any, tokenizer: Any, names: list[str], *, frozen_head: bool) -> None:
        super().__init__()
        self.clip, self.tokenizer, self.names = clip, tokenizer, names
        self.head = None
        if frozen_head:
            with torch.no_grad():
                self.head = class_weights(clip, tokenizer, names, PROMPTS)

    def forward(self, pixel_values: torch.Tensor) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        images = torch.nn.functional.normalize(self.clip.visual_projection(pooled), dim=-1)
        head = self.head if self.head is not None else class_weights(self.clip, self.tokenizer, self.names, PROMPTS)
        return ImageClassifierOutput(logits=self.clip.logit_scale.exp() * images @ head.T)


def _pretraining_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Each train image once, from one domain in turn (upright, mirrored, inverted): the base sees every domain a
    little and none whole."""
    domains = ("digits", *TOWERS.values())
    x, y, _ = split_tensors("digits", "train")
    pick = torch.arange(len(x)) % len(domains)
    mixed = torch.stack([split_tensors(task, "train")[0] for task in domains])[pick, torch.arange(len(x))]
    return mixed, y


def train_digit_clip(folder: Path, size: DigitCLIP = DigitCLIP(), *,
                     report: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Train the base and the task towers and save each, with its processor and a license card, to
    ``folder/clip-digits-<name>``; return the folders by name (``base`` and :data:`TOWERS`' names).

    Like :func:`hfmerge.testing.digit_models.train_digit_models`, on one CPU thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_save(folder, size, report)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(folder: Path, size: DigitCLIP, report: Callable[[str], None] | None) -> dict[str, Path]:
    import copy

    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    started = time.time()
    tokenizer = processor().tokenizer
    base = _clip(size)
    names = split_tensors("digits", "train")[2]
    fit(_ZeroShotHead(base, tokenizer, names, frozen_head=False), *_pretraining_data(), size.base_epochs,
        size.learning_rate)
    if report:
        report(f"CLIP base trained ({time.time() - started:.0f} s)")
    towers = {}
    for name, task in TOWERS.items():
        clip = copy.deepcopy(base)
        clip.requires_grad_(False)
        clip.vision_model.requires_grad_(True)  # the image encoder learns; the head and the projection stay
        x, y, labels = split_tensors(task, "train")
        fit(_ZeroShotHead(clip, tokenizer, labels, frozen_head=True), x, y, size.finetune_epochs,
            size.finetune_learning_rate)  # AdamW steps only what has a gradient
        tower = CLIPVisionModel(base.config.vision_config)
        tower.load_state_dict(clip.vision_model.state_dict())  # transformers 5: a CLIPModel holds a CLIPVisionModel
        towers[name] = tower.eval()
        if report:
            report(f"CLIP tower {name} fine-tuned on {task} ({time.time() - started:.0f} s)")
    folders = {"base": _save(base.eval(), processor(), folder / "clip-digits-base", "zero-shot-image-classification")}
    for name, tower in towers.items():
        folders[name] = _save(tower, image_processor(), folder / f"clip-digits-{name}", "image-feature-extraction")
    return folders


def _save(model: Any, saved_processor: Any, out: Path, pipeline_tag: str) -> Path:
    model.save_pretrained(out)
    saved_processor.save_pretrained(out)
    (out / "README.md").write_text(
        f"---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: {pipeline_tag}\n---\n"
        f"# {out.name}\n\nA tiny CLIP model trained on scikit-learn's digits by hfmerge's test tasks.\n")
    return out


@torch.inference_mode()
def zero_shot_accuracy(encoder: torch.nn.Module, base: Path, task: str, split: str = "test") -> float:
    """Top-1 zero-shot accuracy of an image encoder (a tower or a ``CLIPModel``) on a digit task, its class names
    embedded by the text tower of the ``CLIPModel`` saved in ``base`` (:mod:`hfmerge.eval.zero_shot`)."""
    from hfmerge.eval.zero_shot import TextTower, ZeroShot

    x, y, names = split_tensors(task, split)
    classifier = ZeroShot(encoder, TextTower.load(base)).classifier(names)
    return float((classifier(pixel_values=x).logits.argmax(-1) == y).float().mean())
