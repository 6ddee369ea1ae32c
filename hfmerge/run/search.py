"""Parameters given as ``auto``, chosen on validation data: the one place the search happens.

A method only declares which of its parameters may be searched and on which
grid (:attr:`~hfmerge.methods.base.ParamSpec.search`). Here the pipeline merges
the sources once per grid point (the cross product when several are
``auto``), each merge a whole run of the method's stages written to a
temporary folder and deleted once scored, so memory holds one candidate at a
time; scores each on the validation data by its mean accuracy over the tasks
(the evaluation's classifier metrics); and gives back the recipe with the best values, which
the real merge then runs as any other, and which ``hfmerge.yaml`` records.

Validation data is what a user of the papers expects: each ``--eval-data``
dataset's own validation split where it has one (``validation``, ``valid``,
``val``, other than the split evaluated), else a seeded
:data:`~hfmerge.eval.search.HELD_OUT_FRACTION` of its images held out, which the
card's evaluation then leaves out: the card never reports as test scores the
images a value was chosen on.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hfmerge.errors import DataError, RecipeError
from hfmerge.eval.search import HELD_OUT_FRACTION, VALIDATION_SPLITS, ParameterSearch, SearchPoint, grid_points

if TYPE_CHECKING:
    from pathlib import Path

    from hfmerge.data.load import ImageData
    from hfmerge.recipe import Recipe

logger = logging.getLogger(__name__)

MergeCandidate = Callable[["Recipe"], "Path"]
"""Merges a recipe (no ``auto`` left, no evaluation) into a new folder and returns it; the search deletes it."""


@dataclass
class Validation:
    """The data the search scores on, and the evaluation's test data when part of it was held out.

    ``tasks``: one validation set per ``--eval-data`` dataset. ``test``: the evaluation data with the
    held-out images taken out (``None``: nothing was held out, the evaluation reads its data as usual).
    """

    tasks: list[ImageData]
    test: list[ImageData] | None
    held_out: list[int]


@dataclass
class SearchOutcome:
    """The search's record (for the card and ``hfmerge.yaml``), the recipe with the chosen values, the test data."""

    search: ParameterSearch
    recipe: Recipe
    test_tasks: list[ImageData] | None


def validation_data(recipe: Recipe, *, token: str | bool | None = None) -> Validation:
    """Per ``--eval-data`` dataset, its validation split, or a held-out part of it (see the module docstring)."""
    from hfmerge.data.load import load_image_data
    from hfmerge.data.reading import pick_split, split_names

    def read(spec: Any) -> ImageData:
        return load_image_data(spec, seed=seed, image_column=recipe.data_column, label_column=recipe.label_column,
                               token=token, labeled=True)

    seed = recipe.seed or 0
    tasks, tests, held_out = [], [], []
    for spec in recipe.eval_data or []:
        splits = split_names(spec, token=token)
        evaluated = pick_split(splits, spec, spec.ref)
        own = next((name for name in VALIDATION_SPLITS if name in splits and name != evaluated), None)
        if own is not None:
            tasks.append(read(replace(spec, split=own)))
            tests.append(None)
            held_out.append(0)
            continue
        data = read(spec)
        if len(data) < 2:
            raise DataError(f"{data.name} has {len(data)} image and no validation split: the search holds out part "
                            "of it to choose on; give a dataset with a validation split or more images")
        count = max(1, round(HELD_OUT_FRACTION * len(data)))
        chosen = set(random.Random(seed).sample(range(len(data)), count))
        tasks.append(data.subset(sorted(chosen)))
        tests.append(data.subset(i for i in range(len(data)) if i not in chosen))
        held_out.append(count)
        logger.info("%s has no validation split: %d of its %d images are held out to choose the parameters on, "
                    "and left out of its test scores", data.name, count, len(data))
    test = None
    if any(held_out):
        test = [part if part is not None else read(spec) for part, spec in zip(tests, recipe.eval_data or [])]
    return Validation(tasks, test, held_out)


def choose_parameters(recipe: Recipe, merge_candidate: MergeCandidate, *,
                      token: str | bool | None = None) -> SearchOutcome:
    """Merge and score every grid point of ``recipe``'s ``auto`` parameters; the recipe with the best values.

    Raises:
        RecipeError: the search is asked for under several processes (``accelerate launch``).
    """
    from hfmerge.eval.compare import evaluate_zero_shot, load_candidate
    from hfmerge.eval.evaluate import evaluate_classifier

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("auto parameters are searched in one process: run the search without accelerate launch, "
                          "then the merge its hfmerge.yaml records")
    space = recipe.search_space
    validation = validation_data(recipe, token=token)
    text = _text_tower(recipe, token=token)
    named = [(data.name, data) for data in validation.tasks]
    points: list[SearchPoint] = []
    metric = "accuracy"
    grid = grid_points(space)
    for number, values in enumerate(grid, start=1):
        started = time.perf_counter()
        candidate = replace(recipe, parameters={**recipe.parameters, **values}, eval_data=None, prompts=None, output=None,
                            push_to_hub=None)
        folder = merge_candidate(candidate)
        try:
            loaded = load_candidate(folder, "candidate", "candidate", text_tower=text, prompts=recipe.prompts)
            if loaded.zero_shot is not None:
                row = evaluate_zero_shot(loaded, validation.tasks, progress=False, latency=False)
            else:
                row = evaluate_classifier(loaded.model, named, loaded.processor, progress=False, name="candidate",
                                          role="candidate", measure_cost=False, latency=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        metric = row.tasks[0].main_metric if row.tasks else metric
        point = SearchPoint(dict(values), {task.task: task.metrics.get(task.main_metric, 0.0) for task in row.tasks})
        points.append(point)
        logger.info("search %d/%d: %s → mean validation %s %.4f (%.1f s)", number, len(grid),
                    ", ".join(f"{k}={v}" for k, v in values.items()), metric, point.mean,
                    time.perf_counter() - started)
    search = ParameterSearch(space, points, metric, [data.name for data in validation.tasks], validation.held_out)
    chosen = search.chosen
    logger.info("chosen on validation data: %s", ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return SearchOutcome(search, replace(recipe, parameters={**recipe.parameters, **chosen}), validation.test)


def _text_tower(recipe: Recipe, *, token: str | bool | None) -> Path | None:
    """The base's folder, which holds the text tower that scores CLIP towers zero-shot (unused otherwise)."""
    if not recipe.base:
        return None
    from hfmerge.hub.resolve import resolve_source
    from hfmerge.source import SourceSpec

    return resolve_source(SourceSpec.parse(recipe.base), token=token).path
