"""The gate network as the training loop sees it: the merged model's pixels in, task logits and a loss out."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import ImageClassifierOutput

from hfmerge.modeling.gated_vit import gate_pixel_values


class GateInput(torch.nn.Module):
    """A MobileNetV2 gate fed the way the gated model feeds it (vit-gating-merge §3.2).

    ``pixel_values`` are the merged model's own (its ViT image processor's);
    :func:`~hfmerge.modeling.gated_vit.gate_pixel_values` turns them into the
    gate's input inside the model, so the gate trains on exactly what it sees
    at inference. ``labels`` are source indices; the loss is cross-entropy.
    """

    def __init__(self, gate: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.gate = gate
        self.config = config

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.gate(pixel_values=gate_pixel_values(pixel_values, self.config)).logits
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
