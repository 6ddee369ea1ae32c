"""The merge pipeline: recipe → resolve → inspect → plan → execute → MergeResult."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.adapters import ModelLayout, inspect_source
from hfmerge.engine.ops import Copy
from hfmerge.engine.plan import MergeContext, MergePlan, TensorPlan
from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.eval.search import SEARCH_RESULT, SEARCH_SVG
from hfmerge.hub.resolve import ResolvedSource, resolve_source, safetensors_header
from hfmerge.io.checkpoint import HeaderReader, weight_files
from hfmerge.io.disk import SpaceNeed, check_free_space, full_disk_is_an_error, remove_orphans
from hfmerge.methods import MergeMethod, get_method
from hfmerge.methods.stages import Analyse, Compare, Phase, Stage
from hfmerge.publish.hub import check_push_access
from hfmerge.publish.result import MergeResult, check_output_folder, write_metadata
from hfmerge.recipe import PlannedMerge, Recipe, SourceSpec
from hfmerge.run.stages import Evaluate, Materialise, PipelineRun, merged_bytes, run_stage, staging_room
from hfmerge.run.unmerged import carry_unmerged_tensors, check_text_tower, write_as_format

if TYPE_CHECKING:
    from hfmerge.run.search import SearchOutcome

logger = logging.getLogger(__name__)

IGNORED_ON_LOAD = "carried from anchor (ignored by transformers on load)"


def plan_merge(recipe: Recipe, *, token: str | bool | None = None, metadata_only: bool = False,
               scored: bool = False) -> PlannedMerge:
    """Resolve and inspect the sources and let the method plan; reads no tensor data.

    With ``metadata_only`` (``--dry-run``), Hub sources download their configs
    only and are inspected from their safetensors headers, read with range
    requests; such a plan can be shown but not executed. ``scored``: the merge will be scored on images
    although its recipe has no ``eval_data`` (a parameter search's candidate), so the models are checked for
    image processors as an evaluation's are.

    What would only fail once the merge has run is refused here, before any stage: a local data folder that
    does not exist, a model whose images a stage would read with no image processor to read them.
    """
    for option, specs in (("--data", recipe.data), ("--eval-data", recipe.eval_data)):
        for spec in specs or []:
            spec.check_folder(option)
    method = get_method(recipe.method)
    params = recipe.planning_parameters()  # a parameter still to be searched is planned at its default (a dry run)

    def resolve(spec: SourceSpec) -> ResolvedSource:
        return resolve_source(spec, token=token, allow_pickle=recipe.allow_pickle, metadata_only=metadata_only)

    def inspect(source: ResolvedSource) -> ModelLayout:
        reader = None
        if metadata_only:
            source, reader = _header_reader(source, token=token, allow_pickle=recipe.allow_pickle)
        return inspect_source(source, allow_pickle=recipe.allow_pickle, reader=reader)

    layouts = [inspect(s) for s in [resolve(spec) for spec in recipe.sources]]
    method.check_sources(layouts, params)  # before the base and the auxiliary models are resolved
    recipe.require_data()  # a family the method refuses is said before the data it would need
    sources = [layout.source for layout in layouts]
    anchor_index, anchor_reason = _choose_anchor(recipe, method, sources)
    chosen = method.choose_anchor(layouts, params) if recipe.anchor is None else None
    if chosen is not None:
        anchor_index, anchor_reason = chosen
    base = base_layout = None
    if recipe.base:
        base_layout = inspect(resolve(SourceSpec.parse(recipe.base)))
        base = base_layout.source
    families = {layout.family.name for layout in layouts + ([base_layout] if base_layout else [])}
    if len(families) > 1:
        raise IncompatibleModelsError(
            f"the sources are of different families ({', '.join(sorted(families))}); merge models of one family"
        )
    idle = [p.name for p in method.parameters if p.needs_data and params.get(p.name) != p.default]
    if idle and not recipe.data:
        logger.warning("method '%s': %s act only with --data; without it there is no fine-tuning", method.name,
                       ", ".join(idle))
    data = None
    if recipe.data:
        from hfmerge.data.spec import resolve_data_specs

        data = resolve_data_specs(recipe.data, len(layouts))
    auxiliary = {role: inspect(resolve(SourceSpec.parse(ref)))
                 for role, ref in method.auxiliary_models(params).items()}
    context = MergeContext(layouts, anchor_index, recipe.weights, base_layout, params,
                           heads=recipe.heads, seed=recipe.seed, data=data, auxiliary=auxiliary,
                           evaluating=bool(recipe.eval_data))

    def weights_of(layout: ModelLayout) -> set[tuple[str, tuple[int, ...]]]:
        return {(n, t.shape) for n, t in layout.tensors.items() if not t.is_integer}

    anchor_shapes = weights_of(context.anchor)
    for layout in (other for i, other in enumerate(layouts) if i != anchor_index):
        if not anchor_shapes & weights_of(layout):
            raise IncompatibleModelsError(
                f"{layout.source.name} shares no parameter with {context.anchor.source.name}; nothing can be merged"
            )
    check_text_tower(recipe, context)
    declared = method.stages(context)
    if not any(isinstance(layout.reader, HeaderReader) for layout in layouts):  # a dry run over Hub sources cannot
        for stage in (s for s in declared if isinstance(s, Analyse)):
            started = time.perf_counter()
            context.analysis = stage.analyse(context)
            logger.info("analysis stage: %.1f s", time.perf_counter() - started)
    plan = method.plan(context)
    stages = [s for s in (stage.resolve(context) for stage in declared if stage.phase > Phase.ANALYSE) if s]
    given = [c.name for stage in stages if isinstance(stage, Compare) for c in stage.comparisons if c.task_given]
    if given and len(recipe.eval_data) != len(layouts):
        raise RecipeError(
            f"the evaluation's '{given[0]}' row gives each task's images to its own source: give one --eval-data "
            f"per source, in source order ({len(layouts)} sources, {len(recipe.eval_data)} given), or "
            "--param compare=false"
        )
    per_task = plan.output is not None and plan.output.task_argument is not None
    if per_task and recipe.eval_data and len(recipe.eval_data) != len(layouts):
        raise RecipeError(
            f"method '{method.name}' writes one model per task, and each is evaluated on its own task's data: give "
            f"one --eval-data per source, in source order ({len(layouts)} sources, {len(recipe.eval_data)} given)"
        )
    if plan.output is None:  # an output model of the method's own has no use for the anchor's leftovers
        carry_ignored_tensors(plan, context)
        carry_unmerged_tensors(plan, context)
    if recipe.output_format is not None:
        write_as_format(plan, context, recipe.output_format, method.name)
    elif recipe.base and not (method.needs_base or method.accepts_base) and context.anchor.family.zero_shot is None:
        raise RecipeError(f"method '{method.name}' takes no base model; drop --base")
    check_image_processors(context, plan, stages, evaluating=scored or bool(recipe.eval_data))
    return PlannedMerge(recipe, method, sources, base, context, plan, anchor_reason, stages)


def processor_keeper(context: MergeContext, plan: MergePlan) -> ModelLayout:
    """The model whose image processor the merged model keeps (:func:`~hfmerge.run.materialise.write_model_files`
    copies it): the base where the output is written in the base's architecture (``--output-format``), else the
    anchor."""
    base = context.base
    if plan.output is not None and base is not None and plan.output.processor_from == base.source.path:
        return base
    return context.anchor


def check_image_processors(context: MergeContext, plan: MergePlan, stages: list[Stage], *, evaluating: bool) -> None:
    """Refuse a model that a stage would feed images with no image processor; warn when the output will have none.

    Each data stage names the models whose processors it reads (:meth:`~hfmerge.methods.stages.Stage.image_processors`);
    an evaluation reads each source through its own and the merged model through the one it keeps. Without
    these checks the merge runs first and then fails inside transformers, naming the hidden staging folder.
    A merge that feeds no images only warns: it is written, but ``pipeline(...)`` cannot load it as it is.

    Raises:
        SourceError: a model the stages or the evaluation read has no image processor.
    """
    from hfmerge.data.processor import check_image_processor, has_image_processor, missing_processor_message

    keeper = processor_keeper(context, plan)
    needed: dict[Path, tuple[ModelLayout, str]] = {}
    for stage in stages:
        for layout in stage.image_processors(context):
            needed.setdefault(layout.source.path, (layout, f"the {stage.name} stage feeds it --data images through one"))
    if evaluating:
        for layout in context.sources:
            needed.setdefault(layout.source.path, (layout, "the evaluation (--eval-data) feeds it images through one"))
        needed.setdefault(keeper.source.path, (keeper, "the merged model keeps its processor, through which the "
                                                       "evaluation (--eval-data) feeds it images"))
    for layout, reason in needed.values():
        otherwise = "give a --base that has one" if layout is context.base else "merge sources that have one"
        check_image_processor(layout.source.path, layout.source.name, reason=reason, otherwise=otherwise)
    if not has_image_processor(keeper.source.path):
        logger.warning("%s, so the merged model will have none and pipeline(...) cannot load it: save one into the "
                       "output folder with AutoImageProcessor.save_pretrained(folder), or merge sources that have one",
                       missing_processor_message(keeper.source.name))


_TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def trainer_checkpoint_steps(sources: list[ResolvedSource]) -> list[int] | None:
    """The step N of each source when all are Trainer ``checkpoint-N`` folders of one run (one parent)."""
    if not all(s.is_local for s in sources) or len({s.path.parent for s in sources}) != 1:
        return None
    matches = [_TRAINER_CHECKPOINT.fullmatch(s.path.name) for s in sources]
    return [int(m.group(1)) for m in matches] if all(matches) else None  # type: ignore[union-attr]


def _choose_anchor(recipe: Recipe, method: MergeMethod, sources: list[ResolvedSource]) -> tuple[int, str]:
    """The anchor's index and why it is the anchor.

    Checkpoints of one training run are anchored on the last one, as the
    layer-wise paper anchors on the final checkpoint (§3.3).
    """
    if recipe.anchor is not None:
        return recipe.anchor_index(), "named by --anchor"
    steps = trainer_checkpoint_steps(sources) if method.uses_anchor else None
    if steps is not None:
        last = max(range(len(steps)), key=steps.__getitem__)
        return last, (
            f"the latest of {len(steps)} checkpoints of one training run (step {steps[last]}), "
            "as the paper anchors on the final checkpoint; name another with --anchor"
        )
    return 0, "the first source; name another with --anchor"


def _header_reader(
    source: ResolvedSource, *, token: str | bool | None, allow_pickle: bool
) -> tuple[ResolvedSource, HeaderReader | None]:
    """For a source resolved without weights: a reader of its Hub safetensors headers.

    ``None`` (open the files) for a local folder, a Hub source whose weights
    are in the cache already, and pickle weights, which have no header to
    read: those are downloaded, as the user allowed them.
    """
    if source.is_local:
        return source, None
    files, _ = weight_files(source.path)
    if files and all(f.is_file() for f in files):
        return source, None
    header = safetensors_header(source, token=token)
    if header is None:
        return resolve_source(source.spec, token=token, allow_pickle=allow_pickle), None
    return source, HeaderReader(header, label=source.name)


def carry_ignored_tensors(plan: MergePlan, context: MergeContext) -> None:
    """Append the anchor's checkpoint tensors that transformers ignores on load, unchanged.

    Checkpoints saved by transformers 4.x keep buffers that transformers 5
    skips (Swin's ``relative_position_index``). No method merges them; keeping
    the anchor's makes the output load like the anchor, in the transformers
    that wrote it (which reads them) and in the current one (which skips
    them). A source that is not the anchor contributes none: when the anchor
    has none, the output has none either.
    """
    planned = {t.key for t in plan.tensors}
    for info in context.anchor.ignored.values():
        if info.key not in planned:
            op = Copy((context.anchor_index, info.key), group=IGNORED_ON_LOAD)
            plan.tensors.append(TensorPlan(info.key, info.name, info.shape, info.dtype, op))


def run_recipe(
    recipe: Recipe,
    *,
    token: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Plan and execute ``recipe``; save it to ``recipe.output`` and push it to ``recipe.push_to_hub`` if set.

    Both destinations are checked before any source is downloaded: the output
    folder may be replaced (see :func:`~hfmerge.publish.result.check_output_folder`;
    ``overwrite`` as ``--overwrite``), and the token may write to the Hub repo.
    The result is saved first, then pushed in one commit.

    A method that reads data runs the data stages around the merge
    (:mod:`hfmerge.run.stages`): statistics on each source's data before
    it, training after it; a method may then derive tensors from the weights
    and statistics before the merge (OTFusion's transport maps,
    :meth:`~hfmerge.methods.base.MergeMethod.derive`); ``recipe.eval_data`` adds an evaluation whose
    results go into the card. Under ``accelerate launch`` with several
    processes, every process takes part in the statistics and the training,
    and only the main process merges, writes, saves and pushes: the others
    return ``None``.

    The disk is checked too: what a killed run left in the staging folder's place is removed first
    (:func:`~hfmerge.io.disk.remove_orphans`), then a merged model larger than the free space is refused
    before any stage runs, and a disk that fills anyway is one error, with the staging folder removed.

    Raises:
        OutputExistsError: the output folder may not be replaced.
        PublishError: no token, a read-only token, or a namespace the token cannot write to.
        DiskSpaceError: the disk cannot hold the merged model (or its statistics), or filled while writing.
    """
    started = time.perf_counter()
    staging_parent = None
    if recipe.output:
        target = Path(recipe.output).expanduser().resolve()
        check_output_folder(target, overwrite=overwrite)
        staging_parent = target.parent if target.parent.is_dir() else None  # same filesystem: save by hard links
    if recipe.push_to_hub:
        check_push_access(recipe.push_to_hub, token=token)
    staging_folder, fix = staging_room(staging_parent)
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one process tidies
        remove_orphans(staging_folder)
    with full_disk_is_an_error(staging_folder, "the merge", fix):
        return _merge_and_save(recipe, staging_parent, token=token, overwrite=overwrite, progress=progress,
                               started=started)


def _merge_and_save(recipe: Recipe, staging_parent: Path | None, *, token: str | bool | None, overwrite: bool,
                    progress: bool, started: float) -> MergeResult:
    """:func:`run_recipe` once its destinations are checked: search, plan, the stages, then save and push."""
    search = None
    if recipe.search_space:
        from hfmerge.run.search import choose_parameters

        def merge_candidate(candidate: Recipe) -> Path:
            return _merge_candidate(candidate, token=token, staging_parent=staging_parent, progress=progress)

        search = choose_parameters(recipe, merge_candidate, token=token)
        recipe = search.recipe
    planned = plan_merge(recipe, token=token)
    logger.info("planned %s over %d sources in %.1f s", planned.method.name, len(planned.sources),
                time.perf_counter() - started)
    staging_folder, fix = staging_room(staging_parent)
    # each comparison row is materialised beside the merge, one at a time
    copies = 2 if any(isinstance(stage, Compare) for stage in planned.stages) else 1
    check_free_space([SpaceNeed(staging_folder, copies * merged_bytes(planned), "the merged model")], fix)
    started_group = not _distributed_initialised()
    accelerator = _accelerator_for(planned)
    try:
        result = _run_stages(planned, accelerator, staging_parent=staging_parent, token=token, progress=progress,
                             search=search)
    finally:
        if accelerator is not None and started_group and _distributed_initialised():
            _end_process_group(accelerator)
    if result is None:
        return None  # type: ignore[return-value]  # only the main process writes (see the docstring)
    try:
        write_metadata(result)
        if recipe.output:
            result.save(recipe.output, overwrite=overwrite)
        if recipe.push_to_hub:
            result.push_to_hub(recipe.push_to_hub, private=recipe.private, token=token)
    except BaseException:
        shutil.rmtree(result.release_staging(), ignore_errors=True)  # now, not when the result is collected
        raise
    return result


def _merge_candidate(recipe: Recipe, *, token: str | bool | None, staging_parent: Path | None,
                     progress: bool) -> Path:
    """One point of a parameter search: ``recipe`` merged by the whole stage loop into a new folder (the caller's)."""
    planned = plan_merge(recipe, token=token, scored=True)
    result = _run_stages(planned, _accelerator_for(planned), staging_parent=staging_parent, token=token,
                         progress=progress)
    assert result is not None  # the search runs in one process (choose_parameters)
    return result.release_staging()  # the search deletes it once the candidate is scored


def _run_stages(planned: PlannedMerge, accelerator: Any, *, staging_parent: Path | None,
                token: str | bool | None, progress: bool, search: SearchOutcome | None = None) -> MergeResult | None:
    """The loop: every stage of the merge in its phase, the method's and the pipeline's own (merge, evaluation).

    Under ``accelerate launch``, the processes other than the main one run only the stages that every
    process runs (data and training), and return ``None``. A parameter search that ran before the plan
    (``search``) goes into the record, its plot into the output folder; when it held out part of the
    evaluation data, the evaluation reads the rest.
    """
    run = PipelineRun(planned, accelerator, token, progress, staging_parent=staging_parent)
    if planned.context.analysis is not None:  # the analysis ran before the plan, which read it
        run.record.results[Analyse.name] = planned.context.analysis
    if search is not None:
        run.record.results[SEARCH_RESULT] = search.search
        run.record.files[SEARCH_SVG] = search.search.svg()
        run.tasks = list(search.test_tasks or [])
    own: list[Stage] = [Materialise(), *([Evaluate()] if planned.recipe.eval_data else [])]
    # stable: within a phase the pipeline's own step first (the evaluation before its comparison rows), then the
    # method's stages in the order it declared them
    steps = sorted([*own, *planned.stages], key=lambda stage: stage.phase)
    try:
        for stage in steps:
            if run.is_main_process or stage.all_processes:
                run_stage(stage, run)
    except BaseException:
        staging = run.result.release_staging() if run.result is not None else run.staging
        if staging is not None:  # now, not when the result is collected
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        run.close_tables()
    return run.result if run.is_main_process else None


def _accelerator_for(planned: PlannedMerge) -> Any:
    """One :class:`accelerate.Accelerator` for the stages that every process runs, or ``None`` when there is none.

    A method that reads no data never imports accelerate, and merges exactly as before.
    """
    if not any(stage.all_processes for stage in planned.stages):
        return None
    from hfmerge.train import TrainOptions
    from hfmerge.train.loop import new_accelerator

    accelerator = new_accelerator(TrainOptions())  # one per process: its mixed precision is the training's
    if not accelerator.is_main_process:  # the main process tells the user what happens; the others only warn
        logging.getLogger("hfmerge").setLevel(logging.WARNING)
    return accelerator


def _distributed_initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _end_process_group(accelerator: Any) -> None:
    """End the process group this merge started, in every process, once it has no collective left.

    Left to the interpreter's exit, the gloo group's threads can be torn down in the wrong order and abort
    a process ("terminate called without an active exception") after a merge that succeeded. No barrier:
    the main process may still be pushing, and the others have nothing to wait for.
    """
    from accelerate.state import AcceleratorState

    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)  # a later merge in this process starts afresh


def merge(
    sources: list[str | SourceSpec | dict[str, Any]] | Recipe,
    method: str = "average",
    *,
    weights: list[float] | None = None,
    anchor: str | None = None,
    base: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    max_shard_size: str = "5GB",
    output: str | Path | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    heads: str | None = None,
    seed: int | None = None,
    data: list[Any] | None = None,
    eval_data: list[Any] | None = None,
    prompts: list[str] | None = None,
    data_column: str | None = None,
    label_column: str | None = None,
    output_format: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
    parameters: dict[str, Any] | None = None,
    **method_parameters: Any,
) -> MergeResult:
    """Merge models named by repo id (``org/name[@revision]``) or folder.

    Method parameters are keyword arguments (``lambda_=0.5`` for ``lambda``,
    a Python keyword) or a ``parameters`` mapping. ``heads`` is the head policy
    (``concat``, ``average``, ``anchor``; default: the method's choice) and
    ``seed`` seeds methods that draw random numbers (``dare``) or sample data. ``data`` gives a
    data method each source's data (``"org/ds:split"``, a folder; one per source or one for all),
    ``eval_data`` the datasets the result is evaluated on for its card (CLIP towers zero-shot, with ``prompts``
    or CLIP's default templates); ``output_format`` writes the merge as
    another architecture of its family, the base's (``"clip"``: CLIP towers as a ``CLIPModel``). With ``output`` and/or
    ``push_to_hub`` the result is also saved and/or pushed, as in :func:`run_recipe`.

    Example:
        >>> result = hfmerge.merge(["org/a", "org/b@v1"], method="layerwise", anchor="org/a")
        >>> result.save("./merged")
    """
    if isinstance(sources, Recipe):
        recipe = sources
    else:
        params = dict(parameters or {})
        params.update({k.rstrip("_"): v for k, v in method_parameters.items()})
        recipe = Recipe(
            sources=list(sources), method=method, parameters=params, weights=weights, anchor=anchor,
            base=base, dtype=dtype, allow_pickle=allow_pickle, max_shard_size=max_shard_size, heads=heads, seed=seed,
            output=None if output is None else str(output), push_to_hub=push_to_hub, private=private,
            data=data, eval_data=eval_data, prompts=prompts, data_column=data_column, label_column=label_column,
            output_format=output_format,
        )
    return run_recipe(recipe, token=token, overwrite=overwrite, progress=progress)
