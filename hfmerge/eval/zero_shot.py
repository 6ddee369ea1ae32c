"""Zero-shot classification of CLIP image encoders with a text tower: how merged task towers are scored.

A CLIP tower has no classifier. As the papers that merge them do (Ilharco et al., *Editing Models with Task
Arithmetic*, ICLR 2023, appendix B, after Radford et al., *Learning Transferable Visual Models From Natural
Language Supervision*, ICML 2021, §3.1.4), each class name is written into prompt templates, the text tower
embeds every prompt, and a class's weight is the mean of its prompts' normalised embeddings, normalised again.
An image's logits are ``logit_scale · ⟨ê(x), ŵ_c⟩``: its normalised image embedding (the tower's pooled output
through the visual projection) against every class of its task. The text tower is the pre-trained one (the
``CLIPModel`` base, or the merged ``CLIPModel`` itself): merges never change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from hfmerge.eval.report import ZeroShotScoring

PROMPTS = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
)
"""The default prompt templates: CLIP's default prompt (``a photo of a {}.``) and plain variations of it.
Dataset-specific templates score better (``--prompt``)."""


def class_weights(model: Any, tokenizer: Any, names: Sequence[str], prompts: Sequence[str] = PROMPTS) -> torch.Tensor:
    """``[classes, dim]``: each class's prompt ensemble (Radford et al. 2021, §3.1.4) through a ``CLIPModel``'s text
    tower: every prompt's projected, normalised embedding, averaged over the class's prompts and normalised again.

    Differentiable, so that the same head trains a tower (:mod:`hfmerge.testing.digit_clip`) that it later scores.
    """
    limit = model.config.text_config.max_position_embeddings
    weights = []
    for name in names:
        tokens = tokenizer([p.format(name) for p in prompts], padding=True, truncation=True, max_length=limit,
                           return_tensors="pt")
        pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        embedded = nn.functional.normalize(model.text_projection(pooled), dim=-1)
        weights.append(nn.functional.normalize(embedded.mean(dim=0), dim=-1))
    return torch.stack(weights)


def prompt_problem(templates: Sequence[str]) -> str | None:
    """What is wrong with prompt templates, or ``None``: each must be text with ``{}`` where the class name goes."""
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            return (f"prompt {template!r} has no {{}} where the class name goes; write e.g. 'a photo of a {{}}.'")
    return None


class TextTower:
    """A ``CLIPModel``'s text side: tokenizer, text encoder, text projection, logit scale; and its visual projection,
    for towers that lack one (a ``CLIPVisionModel``)."""

    def __init__(self, model: Any, tokenizer: Any, folder: Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.folder = folder
        """Where the ``CLIPModel`` was loaded from (:meth:`load`), resolved; ``None``: made in memory."""

    @classmethod
    def load(cls, path: Path) -> TextTower:
        """The text tower of the ``CLIPModel`` saved in ``path``, with its tokenizer (its image encoder is dropped)."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(path, dtype=torch.float32)
        model.vision_model = None  # only the text side and the projections are used
        return cls(model, AutoTokenizer.from_pretrained(path), Path(path).resolve())

    @torch.no_grad()
    def class_weights(self, names: Sequence[str], prompts: Sequence[str] = PROMPTS) -> torch.Tensor:
        """``[classes, dim]``: each class's normalised mean of its normalised prompt embeddings."""
        return class_weights(self.model, self.tokenizer, names, prompts)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class ZeroShotClassifier(nn.Module):
    """An image encoder with one task's class weights: an image classifier (``logits``, ``config.id2label``).

    Args:
        tower: a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``.
        projection: the visual projection where the tower has none (the text tower's ``CLIPModel``'s).
        weights: ``[classes, dim]`` from :meth:`TextTower.class_weights`.
        scale: the text tower's ``exp(logit_scale)``.
        labels: the class names, in the order of ``weights``.
    """

    def __init__(self, tower: nn.Module, projection: nn.Module | None, weights: torch.Tensor, scale: float,
                 labels: Sequence[str]) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        own = getattr(tower, "visual_projection", None)
        if own is None and projection is None:
            raise ValueError(f"{type(tower).__name__} has no visual projection and none was given")
        self.encoder = getattr(tower, "vision_model", None) or tower  # a CLIPModel's text side is not counted
        self.projection = own if own is not None else projection
        self.register_buffer("weights", weights, persistent=False)
        self.scale = scale
        self.config = PretrainedConfig(id2label=dict(enumerate(labels)),
                                       label2id={name: i for i, name in enumerate(labels)},
                                       name_or_path=getattr(tower.config, "name_or_path", ""))

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        pooled = self.encoder(pixel_values=pixel_values).pooler_output
        embedded = nn.functional.normalize(self.projection(pooled), dim=-1)
        return ImageClassifierOutput(logits=self.scale * embedded @ self.weights.to(embedded.dtype).T)


class ZeroShot:
    """A tower and the text tower that scores it: one :class:`ZeroShotClassifier` per task's class names.

    ``text_name`` names the model whose text tower ``text`` is (the base's repo id, or the tower's own name when it
    is a ``CLIPModel`` scored by its own), so that a report says how its rows were scored (:meth:`scoring`).
    """

    def __init__(self, tower: nn.Module, text: TextTower, prompts: Sequence[str] = PROMPTS,
                 text_name: str = "") -> None:
        self.tower = tower.eval()
        self.text = text
        self.prompts = tuple(prompts)
        self.text_name = text_name

    def scoring(self) -> ZeroShotScoring:
        """The prompts and the text tower, as a report records them beside the scores."""
        from hfmerge.eval.report import ZeroShotScoring

        return ZeroShotScoring(text_tower=self.text_name, prompts=list(self.prompts),
                               default_prompts=self.prompts == PROMPTS)

    def classifier(self, labels: Sequence[str]) -> ZeroShotClassifier:
        """The classifier over ``labels``: the task's class names, as its dataset names them."""
        projection = getattr(self.text.model, "visual_projection", None)
        return ZeroShotClassifier(self.tower, projection, self.text.class_weights(labels, self.prompts),
                                  self.text.logit_scale, labels).eval()


ENCODER_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "image_size")
"""The vision config fields that fix an image encoder's tensors' shapes: a tower and the ``CLIPModel`` it was
fine-tuned from agree on each."""


def encoder_mismatch(tower: Any, text: TextTower) -> str | None:
    """How ``tower``'s image encoder differs in shape from the one ``text``'s ``CLIPModel`` was built with
    (``hidden_size 16 ≠ 64, …``), or ``None`` where they agree and ``text`` can score ``tower``."""
    config = getattr(tower.config, "vision_config", None) or tower.config
    expected = text.model.config.vision_config
    fields = [(name, getattr(config, name, None), getattr(expected, name, None)) for name in ENCODER_SHAPE]
    if getattr(tower, "visual_projection", None) is not None:
        fields.append(("projection_dim", tower.visual_projection.out_features, text.model.config.projection_dim))
    differences = [f"{name} {mine} ≠ {theirs}" for name, mine, theirs in fields if mine != theirs]
    return ", ".join(differences) or None


def text_tower_path(model: Path, architecture: str, base: Path | None, text_architecture: str) -> Path | None:
    """Where a zero-shot tower's text tower is: the model itself when it is the text tower's architecture
    (a merged ``CLIPModel``), else ``base`` when given, else ``None``."""
    if architecture == text_architecture:
        return model
    return base
