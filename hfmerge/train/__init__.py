"""One training loop for the stages that train after merging: fine-tuning, distillation, a gate network.

:func:`train_model` trains a model in place through Accelerate with early stopping on a held-out split;
:class:`TrainOptions` says how, :class:`TrainReport` says what happened.
"""

from __future__ import annotations

from hfmerge.train.loop import model_loss, top1_accuracy, train_model
from hfmerge.train.options import TrainOptions, TrainReport

__all__ = ["TrainOptions", "TrainReport", "model_loss", "top1_accuracy", "train_model"]
