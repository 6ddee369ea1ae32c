"""The data stages of the pipeline: statistics before the merge, training after it.

A method declares what it needs (:meth:`~hfmerge.methods.base.MergeMethod.statistics`,
:meth:`~hfmerge.methods.base.MergeMethod.fine_tuning`); the pipeline calls
these stages only then, so a method that needs no data merges exactly as
before. Both stages run every source's data through that source's own image
processor, under one :class:`accelerate.Accelerator`: on CPU, one GPU, or
several processes under ``accelerate launch``, where statistics are reduced
across processes and only the main process writes files.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import DataError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.checkpoint import TensorTable
    from hfmerge.data.load import ImageData
    from hfmerge.data.spec import DataSpec
    from hfmerge.eval.report import EvaluationReport
    from hfmerge.methods.base import GateTraining
    from hfmerge.planned import PlannedMerge
    from hfmerge.result import MergeResult

logger = logging.getLogger(__name__)


def source_model(layout: ModelLayout, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The source's model in float32, in eval mode, loaded from its resolved folder by its own class."""
    model_class = layout.family.model_class(layout.architecture)
    model = model_class.from_pretrained(layout.source.path, dtype=torch.float32)  # type: ignore[attr-defined]
    return model.to(device).eval()


def source_processor(layout: ModelLayout) -> Any:
    """The source's own image processor, as saved beside its weights."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(layout.source.path)


def model_cache_key(layout: ModelLayout) -> str:
    """What identifies a source's weights for the statistics cache.

    A Hub source is its commit sha; a folder is a digest of its weight files'
    names, sizes and modification times, so re-saving the folder misses the cache.
    """
    if layout.source.commit_sha:
        return layout.source.commit_sha
    from hfmerge.checkpoint import weight_files

    files, _ = weight_files(layout.source.path)
    digest = hashlib.sha256(str(layout.source.path).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return "folder-" + digest.hexdigest()[:40]


@dataclass
class DataUse:
    """One source's data as a stage read it: for the card, the log and ``hfmerge.yaml``."""

    source: str
    data: str
    commit_sha: str | None
    samples: int
    skipped: int
    cached: bool = False


def load_source_data(planned: PlannedMerge, index: int, *, samples: int | None, labeled: bool,
                     token: str | bool | None) -> ImageData:
    """Source ``index``'s data, as its recipe entry says (columns, seed), ``samples`` of it."""
    from hfmerge.data.load import load_image_data

    recipe = planned.recipe
    spec = planned.context.data[index]  # type: ignore[index]
    data = load_image_data(
        spec, samples=samples, seed=recipe.seed or 0, image_column=recipe.data_column,
        label_column=recipe.label_column, token=token, labeled=labeled,
    )
    planned.data_pins[index] = data.pinned  # hfmerge.yaml pins the dataset (commit, split) like the models
    return data


