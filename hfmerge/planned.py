"""What a merge will do, decided before any tensor is read: the sources, the method's plan, the anchor.

:func:`hfmerge.pipeline.plan_merge` makes a :class:`PlannedMerge`; the dry run
prints it, the engine executes its plan, and the card and ``hfmerge.yaml``
describe it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.hub.resolve import ResolvedSource
    from hfmerge.methods.base import MergeMethod
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
        if "shared_layers" in self.plan.details:
            lines.append(f"  shared layers Np = {self.plan.details['shared_layers']}")
        if self.plan.details.get("heads"):
            lines.append(f"  heads: {self.plan.details['heads']}")
        if "num_labels" in self.plan.details:
            lines.append(f"  output labels: {self.plan.details['num_labels']}")
        absent = self.anchor.absent
        if absent:
            lines.append(
                f"  not in the anchor's checkpoint, left absent (transformers initialises them on load): "
                f"{len(absent)} tensors, e.g. {absent[0]}"
            )
        return "\n".join(lines)
