"""Running a merge's stages: the run's facilities, and the pipeline's own runners of the built-in stages.

A method declares its stages (:mod:`hfmerge.methods.stages`); the pipeline
(:mod:`hfmerge.run.pipeline`) runs them in one loop through :func:`run_stage`.
The data stages run every source's data through that source's own image
processor, under one :class:`accelerate.Accelerator`: on CPU, one GPU, or
several processes under ``accelerate launch``, where statistics are reduced
across processes and only the main process writes files.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import DataError
from hfmerge.io.disk import SpaceNeed, check_free_space, full_disk_is_an_error, owned_temp_folder, remove_orphans
from hfmerge.methods.stages import Compare, Derive, FineTune, Phase, RunRecord, Stage, Statistics

if TYPE_CHECKING:

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.data.load import ImageData
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.eval.report import EvaluationReport
    from hfmerge.io.checkpoint import TensorTable
    from hfmerge.methods.stages import Comparison
    from hfmerge.publish.result import MergeResult
    from hfmerge.recipe import PlannedMerge

logger = logging.getLogger(__name__)


def source_model(layout: ModelLayout, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The source's model in float32, in eval mode, loaded from its resolved folder by its own class."""
    model_class = layout.family.model_class(layout.architecture)
    model = model_class.from_pretrained(layout.source.path, dtype=torch.float32)  # type: ignore[attr-defined]
    return model.to(device).eval()


def source_processor(layout: ModelLayout) -> Any:
    """The source's own image processor, as saved beside its weights.

    Raises:
        SourceError: the source has none (which planning refuses already for the stages it knows of).
    """
    from transformers import AutoImageProcessor

    from hfmerge.data.processor import check_image_processor

    check_image_processor(layout.source.path, layout.source.name, reason="its images go through one",
                          otherwise="merge sources that have one")
    return AutoImageProcessor.from_pretrained(layout.source.path)


def model_cache_key(layout: ModelLayout) -> str:
    """What identifies a source's weights for the statistics cache.

    A Hub source is its commit sha; a folder is a digest of its weight files'
    names, sizes and modification times, so re-saving the folder misses the cache.
    """
    if layout.source.commit_sha:
        return layout.source.commit_sha
    from hfmerge.io.checkpoint import weight_files

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


@dataclass
class PipelineRun:
    """One merge while it runs: what every stage may use (:class:`~hfmerge.methods.stages.StageRun`).

    ``staging`` is the folder the merged model is written to (set by the merge step), ``result`` the
    :class:`~hfmerge.publish.result.MergeResult` once it exists, ``tasks`` the evaluation data once read.
    """

    planned: PlannedMerge
    accelerator: Any
    token: str | bool | None
    progress: bool
    staging_parent: Path | None = None
    record: RunRecord = field(default_factory=RunRecord)
    staging: Path | None = None
    result: MergeResult | None = None
    tasks: list[ImageData] = field(default_factory=list)
    report: EvaluationReport | None = None

    @property
    def context(self) -> MergeContext:
        return self.planned.context

    @property
    def plan(self) -> MergePlan:
        return self.planned.plan

    @property
    def seed(self) -> int:
        return self.planned.recipe.seed or 0

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def tables(self) -> dict[int | str, TensorTable]:
        """Every table a plan may name: the models by index, then the stages' tables by name."""
        return {**dict(enumerate(layout.reader for layout in self.context.models)), **self.record.tables}

    def load(self, ref: tuple[int | str, str]) -> torch.Tensor:
        table, key = ref
        return self.tables()[table].get(key)

    def source_data(self, index: int, *, samples: int | None, labeled: bool) -> ImageData:
        """Source ``index``'s data, as its recipe entry says (columns, seed), ``samples`` of it."""
        from hfmerge.data.load import load_image_data

        recipe = self.planned.recipe
        spec = self.context.data[index]  # type: ignore[index]
        data = load_image_data(
            spec, samples=samples, seed=self.seed, image_column=recipe.data_column,
            label_column=recipe.label_column, token=self.token, labeled=labeled,
        )
        self.record.data_pins[index] = data.pinned  # hfmerge.yaml pins the dataset (commit, split) like the models
        return data

    def source_model(self, layout: ModelLayout, device: torch.device | str = "cpu") -> torch.nn.Module:
        return source_model(layout, device)

    def source_processor(self, layout: ModelLayout) -> Any:
        return source_processor(layout)

    def close_tables(self) -> None:
        for table in self.tables().values():
            table.close()


