"""Evaluating a merged model beside its sources and their ensemble: what the card's table compares.

Used by the pipeline (``--eval-data``) and by ``hfmerge evaluate``. Each model
reads every task through its own image processor; a source that lacks some
of a task's labels is not scored on that task (it could not predict them).
A merge that holds one model per task (EMR) is scored with the task given:
the i-th dataset is the i-th task's, read by that task's model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import DataError

if TYPE_CHECKING:
    from hfmerge.data.load import ImageData
    from hfmerge.data.spec import DataSpec
    from hfmerge.eval.report import EvaluationReport, ModelEvaluation
    from hfmerge.eval.zero_shot import TextTower, ZeroShot

logger = logging.getLogger(__name__)

GATE_ROW = "the gate's choice"
"""The name's suffix of the row that evaluates a merge with one model per task given no task id (its gate routes)."""


@dataclass
class Candidate:
    """A model to evaluate, with its processor, its name in the table and its role.

    A merge that holds one model per task (EMR) has ``task_model``: task i's model, which reads the i-th
    dataset; its ``model`` is then the one that serves images with no task id (an EMR merge's gate routes
    them), or ``None`` where it has none.
    """

    name: str
    role: str
    model: torch.nn.Module | None
    processor: Any
    task_model: Callable[[int], torch.nn.Module] | None = None
    num_tasks: int = 0
    zero_shot: ZeroShot | None = None
    """An image encoder scored by zero-shot classification (CLIP): each task's classifier is made from its class
    names (:mod:`hfmerge.eval.zero_shot`); ``model`` is then the encoder."""


def load_candidate(path: Path, name: str, role: str, *, text_tower: Path | None = None,
                   text_tower_name: str | None = None, prompts: Sequence[str] | None = None) -> Candidate:
    """A classifier saved in ``path`` (a folder with config, weights and processor; a gated or EMR merge too),
    in eval mode. An EMR merge's task models are loaded when evaluated, one at a time. An image encoder of a
    family scored zero-shot (CLIP) is scored with its own text tower, else with the one of ``text_tower``,
    which the report names ``text_tower_name`` (default: its folder's name).

    Raises:
        EvaluationError: a zero-shot encoder with no text tower to score it.
        SourceError: the folder has no image processor to read the images with.
    """
    from transformers import AutoImageProcessor

    from hfmerge.data.processor import check_image_processor
    from hfmerge.loading import load_folder
    from hfmerge.methods.emr.model import EmrMergedConfig, is_emr_folder

    check_image_processor(path, name, reason="the evaluation feeds it images through one")
    processor = AutoImageProcessor.from_pretrained(path)
    text = _zero_shot_text(path, name, text_tower)
    if text is not None:
        own = text.folder == path.resolve()
        whose = name if own else text_tower_name or text.folder.name
        from hfmerge.errors import EvaluationError
        from hfmerge.eval.zero_shot import PROMPTS, ZeroShot, encoder_mismatch

        model = load_folder(path, name=name).eval()
        mismatch = encoder_mismatch(model, text)
        if mismatch:
            raise EvaluationError(
                f"{name}'s image encoder is not shaped as the text tower's CLIPModel's ({mismatch}): give --base the "
                "pre-trained CLIPModel it was fine-tuned from"
            )
        return Candidate(name, role, model, processor,
                         zero_shot=ZeroShot(model, text, prompts or PROMPTS, text_name=whose))
    if is_emr_folder(path):
        config = EmrMergedConfig.from_pretrained(path)
        routed = load_folder(path, name=name).eval() if config.has_gate else None

        def task_model(task: int) -> torch.nn.Module:
            return load_folder(path, name=name, task=task).eval()

        return Candidate(name, role, routed, processor, task_model=task_model, num_tasks=config.num_tasks)
    return Candidate(name, role, load_folder(path, name=name).eval(), processor)


_TEXT_TOWERS: dict[Path, TextTower] = {}


