"""Evaluating a merged model beside its sources and their ensemble: what the card's table compares.

Used by the pipeline (``--eval-data``) and by ``hfmerge evaluate``. Each model
reads every task through its own image processor; a source that lacks some
of a task's labels is not scored on that task (it could not predict them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import DataError

if TYPE_CHECKING:
    from hfmerge.data.load import ImageData
    from hfmerge.data.spec import DataSpec
    from hfmerge.eval.report import EvaluationReport

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A model to evaluate, with its processor, its name in the table and its role."""

    name: str
    role: str
    model: torch.nn.Module
    processor: Any


def load_candidate(path: Path, name: str, role: str) -> Candidate:
    """A classifier saved in ``path`` (a folder with config, weights and processor; a gated merge too), in eval mode."""
    from transformers import AutoImageProcessor

    from hfmerge.loading import load_folder

    model = load_folder(path, name=name)
    return Candidate(name, role, model.eval(), AutoImageProcessor.from_pretrained(path))


def load_tasks(specs: list[DataSpec], *, samples: int | None = None, seed: int = 0, image_column: str | None = None,
               label_column: str | None = None, token: str | bool | None = None) -> list[ImageData]:
    """The labeled evaluation data, one :class:`ImageData` per task."""
    from hfmerge.data.load import load_image_data

    return [load_image_data(spec, samples=samples, seed=seed, image_column=image_column, label_column=label_column,
                            token=token, labeled=True) for spec in specs]


def evaluate_candidates(merged: Candidate, others: list[Candidate], tasks: list[ImageData], *, ensemble: bool,
                        batch_size: int = 32, progress: bool = True, metrics: list[Any] | None = None) -> EvaluationReport:
    """The report of ``merged``, each of ``others`` and (with ``ensemble``) the ensemble of ``others``.

    The merged model must cover every task's labels (a :class:`DataError`
    names the missing ones); another model is scored on the tasks whose labels
    it has. ``metrics`` are extra metrics (:func:`hfmerge.eval.evaluate.load_metric`) computed for every model.
    """
    from hfmerge.eval.ensemble import Ensemble
    from hfmerge.eval.evaluate import evaluate_classifier
    from hfmerge.eval.report import EvaluationReport

    named = [(data.name, data) for data in tasks]
    extra = tuple(metrics or ())
    rows = [evaluate_classifier(merged.model, named, merged.processor, batch_size=batch_size, progress=progress,
                                name=merged.name, role=merged.role, metrics=extra)]
    for other in others:
        covered = [(name, data) for name, data in named if _covers(other.model, data)]
        if len(covered) < len(named):
            missing = ", ".join(name for name, data in named if (name, data) not in covered)
            logger.info("%s is not scored on %s: it lacks some of the labels", other.name, missing)
        rows.append(evaluate_classifier(other.model, covered, other.processor, batch_size=batch_size,
                                        progress=progress, name=other.name, role=other.role, metrics=extra))
    if ensemble and len(others) >= 2:
        model = Ensemble([o.model for o in others]).eval()
        covered = [(name, data) for name, data in named if _covers(model, data)]
        rows.append(evaluate_classifier(model, covered, others[0].processor, batch_size=batch_size,
                                        progress=progress, name="ensemble of the sources", role="ensemble",
                                        metrics=extra))
    return EvaluationReport(models=rows)


def _covers(model: torch.nn.Module, data: ImageData) -> bool:
    from hfmerge.data.load import label_map_for

    try:
        label_map_for(data, {int(k): str(v) for k, v in model.config.id2label.items()})
    except DataError:
        return False
    return True