def run_statistics(
    planned: PlannedMerge, *, accelerator: Accelerator, token: str | bool | None = None, progress: bool = True,
) -> tuple[list[TensorTable], list[DataUse]]:
    """Collect (or read from the cache) the method's statistics on each source's own data.

    Sources are visited one at a time and each one's model is dropped before the
    next is loaded, so memory holds one model and one source's statistics
    whatever the number of sources. Statistics are cached as safetensors keyed
    by (model commit, data fingerprint, request); a cache hit is logged.
    """
    from torch.utils.data import DataLoader

    from hfmerge.data.load import ProcessedImages, label_map_for
    from hfmerge.engine.statistics import StatisticsCache, collect_statistics

    method, context = planned.method, planned.context
    params = planned.recipe.parameters
    labeled = method.labeled(params)
    cache = StatisticsCache()
    tables: list[TensorTable] = []
    uses: list[DataUse] = []
    for i, layout in enumerate(context.sources):
        started = time.perf_counter()
        request = method.source_statistics(context, i)
        assert request is not None
        data = load_source_data(planned, i, samples=method.samples(params), labeled=labeled, token=token)
        path = cache.path(model_cache_key(layout), data.fingerprint, request, seed=planned.recipe.seed or 0)
        table = cache.load(path)
        use = DataUse(layout.source.name, data.name, data.commit_sha, len(data), data.skipped, cached=table is not None)
        if table is None:
            model = source_model(layout, accelerator.device)
            label_map = label_map_for(data, layout.id2label) if labeled else None
            loader = DataLoader(ProcessedImages(data, source_processor(layout), label_map),
                                batch_size=int(params.get("batch_size") or 32), shuffle=False)
            statistics = collect_statistics(
                model, loader, request, accelerator=accelerator, seed=planned.recipe.seed or 0, progress=progress,
                desc=f"Statistics {i + 1}/{len(context.sources)} ({layout.source.short_name})",
            )
            del model
            if accelerator.is_main_process:
                cache.save(path, statistics)
            # the in-memory copy goes now, not when the next source's pass returns: with it, the next pass
            # would run beside this source's Gram matrices (1 GiB for ViT-B); the cache file is read back mapped
            del statistics
            accelerator.wait_for_everyone()
            table = cache.load(path)
            if table is None:
                raise RuntimeError(f"the statistics of {layout.source.name} were not written to {path}")
        logger.info(
            "statistics of %s on %s (%d images): %s in %.1f s", layout.source.name, data.name, len(data),
            f"read from the cache {path}" if use.cached else "computed", time.perf_counter() - started,
        )
        tables.append(table)
        uses.append(use)
    planned.plan.details["statistics_images"] = [use.samples for use in uses]  # what the card's formula counts
    return tables, uses


@dataclass
class FineTuned:
    """What the post-train stage did, for the card."""

    data: str
    samples: int
    epochs_run: int
    best_epoch: int
    best_metric: float | None
    validation: str
    seconds: float
    labels: str = "each source's labels mapped to their place in the union"
    teacher: str | None = None

    def card_facts(self) -> dict[str, Any]:
        return {"data": self.data, "samples": self.samples, "epochs_run": self.epochs_run,
                "best_epoch": self.best_epoch, "validation": self.validation, "labels": self.labels,
                "teacher": self.teacher}


