"""Run a model over labeled tasks and report its metrics and its cost.

Classifiers: each task's images go through the model's image processor, and
the dataset's labels are mapped to the model's label indices by name (the
data part's ``label_map_for``, which names any label the model lacks).
Semantic segmenters (SegFormer, UperNet, MobileNetV2-DeepLab): images and
their segmentation maps go through the processor together, and the logits
are resized to the maps before the argmax. Predictions are gathered across
processes under ``accelerate launch``, so every process returns the same
numbers.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import DataError, EvaluationError
from hfmerge.eval.cost import count_flops, count_parameters, measure_latency
from hfmerge.eval.metrics import IGNORE_INDEX, SegmentationMeter, classification_metrics
from hfmerge.eval.report import ModelEvaluation, TaskResult

if TYPE_CHECKING:
    import accelerate

    from hfmerge.data import ImageData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedMetric:
    """An extra metric: ``compute(predictions=[...], references=[...]) -> dict`` of numbers."""

    name: str
    compute: Callable[..., dict[str, Any]]

    def __call__(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        answer = self.compute(predictions=predictions, references=references) or {}
        return {key: float(value) for key, value in answer.items() if isinstance(value, (int, float))}


def load_metric(name_or_path: str) -> LoadedMetric:
    """A metric by Hugging Face ``evaluate`` name (``"accuracy"``) or local file (``./my_metric.py``).

    A ``.py`` file that defines a module-level ``compute(predictions, references)`` is used as it is; any
    other file or folder is an ``evaluate`` module and, like a name, goes through ``evaluate.load``. The
    ``evaluate`` package is imported only here, only then (its metric scripts come from the Hub).

    Raises:
        EvaluationError: the file does not exist, or ``evaluate`` is needed and not installed or fails.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".py" and not path.is_file():
        raise EvaluationError(f"metric file {name_or_path!r} does not exist; give a .py file or an evaluate name")
    if path.is_file() and path.suffix == ".py":
        module_name = f"hfmerge_metric_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise EvaluationError(f"metric file {name_or_path!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise EvaluationError(f"metric file {name_or_path!r} failed to import: {exc}") from exc
        if callable(getattr(module, "compute", None)):
            return LoadedMetric(path.stem, module.compute)
    return LoadedMetric(path.stem if path.exists() else name_or_path, _evaluate_module(name_or_path).compute)


def _evaluate_module(name_or_path: str) -> Any:
    try:
        import evaluate
    except ImportError:
        raise EvaluationError(
            f"metric {name_or_path!r} needs the evaluate package: pip install 'hfmerge[eval]' "
            "(or give a .py file defining compute(predictions, references))"
        ) from None
    try:
        return evaluate.load(name_or_path)
    except Exception as exc:  # evaluate raises many kinds: missing script, no network, bad module
        raise EvaluationError(f"evaluate could not load metric {name_or_path!r}: {exc}") from exc


def _default_device(accelerator: accelerate.Accelerator | None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ready(model: torch.nn.Module, name: str | None, accelerator: Any) -> tuple[dict[int, str], str, torch.device]:
    """The model's labels, its name in the report, and the device it now sits on in eval mode."""
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
    device = _default_device(accelerator)
    model.eval().to(device)
    return id2label, name, device


def evaluate_classifier(
    model: torch.nn.Module, tasks: Sequence[tuple[str, ImageData]], processor: Any, *, batch_size: int = 32,
    accelerator: accelerate.Accelerator | None = None, progress: bool = True, name: str | None = None,
    role: str = "merged", metrics: Sequence[LoadedMetric] = (), measure_cost: bool = True,
    warmup: int = 3, repeats: int = 10, latency: bool = True,
) -> ModelEvaluation:
    """Accuracy and weighted precision/recall/F1 of ``model`` on each task, plus its parameters, FLOPs, latency.

    Args:
        model: an image classifier with ``config.id2label`` whose output has ``logits`` (an :class:`Ensemble` too).
        tasks: (task name, labeled data) pairs.
        processor: the image processor every task's images go through.
        batch_size: images per forward pass; latency is measured on one batch of this size (of the first task;
            fewer when it has fewer images) and recorded with it.
        accelerator: shards the batches over processes and gathers the predictions; default: one device
            (CUDA when there is one).
        name, role: how the report names the model (default: its ``config.name_or_path``), and its role.
        metrics: extra metrics (:func:`load_metric`), computed on the predicted and true label indices.
        measure_cost: count FLOPs (per image) and measure latency; parameters are always counted.
        latency: with ``measure_cost``, measure latency too (comparison rows count FLOPs only).

    Raises:
        EvaluationError: a task's data has no labels.
        hfmerge.errors.DataError: a task's labels are not all in ``model.config.id2label`` (it names them).
    """
    from hfmerge.data import ProcessedImages

    id2label, name, device = _ready(model, name, accelerator)
    results: list[TaskResult] = []
    first_batch: torch.Tensor | None = None
    for task, data in tasks:
        if data.labels is None:
            raise EvaluationError(f"task {task!r} ({data.name}) has no labels to evaluate against; "
                                  "give a labeled split or --label-column")
        label_map, to_class, num_classes = _label_space(model, data, id2label)
        dataset = ProcessedImages(data, processor, label_map)
        predictions, references = [], []
        for pixel_values, labels, outputs in _batches(model, dataset, batch_size, accelerator, device,
                                                      progress, f"Evaluating {name} on {task}"):
            first_batch = pixel_values if first_batch is None else first_batch
            predicted = outputs.logits.argmax(dim=-1)
            if to_class is not None:
                predicted = to_class.to(predicted.device)[predicted]
            if accelerator is not None:
                predicted, labels = accelerator.gather_for_metrics((predicted, labels))
            predictions.append(predicted.cpu())
            references.append(labels.cpu())
        predicted, labels = torch.cat(predictions), torch.cat(references)
        scores = classification_metrics(predicted, labels, num_classes=num_classes)
        for metric in metrics:
            for key, value in metric(predicted.tolist(), labels.tolist()).items():
                scores[key if key not in scores else f"{metric.name}:{key}"] = value
        dataset_name = data.name.split(":")[0] if data.spec.is_local else data.spec.dataset
        results.append(TaskResult(task=task, dataset=dataset_name, split=data.split, metrics=scores,
                                  samples=len(labels), kind="image-classification", revision=data.commit_sha))
        logger.info("%s on %s: accuracy %.4f over %d samples", name, task, scores["accuracy"], len(labels))
    return _with_cost(model, name, role, results, first_batch, batch_size, device,
                      measure_cost=measure_cost, warmup=warmup, repeats=repeats, latency=latency)


def _label_space(model: torch.nn.Module, data: ImageData,
                 id2label: dict[int, str]) -> tuple[dict[int, int], torch.Tensor | None, int]:
    """How a task's labels meet the model's outputs: (dataset label -> class, output -> class or None, classes).

    Labels match by name. A gated merge's union label space names a label that
    several sources share ``<task>/<label>`` (``config.gate_labels``,
    ``config.source_labels``): its data's plain ``"3"`` then matches every
    task's ``3``, so an output counts by its source's own label name.
    """
    from hfmerge.data import label_map_for

    try:
        return label_map_for(data, id2label), None, len(id2label)
    except DataError:
        own = _source_label_names(model, id2label)
        if own is None:
            raise
    classes = list(dict.fromkeys(own[i] for i in range(len(id2label))))
    index = {name: i for i, name in enumerate(classes)}
    to_class = torch.tensor([index[own[i]] for i in range(len(id2label))])
    return label_map_for(data, dict(enumerate(classes))), to_class, len(classes)


def _source_label_names(model: torch.nn.Module, id2label: dict[int, str]) -> dict[int, str] | None:
    """Each output's label as its source names it (``<task>/`` taken off), or ``None`` for a model of one task."""
    config = getattr(model, "config", None)
    tasks, ranges = getattr(config, "gate_labels", None), getattr(config, "source_labels", None)
    if not tasks or not ranges:
        return None
    own = dict(id2label)
    for task, outputs in zip(tasks, ranges):
        for i in outputs:
            own[i] = own[i].removeprefix(f"{task}/")
    return own


class SegmentationSamples(torch.utils.data.Dataset):
    """Images and their segmentation maps through a segmentation processor: items ``pixel_values``, ``labels``.

    ``maps`` hold the model's class index per pixel (``ignore_index`` for void), as images or arrays; the
    processor resizes each map with its image (nearest neighbour) and, when it is set to, reduces labels.
    ``dataset``, ``split`` and ``revision`` say where the samples come from (a Hub id or a folder's name).
    """

    def __init__(self, images: Sequence[Any], maps: Sequence[Any], processor: Any, *, dataset: str,
                 split: str, revision: str | None = None) -> None:
        if len(images) != len(maps):
            raise EvaluationError(f"{dataset}: {len(images)} images but {len(maps)} segmentation maps")
        self.images, self.maps, self.processor = list(images), list(maps), processor
        self.dataset, self.split, self.revision = dataset, split, revision

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoded = self.processor(images=self.images[index], segmentation_maps=self.maps[index], return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"][0], "labels": encoded["labels"][0].long()}


def evaluate_segmenter(
    model: torch.nn.Module, tasks: Sequence[tuple[str, SegmentationSamples]], *, batch_size: int = 8,
    accelerator: accelerate.Accelerator | None = None, progress: bool = True, name: str | None = None,
    role: str = "merged", ignore_index: int = IGNORE_INDEX, per_class: bool = False, measure_cost: bool = True,
    warmup: int = 3, repeats: int = 10,
) -> ModelEvaluation:
    """Mean IoU and pixel accuracy of a semantic segmentation model on each task, plus its cost.

    The model returns ``logits`` ``[B, C, h, w]`` (SegFormer at a quarter of the input size, UperNet at it);
    they are resized to the maps' size (bilinear) before the argmax, and pixels labelled ``ignore_index`` do
    not count. Mask2Former's query outputs need its processor's post-processing and are not handled here.
    ``per_class`` adds ``iou/<label>`` for every class present. Arguments as :func:`evaluate_classifier`.
    """
    id2label, name, device = _ready(model, name, accelerator)
    results: list[TaskResult] = []
    first_batch: torch.Tensor | None = None
    for task, samples in tasks:
        meter = SegmentationMeter(len(id2label), ignore_index=ignore_index, class_names=id2label)
        count = 0
        for pixel_values, labels, outputs in _batches(model, samples, batch_size, accelerator, device,
                                                      progress, f"Evaluating {name} on {task}"):
            first_batch = pixel_values if first_batch is None else first_batch
            logits = torch.nn.functional.interpolate(outputs.logits.float(), size=labels.shape[-2:],
                                                     mode="bilinear", align_corners=False)
            predicted = logits.argmax(dim=1)
            if accelerator is not None:
                predicted, labels = accelerator.gather_for_metrics((predicted, labels))
            meter.update(predicted, labels)
            count += labels.shape[0]
        scores = meter.compute(per_class=per_class)
        results.append(TaskResult(task=task, dataset=samples.dataset, split=samples.split, metrics=scores,
                                  samples=count, kind="image-segmentation", revision=samples.revision))
        logger.info("%s on %s: mean IoU %.4f over %d samples", name, task, scores["mean_iou"], count)
    return _with_cost(model, name, role, results, first_batch, batch_size, device,
                      measure_cost=measure_cost, warmup=warmup, repeats=repeats)


def _batches(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
             accelerator: accelerate.Accelerator | None, device: torch.device, progress: bool,
             desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """(pixel values, labels, model outputs) per batch, in inference mode, sharded over processes."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    main_process = accelerator is None or accelerator.is_local_main_process
    for batch in tqdm(loader, desc=desc, disable=not (progress and main_process), leave=False):
        pixel_values = batch["pixel_values"].to(device)
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values)
        yield pixel_values, batch["labels"].to(device), outputs


def _with_cost(model: torch.nn.Module, name: str, role: str, results: list[TaskResult],
               first_batch: torch.Tensor | None, batch_size: int, device: torch.device, *, measure_cost: bool,
               warmup: int, repeats: int, latency: bool = True) -> ModelEvaluation:
    """The evaluation with the model's parameters, FLOPs per image and latency on the first task's first batch."""
    flops = latency_ms = spread = None
    measured_batch = batch_size
    if measure_cost and first_batch is not None:
        measured_batch = first_batch.shape[0]
        flops = count_flops(model, first_batch[:1])
        if latency:
            timed = measure_latency(model, first_batch, warmup=warmup, repeats=repeats)
            latency_ms, spread = 1000 * timed.median, timed.spread
    return ModelEvaluation(name=name, role=role, tasks=results, parameters=count_parameters(model), flops=flops,
                           latency_ms=latency_ms, batch_size=measured_batch, device=_device_name(device),
                           latency_spread=spread)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