def _zero_shot_text(path: Path, name: str, text_tower: Path | None) -> TextTower | None:
    """The text tower that scores the model in ``path`` zero-shot, or ``None`` for a model with its own head."""
    import json

    from hfmerge.adapters import family_for_model_type
    from hfmerge.errors import EvaluationError
    from hfmerge.eval.zero_shot import TextTower

    config = json.loads((path / "config.json").read_text())
    family = family_for_model_type(str(config.get("model_type")))
    if family is None or family.zero_shot is None:
        return None
    architecture = (config.get("architectures") or [family.default_architecture])[0]
    where = path if architecture == family.zero_shot else text_tower
    if where is None:
        raise EvaluationError(
            f"{name} is a {architecture}, an image encoder scored by zero-shot classification with a text tower: "
            f"give --base the pre-trained {family.zero_shot} it was fine-tuned from (e.g. openai/clip-vit-base-patch32)"
        )
    where = where.resolve()
    if where not in _TEXT_TOWERS:
        _TEXT_TOWERS.clear()  # one text tower at a time
        _TEXT_TOWERS[where] = TextTower.load(where)
    return _TEXT_TOWERS[where]


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
    if merged.zero_shot is not None:
        rows = [evaluate_zero_shot(merged, tasks, batch_size=batch_size, progress=progress, metrics=extra)]
    elif merged.task_model is None:
        assert merged.model is not None, f"{merged.name} has neither a model nor a model per task"
        rows = [evaluate_classifier(merged.model, named, merged.processor, batch_size=batch_size, progress=progress,
                                    name=merged.name, role=merged.role, metrics=extra)]
    else:
        rows = [evaluate_task_given(merged.task_model, merged.num_tasks, named, merged.processor,
                                    batch_size=batch_size, progress=progress, name=merged.name, role=merged.role,
                                    metrics=extra)]
        if merged.model is not None:  # the same merge with no task id: the gate picks each image's task
            rows.append(evaluate_classifier(merged.model, named, merged.processor, batch_size=batch_size,
                                            progress=progress, name=f"{merged.name} · {GATE_ROW}", role=merged.role,
                                            metrics=extra))
    for other in others:
        if other.zero_shot is not None:
            rows.append(evaluate_zero_shot(other, tasks, batch_size=batch_size, progress=progress, metrics=extra))
            continue
        covered = [(name, data) for name, data in named if _covers(other.model, data)]
        if len(covered) < len(named):
            missing = ", ".join(name for name, data in named if (name, data) not in covered)
            logger.info("%s is not scored on %s: it lacks some of the labels", other.name, missing)
        rows.append(evaluate_classifier(other.model, covered, other.processor, batch_size=batch_size,
                                        progress=progress, name=other.name, role=other.role, metrics=extra))
    if ensemble and len(others) >= 2 and not any(o.zero_shot is not None for o in others):
        model = Ensemble([o.model for o in others]).eval()
        covered = [(name, data) for name, data in named if _covers(model, data)]
        rows.append(evaluate_classifier(model, covered, others[0].processor, batch_size=batch_size,
                                        progress=progress, name="ensemble of the sources", role="ensemble",
                                        metrics=extra))
    return EvaluationReport(models=rows)


def evaluate_zero_shot(candidate: Candidate, tasks: list[ImageData], **options: Any) -> ModelEvaluation:
    """One row: each task's images classified zero-shot among that task's class names."""
    zero_shot = candidate.zero_shot
    assert zero_shot is not None
    for data in tasks:
        if data.label_names is None:
            raise DataError(f"{data.name} has no label names, which zero-shot classification needs as its classes: "
                            "give a labeled dataset (a ClassLabel column, or one folder per class)")
    row = evaluate_task_given(lambda i: zero_shot.classifier(tasks[i].label_names or []), len(tasks),
                              [(data.name, data) for data in tasks], candidate.processor, name=candidate.name,
                              role=candidate.role, **options)
    for result in row.tasks:
        result.kind = "zero-shot-image-classification"
    row.zero_shot = zero_shot.scoring()
    return row


def evaluate_task_given(model_of: Callable[[int], torch.nn.Module], num_tasks: int,
                        tasks: Sequence[tuple[str, ImageData]], processor: Any, *, name: str, role: str,
                        batch_size: int = 32, progress: bool = True, metrics: Sequence[Any] = (),
                        latency: bool = True) -> ModelEvaluation:
    """One row: the i-th dataset read by ``model_of(i)``, the model told that its input is task i.

    For a merge that holds one model per task (EMR: θ_base + λᵢ Mᵢ ⊙ τ_uni with task i's head) and for
    comparison rows that give each task's images to its own source (the gating paper's baselines, whose
    classifier is chosen by hand). Each task's model is made when its turn comes and let go after it; the
    cost columns are the first task's model's.

    Raises:
        DataError: not one dataset per task.
    """
    from hfmerge.eval.evaluate import evaluate_classifier

    if len(tasks) != num_tasks:
        raise DataError(f"{name} gives each task's images to the model of that task: give one evaluation "
                        f"dataset per task, in task (source) order ({num_tasks} tasks, {len(tasks)} given)")
    rows = [evaluate_classifier(model_of(i), [task], processor, batch_size=batch_size, progress=progress, name=name,
                                role=role, metrics=metrics, measure_cost=i == 0, latency=latency)
            for i, task in enumerate(tasks)]
    first = rows[0]
    first.tasks = [result for row in rows for result in row.tasks]
    return first


def _covers(model: torch.nn.Module, data: ImageData) -> bool:
    from hfmerge.data.load import label_map_for

    try:
        label_map_for(data, {int(k): str(v) for k, v in model.config.id2label.items()})
    except DataError:
        return False
    return True