def fine_tune(
    planned: PlannedMerge, folder: Path, *, accelerator: Accelerator, token: str | bool | None = None,
    progress: bool = True,
) -> FineTuned | None:
    """Train the merged model saved in ``folder`` as the method asks, and save it back there.

    Each source's labeled data goes through its own image processor, its labels
    mapped by name to the source's labels and then to their place in the merged
    model (:class:`~hfmerge.methods.base.FineTuning`). One dataset given for all
    sources is read once, its labels mapped by name to the merged model's.
    ``None`` when the method asks for no training.
    """
    from torch.utils.data import ConcatDataset

    from hfmerge.data.load import ProcessedImages, label_map_for
    from hfmerge.train import TrainOptions, train_model

    request = planned.method.fine_tuning(planned.context, planned.plan)
    if request is None:
        return None
    started = time.perf_counter()
    parts = []
    names = []
    shared = len(planned.recipe.data or []) == 1 and len(planned.context.sources) > 1
    if shared:
        # one dataset for every source: its labels map by name straight into the merged model's labels
        import json

        id2label = json.loads((folder / "config.json").read_text()).get("id2label", {})
        data = load_source_data(planned, 0, samples=request.samples, labeled=True, token=token)
        for i in range(1, len(planned.context.sources)):
            planned.data_pins[i] = data.pinned
        parts.append(ProcessedImages(data, source_processor(planned.anchor), label_map_for(data, id2label)))
        names.append(data.name)
    for i, layout in enumerate([] if shared else planned.context.sources):
        data = load_source_data(planned, i, samples=request.samples, labeled=True, token=token)
        try:
            to_source = label_map_for(data, layout.id2label)
        except DataError as exc:
            raise DataError(f"fine-tuning, source {i + 1} ({layout.source.short_name}): {exc}") from None
        mapping = {k: request.label_maps[i][v] for k, v in to_source.items()}
        parts.append(ProcessedImages(data, source_processor(layout), mapping))
        names.append(data.name)
    dataset = ConcatDataset(parts)
    model_class = planned.anchor.family.model_class(planned.anchor.architecture)
    model = model_class.from_pretrained(folder, dtype=torch.float32)  # type: ignore[attr-defined]
    options = TrainOptions(
        epochs=request.epochs, learning_rate=request.learning_rate, batch_size=request.batch_size,
        patience=request.patience, seed=planned.recipe.seed or 0,
    )
    loss_fn, teacher = None, None
    if request.teacher is not None and request.distill_weight > 0:
        from hfmerge.train.distill import distillation_loss

        teacher = planned.context.sources[request.teacher]
        loss_fn = distillation_loss(source_model(teacher, accelerator.device), request.temperature,
                                    request.distill_weight)
    report = train_model(model, dataset, options, accelerator=accelerator, progress=progress, loss_fn=loss_fn,
                         desc="Fine-tuning the merged model")
    accelerator.free_memory()  # the accelerator holds what it prepared (optimizer state included)
    if accelerator.is_main_process:
        dtype = planned.plan.tensors[0].dtype if planned.plan.tensors else torch.float32
        model.to(dtype if dtype.is_floating_point else torch.float32)
        model.save_pretrained(folder)
    accelerator.wait_for_everyone()
    held_out = (f"{report.val_samples} images ({options.validation_fraction:.0%}) held out of the training data"
                if report.val_samples else "none")
    validation = (f"early stopping watched the accuracy on {held_out} (patience {options.patience})"
                  f"{', and stopped early' if report.stopped_early else ''}.")
    logger.info("fine-tuned the merged model on %d images for %d epochs in %.1f s (best held-out %s %.4f)",
                len(dataset), report.epochs_run, time.perf_counter() - started, report.metric_name,
                report.best_metric or float("nan"))
    labels = ("one dataset for every source, its labels mapped by name to the merged model's" if shared
              else "each source's labels mapped to their place in the union")
    return FineTuned(", ".join(dict.fromkeys(names)), report.train_samples or len(dataset), report.epochs_run,
                     report.best_epoch, report.best_metric, validation, report.seconds, labels,
                     teacher.source.short_name if teacher is not None else None)


def evaluate_merge(result: MergeResult, specs: list[DataSpec], *, token: str | bool | None = None,
                   progress: bool = True, statistics: list[TensorTable] | None = None) -> EvaluationReport:
    """Evaluate a finished merge (in its staging folder) beside its sources and their ensemble.

    With ``statistics`` (the merge's statistics and trained tables, still open), the method's
    :meth:`~hfmerge.methods.base.MergeMethod.comparisons` are merged from the same inputs and
    evaluated too, one at a time (role ``comparison``).
    """
    from hfmerge.card import PublicNames
    from hfmerge.eval.compare import Candidate, evaluate_candidates, load_candidate, load_tasks

    planned = result.planned
    recipe = planned.recipe
    tasks = load_tasks(specs, seed=recipe.seed or 0, image_column=recipe.data_column,
                       label_column=recipe.label_column, token=token)
    name = recipe.push_to_hub or (Path(recipe.output).name if recipe.output else "merged model")
    merged = load_candidate(result.staging, name, "merged")
    names = PublicNames.for_merge(planned)
    others = [Candidate(names.of(layout.source), "source", source_model(layout), source_processor(layout))
              for layout in planned.context.sources]
    classifier = planned.anchor.task == "image-classification"
    report = evaluate_candidates(merged, others, tasks, ensemble=classifier, progress=progress)
    if statistics is not None:
        for comparison in planned.method.comparisons(planned.context):
            report.models.append(_evaluate_comparison(planned, comparison, tasks, statistics, result.staging.parent,
                                                      progress=progress))
    return report


