"""The output ensemble: the sources' softmax averaged over the union of their labels.

An evaluation reference, never a merge: it costs every source's parameters
and forward pass, and the tables say so beside its accuracy. A source whose
label set lacks a label gives it probability 0, so the averaged
probabilities still sum to one:

    p(y | x) = (1/N) Σᵢ pᵢ(y | x),   pᵢ(y | x) = 0 when y is not one of source i's labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.utils import ModelOutput


@dataclass
class EnsembleOutput(ModelOutput):
    """``probabilities`` over the union labels, and ``logits`` = their logarithm (softmax gives them back)."""

    logits: Tensor | None = None
    probabilities: Tensor | None = None


class Ensemble(torch.nn.Module):
    """Averaged softmax of image classifiers (each with ``config.id2label``) over their union label space.

    Labels are matched by name; the union lists them in order of first
    appearance (source 0's labels, then source 1's new ones, ...). Every source
    reads the same ``pixel_values``, so the sources must share one image
    processor (as sources of one merge do).
    """

    def __init__(self, sources: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not sources:
            raise ValueError("an ensemble needs at least one source model")
        self.sources = torch.nn.ModuleList(sources)
        labels: dict[str, int] = {}
        for source in sources:
            for _, label in sorted(_id2label(source).items()):
                labels.setdefault(label, len(labels))
        for i, source in enumerate(sources):
            columns = [labels[label] for _, label in sorted(_id2label(source).items())]
            self.register_buffer(f"columns_{i}", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.config = PretrainedConfig(id2label={i: label for label, i in labels.items()}, label2id=dict(labels))

    @property
    def num_labels(self) -> int:
        return len(self.config.id2label)

    def forward(self, pixel_values: Tensor) -> EnsembleOutput:
        total = None
        for i, source in enumerate(self.sources):
            logits = source(pixel_values=pixel_values).logits
            probabilities = logits.float().softmax(dim=-1)
            if total is None:
                total = probabilities.new_zeros(probabilities.shape[0], self.num_labels)
            total.index_add_(1, getattr(self, f"columns_{i}"), probabilities)
        average = total / len(self.sources)
        return EnsembleOutput(logits=average.log(), probabilities=average)


def _id2label(model: torch.nn.Module) -> dict[int, str]:
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        raise ValueError(f"{type(model).__name__} has no config.id2label; the ensemble matches labels by name")
    return {int(k): str(v) for k, v in id2label.items()}
