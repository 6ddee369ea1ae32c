"""The gate network as the training loop sees it: the merged model's pixels in, task logits and a loss out."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import ImageClassifierOutput

from hfmerge.methods.gating.gated_vit import FoldedGate, GatedMergedForImageClassification


class GateInput(torch.nn.Module):
    """A MobileNetV2 gate fed exactly as the gated model feeds it (vit-gating-merge §3.2).

    ``pixel_values`` are the merged model's own (its ViT image processor's). The
    gate's input is made by the gated model's own code
    (:meth:`~hfmerge.methods.gating.gated_vit.GatedMergedForImageClassification.gate_logits`,
    borrowed, not copied), so the gate trains on what it sees at inference.
    ``labels`` are source indices; the loss is cross-entropy.
    """

    gate_logits = GatedMergedForImageClassification.gate_logits
    _constant = GatedMergedForImageClassification._constant
    _inference_gate = GatedMergedForImageClassification._inference_gate

    def __init__(self, gate: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.gate = gate
        self.config = config
        self._constants: dict[Any, torch.Tensor] = {}
        self._folded_gate: FoldedGate | None = None

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.gate_logits(pixel_values)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