def _evaluate_comparison(planned: PlannedMerge, comparison: Any, tasks: list[ImageData],
                         statistics: list[TensorTable], parent: Path, *, progress: bool) -> Any:
    """Merge ``comparison`` (another parameter set) from the same sources and tables, and evaluate it.

    With ``task_given`` each task's images go through the source of that task (the i-th dataset is the
    i-th source's), as the paper's baselines are evaluated with the classifier chosen by hand.
    """
    import dataclasses
    import shutil
    import tempfile

    from hfmerge.engine.execute import execute_plan
    from hfmerge.eval.compare import load_candidate
    from hfmerge.eval.evaluate import evaluate_classifier
    from hfmerge.result import output_config, write_model_files

    context = dataclasses.replace(planned.context, params={**planned.context.params, **comparison.parameters})
    plan = planned.method.plan(context)
    folder = Path(tempfile.mkdtemp(prefix=".hfmerge-comparison-", dir=parent))
    try:
        execute_plan(plan, context.models, folder, progress=False, statistics=statistics)
        write_model_files(planned, plan, output_config(planned, None, plan), folder)
        candidate = load_candidate(folder, comparison.name, "comparison")
        named = [(data.name, data) for data in tasks]
        if not comparison.task_given:
            return evaluate_classifier(candidate.model, named, candidate.processor, progress=progress,
                                       name=comparison.name, role="comparison", latency=False)
        if len(named) != len(context.sources):
            raise DataError(f"the comparison '{comparison.name}' gives each task's images to its source: give one "
                            f"--eval-data per source, in source order ({len(context.sources)} sources)")
        rows = [evaluate_classifier(TaskGiven(candidate.model, i), [task], candidate.processor, progress=progress,
                                    name=comparison.name, role="comparison", measure_cost=i == 0, latency=False)
                for i, task in enumerate(named)]
        first = rows[0]
        first.tasks = [result for row in rows for result in row.tasks]
        return first
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class TaskGiven(torch.nn.Module):
    """A gated merge told the task: its gate is bypassed, p = the one-hot vector of source ``task``.

    The paper's baselines (AvgMean, RegMean, task arithmetic) select the classifier of the input's task by
    hand (vit-gating-merge §4.2); this is how they are evaluated beside the gate's own choice.
    """

    def __init__(self, model: torch.nn.Module, task: int) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.config = model.config

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        probs = torch.zeros(pixel_values.shape[0], self.config.num_sources, device=pixel_values.device)
        probs[:, self.task] = 1.0
        return self.model(pixel_values=pixel_values, gate_probs=probs, **kwargs)


class _SourceIndexed(torch.utils.data.Dataset):
    """A source's images labelled with the source's index: the gate's task (vit-gating-merge §3.2)."""

    def __init__(self, images: torch.utils.data.Dataset, index: int) -> None:
        self.images = images
        self.index = index

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.images[i]["pixel_values"], "labels": self.index}


@dataclass
class GateTraining:
    """What the gate's training did, for the card."""

    name: str
    train_images: list[int]
    held_out: list[int]
    per_source: list[tuple[str, float]]
    accuracy: float
    epochs_run: int
    seconds: float

    def card_facts(self) -> dict[str, Any]:
        return {"name": self.name, "trained": True, "train_images": self.train_images, "held_out": self.held_out,
                "per_source": self.per_source, "accuracy": self.accuracy, "epochs_run": self.epochs_run}