def run_stage(stage: Stage, run: PipelineRun) -> Any:
    """Run one stage (a built-in one by the pipeline's runner, another by its own ``run``) and record it."""
    started = time.perf_counter()
    runner = RUNNERS.get(type(stage))
    result = runner(stage, run) if runner is not None else stage.run(run)
    seconds = time.perf_counter() - started
    run.record.results[stage.name] = result
    run.record.seconds[stage.name] = seconds
    logger.info("%s stage: %.1f s", stage.name, seconds)
    return result


def run_statistics(stage: Statistics, run: PipelineRun) -> list[TensorTable]:
    """Collect (or read from the cache) the statistics on each source's own data.

    Sources are visited one at a time and each one's model is dropped before the
    next is loaded, so memory holds one model and one source's statistics
    whatever the number of sources. Statistics are cached as safetensors keyed
    by (model commit, data fingerprint, request); a cache hit is logged. With
    ``stage.cache`` off the cache is neither read nor written: each source's
    statistics stay in memory (Gram matrices packed, as in the cache).
    """
    from torch.utils.data import DataLoader

    from hfmerge.data.load import ProcessedImages, label_map_for
    from hfmerge.engine.statistics import (
        StatisticsCache,
        StatisticsTable,
        collect_statistics,
        stored_bytes,
    )
    from hfmerge.io.checkpoint import MemoryTable

    context, accelerator = run.context, run.accelerator
    cache = StatisticsCache()
    if accelerator.is_main_process:
        remove_orphans(cache.folder)  # a temporary file of a run killed while it wrote its statistics
    tables: list[TensorTable] = []
    for i, layout in enumerate(context.sources):
        started = time.perf_counter()
        request = stage.requests[i]
        assert request is not None
        data = run.source_data(i, samples=stage.samples, labeled=stage.labeled)
        path = cache.path(model_cache_key(layout), data.fingerprint, request, seed=run.seed)
        table = cache.load(path) if stage.cache else None
        use = DataUse(layout.source.name, data.name, data.commit_sha, len(data), data.skipped, cached=table is not None)
        if table is None:
            model = source_model(layout, accelerator.device)
            if stage.cache and accelerator.is_main_process:  # before the pass: the cache must hold what it finds
                cache.check_room(stored_bytes(request, model), f"the statistics of {layout.source.short_name}")
            label_map = label_map_for(data, layout.id2label) if stage.labeled else None
            loader = DataLoader(ProcessedImages(data, source_processor(layout), label_map),
                                batch_size=stage.batch_size, shuffle=False)
            statistics = collect_statistics(
                model, loader, request, accelerator=accelerator, seed=run.seed, progress=run.progress,
                desc=f"Statistics {i + 1}/{len(context.sources)} ({layout.source.short_name})", packed=True,
                image_encoder=layout.family.image_encoder.get(layout.architecture, ""),
            )
            del model
            if stage.cache:
                if accelerator.is_main_process:
                    cache.save(path, statistics)
                # the in-memory copy goes now, not when the next source's pass returns: with it, the next pass
                # would run beside this source's Gram matrices (0.5 GiB for ViT-B); the cache file is read back
                del statistics
                accelerator.wait_for_everyone()
                table = cache.load(path)
                if table is None:
                    raise RuntimeError(f"the statistics of {layout.source.name} were not written to {path}")
            else:
                table = StatisticsTable(MemoryTable(statistics, label=f"statistics of {layout.source.name}"))
                del statistics
        logger.info(
            "statistics of %s on %s (%d images): %s in %.1f s", layout.source.name, data.name, len(data),
            f"read from the cache {path}" if use.cached else "computed" if stage.cache else "computed, not cached",
            time.perf_counter() - started,
        )
        run.record.tables[context.statistics_index(i)] = table
        tables.append(table)
        run.record.data_uses.append(use)
    run.record.details["statistics_images"] = [use.samples for use in run.record.data_uses]  # the card's formula
    return tables


def run_derive(stage: Derive, run: PipelineRun) -> Any:
    """The method's derived tensors, as the table ``derive``; their facts and files go to the record."""
    from hfmerge.io.checkpoint import MemoryTable

    derived = stage.derive(run.context, run.load)
    if derived is None:
        return None
    run.record.details.update(derived.details)
    run.record.files.update(derived.files)
    table = MemoryTable(derived.tensors, label=f"what {run.planned.method.name} derived")
    run.record.tables[stage.name] = table
    return table


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


