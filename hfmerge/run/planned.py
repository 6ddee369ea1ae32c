"""What a merge will do, decided before any tensor is read: the sources, the method's plan, the anchor.

:func:`hfmerge.run.pipeline.plan_merge` makes a :class:`PlannedMerge`; the dry run
prints it, the engine executes its plan, and the card and ``hfmerge.yaml``
describe it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.hub.resolve import ResolvedSource
    from hfmerge.methods.base import MergeMethod
    from hfmerge.methods.stages import Stage
    from hfmerge.recipe import Recipe


@dataclass
class PlannedMerge:
    """Everything decided before a tensor is read: what ``--dry-run`` shows."""

    recipe: Recipe
    method: MergeMethod
    sources: list[ResolvedSource]
    base: ResolvedSource | None
    context: MergeContext
    plan: MergePlan
    anchor_reason: str = ""
    stages: list[Stage] = field(default_factory=list)
    """The method's stages as they will run (:meth:`~hfmerge.methods.stages.Stage.resolve`), in order."""

    @property
    def anchor(self) -> ModelLayout:
        return self.context.anchor

    def pinned_recipe(self, data_pins: dict[int, Any] | None = None) -> Recipe:
        """The recipe with every Hub model pinned to the commit it resolved to, and each dataset to ``data_pins``.

        ``data_pins`` (from the run record) are, per source index, its data as a stage read it: a
        :class:`~hfmerge.data.spec.DataSpec` with the split named and a Hub dataset's commit pinned.

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
        data = self.recipe.data
        if data and data_pins:
            per_source = len(data) == len(self.sources) and len(data) > 1
            pins = [data_pins.get(i if per_source else 0) for i in range(len(data))]
            data = [replace(spec, split=pin.split, commit=pin.commit or spec.commit) if pin is not None else spec
                    for spec, pin in zip(data, pins)]
        if data:  # local data folders as absolute paths too, like local models
            data = [replace(spec, dataset=str(spec.path.resolve())) if spec.is_local and spec.path.exists() else spec
                    for spec in data]
        parameters = dict(self.recipe.parameters)
        for role, layout in self.context.auxiliary.items():  # a gate network is pinned like the sources
            if role in parameters:
                source = layout.source
                parameters[role] = str(source.path) if source.is_local else f"{source.repo_id}@{source.commit_sha}"
        return replace(self.recipe, sources=specs, anchor=anchor, base=base, data=data, parameters=parameters)

    def describe(self) -> str:
        """A human-readable plan: sources, then per group of tensors what happens to them."""
        lines = [f"method: {self.method.name} ({self.method.title})"]
        weights = self.context.normalised_weights()
        for i, (source, layout) in enumerate(zip(self.sources, self.context.sources)):
            anchored = self.method.uses_anchor or self.context.heads == "anchor"
            role = " [anchor]" if i == self.context.anchor_index and anchored else ""
            pin = f" @ {source.commit_sha[:12]}" if source.commit_sha else ""
            lines.append(
                f"source {i + 1}: {source.name}{pin} — {layout.family.name} {layout.architecture}, "
                f"{len(layout.id2label)} labels{f', weight {weights[i]:.4g}' if self.method.uses_weights else ''}{role}"
            )
        if self.method.uses_anchor:
            lines.append(f"anchor: {self.anchor.source.name} — {self.anchor_reason}")
        if self.base is not None:
            pin = f" @ {self.base.commit_sha[:12]}" if self.base.commit_sha else ""
            lines.append(f"base: {self.base.name}{pin}")
        for group, count, params in self.plan.summary():
            lines.append(f"  {group}: {count} tensors, {params:,} parameters")
        lines.extend(f"  {line}" for line in self.method.describe_plan(self.context, self.plan))
        if self.plan.output is not None:
            loads = ("loads with plain transformers" if self.plan.output.loads_with_transformers
                     else "loads with hfmerge.load, or with transformers and trust_remote_code=True")
            lines.append(f"  output model: {self.plan.output.architecture} ({loads})")
        if self.plan.details.get("heads"):
            lines.append(f"  heads: {self.plan.details['heads']}")
        if "num_labels" in self.plan.details:
            lines.append(f"  output labels: {self.plan.details['num_labels']}")
        lines.extend(self._data_stages())
        absent = self.anchor.absent
        if absent:
            lines.append(
                f"  not in the anchor's checkpoint, left absent (transformers initialises them on load): "
                f"{len(absent)} tensors, e.g. {absent[0]}"
            )
        return "\n".join(lines)

    def _data_stages(self) -> list[str]:
        """What the stages will do: for ``--dry-run``, which runs none of them."""
        lines = [line for stage in self.stages for line in stage.describe(self.context)]
        if self.method.data_needs(self.recipe.parameters).optional and not self.context.data:
            lines.append("post-train stage: none (no --data given)")
        if self.recipe.eval_data:
            lines.append("evaluation: " + ", ".join(spec.ref for spec in self.recipe.eval_data))
        return lines
