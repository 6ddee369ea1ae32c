"""The merge pipeline: recipe → resolve → inspect → plan → execute → MergeResult."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hfmerge.adapters import ModelLayout, inspect_source
from hfmerge.engine.execute import execute_plan, output_dtype
from hfmerge.engine.plan import MergeContext, MergePlan
from hfmerge.errors import IncompatibleModelsError
from hfmerge.hub.resolve import ResolvedSource, resolve_source
from hfmerge.methods import MergeMethod, get_method
from hfmerge.recipe import Recipe, SourceSpec, parse_size
from hfmerge.result import MergeResult, write_metadata

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")


@dataclass
class PlannedMerge:
    """Everything decided before a tensor is read: what ``--dry-run`` shows."""

    recipe: Recipe
    method: MergeMethod
    sources: list[ResolvedSource]
    base: ResolvedSource | None
    context: MergeContext
    plan: MergePlan

    @property
    def anchor(self) -> ModelLayout:
        return self.context.anchor

    def pinned_recipe(self) -> Recipe:
        """The recipe with every Hub model pinned to the commit it resolved to.

        Local folders are written as absolute paths, so ``hfmerge run
        hfmerge.yaml`` reproduces the merge from any folder of this machine,
        the saved output included.
        """
        specs = [replace(s.spec, model=str(s.path) if s.is_local else s.spec.model, commit=s.commit_sha)
                 for s in self.sources]
        anchor = specs[self.context.anchor_index].ref if self.recipe.anchor is not None else None
        base = self.recipe.base
        if self.base is not None:
            base = str(self.base.path) if self.base.is_local else f"{self.base.repo_id}@{self.base.commit_sha}"
        return replace(self.recipe, sources=specs, anchor=anchor, base=base)

    def describe(self) -> str:
        """A human-readable plan: sources, then per group of tensors what happens to them."""
        lines = [f"method: {self.method.name} ({self.method.title})"]
        weights = self.context.normalised_weights()
        for i, (source, layout) in enumerate(zip(self.sources, self.context.sources)):
            role = " [anchor]" if i == self.context.anchor_index and self.method.uses_anchor else ""
            pin = f" @ {source.commit_sha[:12]}" if source.commit_sha else ""
            lines.append(
                f"source {i + 1}: {source.name}{pin} — {layout.family.name} {layout.architecture}, "
                f"{len(layout.id2label)} labels, weight {weights[i]:.4g}{role}"
            )
        if self.base is not None:
            pin = f" @ {self.base.commit_sha[:12]}" if self.base.commit_sha else ""
            lines.append(f"base: {self.base.name}{pin}")
        for group, count, params in self.plan.summary():
            lines.append(f"  {group}: {count} tensors, {params:,} parameters")
        if "shared_layers" in self.plan.details:
            lines.append(f"  shared layers Np = {self.plan.details['shared_layers']}")
        if "num_labels" in self.plan.details:
            lines.append(f"  output labels: {self.plan.details['num_labels']}")
        return "\n".join(lines)


def plan_merge(recipe: Recipe, *, token: str | bool | None = None) -> PlannedMerge:
    """Resolve and inspect the sources and let the method plan; reads no tensor data."""
    method = get_method(recipe.method)
    anchor_index = recipe.anchor_index()
    sources = [resolve_source(s, token=token, allow_pickle=recipe.allow_pickle) for s in recipe.sources]
    layouts = [inspect_source(s, allow_pickle=recipe.allow_pickle) for s in sources]
    base = base_layout = None
    if recipe.base:
        base = resolve_source(SourceSpec.parse(recipe.base), token=token, allow_pickle=recipe.allow_pickle)
        base_layout = inspect_source(base, allow_pickle=recipe.allow_pickle)
    families = {layout.family.name for layout in layouts + ([base_layout] if base_layout else [])}
    if len(families) > 1:
        raise IncompatibleModelsError(
            f"the sources are of different families ({', '.join(sorted(families))}); merge models of one family"
        )
    context = MergeContext(layouts, anchor_index, recipe.weights, base_layout, recipe.parameters)
    def weights_of(layout: ModelLayout) -> set[tuple[str, tuple[int, ...]]]:
        return {(n, t.shape) for n, t in layout.tensors.items() if not t.is_integer}

    anchor_shapes = weights_of(context.anchor)
    for layout in (other for i, other in enumerate(layouts) if i != anchor_index):
        if not anchor_shapes & weights_of(layout):
            raise IncompatibleModelsError(
                f"{layout.source.name} shares no parameter with {context.anchor.source.name}; nothing can be merged"
            )
    plan = method.plan(context)
    return PlannedMerge(recipe, method, sources, base, context, plan)


def run_recipe(
    recipe: Recipe,
    *,
    token: str | bool | None = None,
    staging_parent: str | Path | None = None,
    progress: bool = True,
) -> MergeResult:
    """Plan and execute ``recipe`` into a staging folder; return the :class:`MergeResult`."""
    planned = plan_merge(recipe, token=token)
    staging = Path(tempfile.mkdtemp(prefix=".hfmerge-staging-", dir=staging_parent))
    try:
        dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
        execute_plan(
            planned.plan,
            planned.context.models,
            staging,
            dtype=dtype,
            max_shard_size=parse_size(recipe.max_shard_size),
            progress=progress,
        )
        config = _output_config(planned, dtype)
        config.save_pretrained(staging)
        for name in PROCESSOR_FILES:
            path = planned.anchor.source.path / name
            if path.is_file():
                shutil.copyfile(path, staging / name)
        result = MergeResult(planned=planned, staging=staging, config=config)
        write_metadata(result)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _output_config(planned: PlannedMerge, dtype: torch.dtype | None) -> Any:
    config = type(planned.anchor.config).from_dict(planned.anchor.config.to_dict())
    for key, value in planned.plan.config_updates.items():
        setattr(config, key, value)
    floating = [output_dtype(t.dtype, dtype) for t in planned.plan.tensors if t.dtype.is_floating_point]
    if floating:
        config.dtype = str(max(set(floating), key=floating.count)).removeprefix("torch.")
    return config


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
    token: str | bool | None = None,
    progress: bool = True,
    parameters: dict[str, Any] | None = None,
    **method_parameters: Any,
) -> MergeResult:
    """Merge models named by repo id (``org/name[@revision]``) or folder.

    Method parameters are keyword arguments (``lambda_=0.5`` for ``lambda``,
    a Python keyword) or a ``parameters`` mapping.

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
            base=base, dtype=dtype, allow_pickle=allow_pickle, max_shard_size=max_shard_size,
        )
    return run_recipe(recipe, token=token, progress=progress)
