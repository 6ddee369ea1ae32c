"""Knowledge distillation (Hinton, Vinyals & Dean 2015), as CLAFusion §4.2 trains a fused student from its teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfmerge.train.loop import LossFn


def distillation_loss(teacher: torch.nn.Module, temperature: float, weight: float) -> LossFn:
    """``loss_fn(model, batch)``: (1 − γ)·CE(student, labels) + γ·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    The teacher runs in eval mode without gradients on the same batch; T² keeps the soft term's
    gradients on the scale of the hard term's as T grows (Hinton et al. §2). γ = ``weight``.
    """
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, not {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the distillation weight γ must be in [0, 1], not {weight}")
    teacher.eval().requires_grad_(False)

    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        hard = F.cross_entropy(logits, batch["labels"])
        with torch.no_grad():
            target = teacher(pixel_values=batch["pixel_values"]).logits
        soft = F.kl_div(F.log_softmax(logits.float() / temperature, dim=-1),
                        F.softmax(target.float() / temperature, dim=-1), reduction="batchmean")
        return (1.0 - weight) * hard + weight * temperature**2 * soft

    return loss