def run_fine_tune(stage: FineTune, run: PipelineRun) -> FineTuned:
    """Train the merged model (in the staging folder) as the stage asks, and save it back there.

    Each source's labeled data goes through its own image processor, its labels
    mapped by name to the source's labels and then to their place in the merged
    model (:class:`~hfmerge.methods.stages.FineTuning`). One dataset given for all
    sources is read once, its labels mapped by name to the merged model's.
    Under ``accelerate launch`` every process trains: the main process says where the merged model is.
    """
    from torch.utils.data import ConcatDataset

    from hfmerge.data.load import ProcessedImages, label_map_for
    from hfmerge.train import TrainOptions, train_model

    request = stage.request
    assert request is not None
    accelerator, planned = run.accelerator, run.planned
    folder = run.staging
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared_folder = [str(folder) if folder is not None else None]
        broadcast_object_list(shared_folder)  # the main process's staging folder: every process trains that model
        folder = Path(shared_folder[0])  # type: ignore[arg-type]
    assert folder is not None
    started = time.perf_counter()
    parts = []
    names = []
    sources = run.context.sources
    shared = len(planned.recipe.data or []) == 1 and len(sources) > 1
    if shared:
        # one dataset for every source: its labels map by name straight into the merged model's labels
        import json

        id2label = json.loads((folder / "config.json").read_text()).get("id2label", {})
        data = run.source_data(0, samples=request.samples, labeled=True)
        for i in range(1, len(sources)):
            run.record.data_pins[i] = data.pinned
        parts.append(ProcessedImages(data, source_processor(planned.anchor), label_map_for(data, id2label)))
        names.append(data.name)
    for i, layout in enumerate([] if shared else sources):
        data = run.source_data(i, samples=request.samples, labeled=True)
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
        patience=request.patience, seed=run.seed,
    )
    loss_fn, teacher = None, None
    if request.teacher is not None and request.distill_weight > 0:
        from hfmerge.train.distill import distillation_loss

        teacher = sources[request.teacher]
        loss_fn = distillation_loss(source_model(teacher, accelerator.device), request.temperature,
                                    request.distill_weight)
    report = train_model(model, dataset, options, accelerator=accelerator, progress=run.progress, loss_fn=loss_fn,
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
    tuned = FineTuned(", ".join(dict.fromkeys(names)), report.train_samples or len(dataset), report.epochs_run,
                      report.best_epoch, report.best_metric, validation, report.seconds, labels,
                      teacher.source.short_name if teacher is not None else None)
    run.record.details["finetuning"] = tuned.card_facts()
    return tuned


def run_compare(stage: Compare, run: PipelineRun) -> list[Any]:
    """Merge each comparison (another parameter set) from the same sources and tables, and evaluate it.

    With ``task_given`` each task's images go through the source of that task (the i-th dataset is the
    i-th source's, the model told the task by the stage's ``told``), as the paper's baselines are evaluated
    with the classifier chosen by hand. The rows join the merge's evaluation report.
    """
    if run.report is None:
        return []
    rows = [_evaluate_comparison(stage, comparison, run) for comparison in stage.comparisons]
    run.report.models.extend(rows)
    return rows


def _evaluate_comparison(stage: Compare, comparison: Comparison, run: PipelineRun) -> Any:
    import dataclasses
    import shutil

    from hfmerge.eval.compare import evaluate_task_given, load_candidate
    from hfmerge.eval.evaluate import evaluate_classifier
    from hfmerge.run.materialise import materialise

    planned = run.planned
    context = dataclasses.replace(planned.context, params={**planned.context.params, **comparison.parameters})
    plan = planned.method.plan(context)
    assert run.staging is not None
    folder = owned_temp_folder(run.staging.parent, ".hfmerge-comparison-")
    try:
        materialise(planned, plan, run.tables(), folder, progress=False)
        candidate = load_candidate(folder, comparison.name, "comparison")
        named = [(data.name, data) for data in run.tasks]
        if not comparison.task_given:
            assert candidate.model is not None, f"the comparison '{comparison.name}' holds no single model"
            return evaluate_classifier(candidate.model, named, candidate.processor, progress=run.progress,
                                       name=comparison.name, role="comparison", latency=False)
        told, model = stage.told, candidate.model
        assert told is not None and model is not None, f"the comparison '{comparison.name}' gives the task: its stage cannot"
        return evaluate_task_given(lambda i: told(model, i), len(context.sources), named, candidate.processor,
                                   progress=run.progress, name=comparison.name, role="comparison", latency=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Materialise(Stage):
    """The pipeline's own step between PREPARE and FINISH: the plan's tensors written to a staging folder."""

    name = "merge"
    phase = Phase.MERGE


@dataclass(frozen=True)
class Evaluate(Stage):
    """The pipeline's own evaluation (``--eval-data``): the merge beside its sources and their ensemble."""

    name = "evaluation"
    phase = Phase.EVALUATE


def run_materialise(stage: Materialise, run: PipelineRun) -> Path:
    """Write the merged model into a new staging folder, which ``run.result`` holds until saved or pushed.

    The record keeps the folder, not the result: the result holds the record, and a cycle would keep the
    staging folder on disk until the garbage collector finds it.
    """
    import shutil

    from hfmerge.publish.result import MergeResult
    from hfmerge.recipe import parse_size
    from hfmerge.run.materialise import materialise

    planned = run.planned
    recipe = planned.recipe
    folder, fix = staging_room(run.staging_parent)
    # checked again here, not only before the stages: a search's candidates, the statistics cache or another
    # program may have taken the room since
    check_free_space([SpaceNeed(folder, merged_bytes(planned), "the merged model")], fix)
    staging = owned_temp_folder(run.staging_parent, STAGING_PREFIX)
    try:
        with full_disk_is_an_error(folder, "the merged model", fix):
            config = materialise(planned, planned.plan, run.tables(), staging, dtype=_dtype(planned),
                                 max_shard_size=parse_size(recipe.max_shard_size), progress=run.progress,
                                 files=run.record.files)
        if not any(isinstance(s, Compare) for s in planned.stages):
            run.close_tables()  # every tensor is written: let go of the memory maps (no comparison will read them)
        logger.info("merged %d tensors", len(planned.plan.tensors))
        run.staging = staging
        run.result = MergeResult(planned=planned, staging=staging, config=config, record=run.record)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


STAGING_PREFIX = ".hfmerge-staging-"
"""The merged model's folder until it is saved: beside the output, so that saving it is a rename of hard links."""


def staging_room(staging_parent: Path | None) -> tuple[Path, str]:
    """Where the staging folder goes (the output's parent, else the temporary folder), and how to make room."""
    if staging_parent is not None:
        return staging_parent, "make room there, or choose an --output on a disk with more room"
    return Path(tempfile.gettempdir()), "make room there, or set TMPDIR to a folder on a disk with more room"


def merged_bytes(planned: PlannedMerge) -> int:
    """The bytes of the merged model's tensors as written (``--dtype`` applied), known from the plan alone."""
    from hfmerge.engine.execute import written_bytes

    return written_bytes(planned.plan, _dtype(planned))


def _dtype(planned: PlannedMerge) -> torch.dtype | None:
    return getattr(torch, planned.recipe.dtype) if planned.recipe.dtype else None


def zero_shot_text_tower(planned: PlannedMerge) -> Path | None:
    """The folder of the text tower that scores a merge of zero-shot image encoders (CLIP): the base's, when the
    base is of the family's text-tower architecture; ``None`` otherwise (the output may hold its own)."""
    base, family = planned.context.base, planned.anchor.family
    if base is not None and family.zero_shot is not None and base.architecture == family.zero_shot:
        return base.source.path
    return None


def run_evaluate(stage: Evaluate, run: PipelineRun) -> EvaluationReport:
    """Evaluate the finished merge (in its staging folder) beside its sources and their ensemble."""
    from hfmerge.eval.compare import Candidate, evaluate_candidates, load_candidate, load_tasks
    from hfmerge.publish.card import PublicNames

    planned = run.planned
    recipe = planned.recipe
    assert run.result is not None and recipe.eval_data
    if not run.tasks:  # a parameter search that held out part of the evaluation data gave the rest
        run.tasks = load_tasks(recipe.eval_data, seed=run.seed, image_column=recipe.data_column,
                               label_column=recipe.label_column, token=run.token)
    name = recipe.push_to_hub or (Path(recipe.output).name if recipe.output else "merged model")
    text = zero_shot_text_tower(planned)
    names = PublicNames.for_merge(planned)
    text_name = names.of(planned.base) if text is not None and planned.base is not None else None
    merged = load_candidate(run.result.staging, name, "merged", text_tower=text, text_tower_name=text_name,
                            prompts=recipe.prompts)
    others = [load_candidate(layout.source.path, names.of(layout.source), "source", text_tower=text,
                             text_tower_name=text_name, prompts=recipe.prompts)
              if layout.family.zero_shot is not None
              else Candidate(names.of(layout.source), "source", source_model(layout), source_processor(layout))
              for layout in planned.context.sources]
    classifier = planned.anchor.task == "image-classification"
    run.report = evaluate_candidates(merged, others, run.tasks, ensemble=classifier, progress=run.progress)
    if merged.task_model is not None:  # the card says how a merge with one model per task was scored
        run.record.details["evaluated_per_task"] = True
    run.result.evaluation = run.report
    return run.report


RUNNERS: dict[type[Stage], Any] = {
    Statistics: run_statistics, Derive: run_derive, Materialise: run_materialise,
    FineTune: run_fine_tune, Evaluate: run_evaluate, Compare: run_compare,
}
"""The pipeline's runners of the built-in stages; a method's own stage type runs itself (``Stage.run``)."""