def train_gate(planned: PlannedMerge, request: GateTraining, *, accelerator: Accelerator,
               token: str | bool | None = None, progress: bool = True) -> TensorTable:
    """Fine-tune the gating merge's gate network and return its weights as a table the merge copies from.

    The gate (a MobileNetV2 image classifier, ``gate``) gets a new head of N
    outputs and learns which source's data an image comes from, label = the
    source's index, from at most ``gate_fraction`` of each source's data
    (vit-gating-merge §3.2, §4.1: "no more than 15% of the test dataset
    randomly selected from each task"); the rest is held out and measures the
    gate's accuracy for the card. Images go through the merged model's own
    (the anchor's) image processor and then the gate's in-model resizing and
    normalisation, exactly as the merged model feeds its gate at inference.
    """
    import math
    import shutil
    import tempfile
    import weakref

    from torch.utils.data import ConcatDataset, DataLoader, Subset

    from hfmerge.checkpoint import CheckpointReader
    from hfmerge.data.load import ProcessedImages
    from hfmerge.modeling.gate import GateInput
    from hfmerge.train import TrainOptions, train_model

    started = time.perf_counter()
    context = planned.context
    gate_layout = context.auxiliary[request.gate]
    config = planned.plan.output.config  # type: ignore[union-attr]
    processor = source_processor(planned.anchor)
    seed = planned.recipe.seed or 0
    fraction = request.fraction
    train_parts, held_parts, names = [], [], []
    for i, layout in enumerate(context.sources):
        data = load_source_data(planned, i, samples=None, labeled=False, token=token)
        images = _SourceIndexed(ProcessedImages(data, processor), i)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + i)).tolist()
        cut = math.floor(fraction * len(order))  # "no more than 15%" (§4.1): never rounded up
        if cut < 2 or cut >= len(order):
            raise DataError(
                f"{data.name} has {len(order)} images, and gate_fraction={fraction:g} of them is {cut}: the gate "
                "trains on at least 2 of each source's images and is measured on the rest; give more data or "
                "another gate_fraction"
            )
        train_parts.append(Subset(images, order[:cut]))
        held_parts.append(Subset(images, order[cut:]))
        names.append(config.gate_labels[i])
    torch.manual_seed(seed)
    gate = source_model(gate_layout)
    gate.classifier = torch.nn.Linear(gate.classifier.in_features, len(context.sources))
    gate.num_labels = len(context.sources)
    gate.config.num_labels = len(context.sources)
    gate.config.id2label = dict(enumerate(names))
    gate.config.label2id = {name: i for i, name in enumerate(names)}
    model = GateInput(gate, config)
    options = TrainOptions(epochs=request.epochs, learning_rate=request.learning_rate,
                           batch_size=request.batch_size, seed=seed)
    report = train_model(model, ConcatDataset(train_parts), options, accelerator=accelerator, progress=progress,
                         desc="Training the gate")
    accelerator.free_memory()
    model.eval()
    per_source = []
    with torch.inference_mode():
        for name, part in zip(names, held_parts):
            right = 0
            for batch in DataLoader(part, batch_size=options.batch_size):
                right += int((model(batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
            per_source.append((name, right / max(1, len(part))))
    held = [len(p) for p in held_parts]
    facts = GateTraining(
        gate_layout.source.name, [len(p) for p in train_parts], held, per_source,
        sum(acc * n for (_, acc), n in zip(per_source, held)) / max(1, sum(held)), report.epochs_run,
        time.perf_counter() - started,
    )
    planned.plan.details["gate"] = facts.card_facts()
    logger.info("trained the gate on %d images in %.1f s: it picks the right source for %.2f%% of %d held-out images",
                sum(facts.train_images), facts.seconds, 100 * facts.accuracy, sum(held))
    if not accelerator.is_main_process:
        return None  # type: ignore[return-value]  # only the main process merges
    folder = tempfile.mkdtemp(prefix="hfmerge-gate-")
    gate.save_pretrained(folder)
    table = CheckpointReader(folder, label="the trained gate")
    weakref.finalize(table, shutil.rmtree, folder, True)
    return table
