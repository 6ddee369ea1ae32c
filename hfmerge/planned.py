"""What a merge will do, decided before any tensor is read: the sources, the method's plan, the anchor.

:func:`hfmerge.pipeline.plan_merge` makes a :class:`PlannedMerge`; the dry run
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
    data_pins: dict[int, Any] = field(default_factory=dict)
    """Per source index, its data as a data stage read it: a :class:`~hfmerge.data.spec.DataSpec` with the
    split named and a Hub dataset's commit pinned."""

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
        data = self.recipe.data
        if data and self.data_pins:
            per_source = len(data) == len(self.sources) and len(data) > 1
            pins = [self.data_pins.get(i if per_source else 0) for i in range(len(data))]
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
        if "shared_layers" in self.plan.details:
            lines.append(f"  shared layers Np = {self.plan.details['shared_layers']}")
        if "gated_attention" in self.plan.details:
            d = self.plan.details
            chosen = ("lowest weight similarity, Eq. 4" if d.get("layers_chosen")
                      else "the m of lowest weight similarity, chosen when the weights are read")
            lines.append(f"  gated layers ({chosen}): attention {[i + 1 for i in d['gated_attention']]}, "
                         f"MLP {[i + 1 for i in d['gated_mlp']]}; embeddings and every LayerNorm")
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
        """What the data stages will do: for ``--dry-run``, which reads no data."""
        lines: list[str] = []
        data = self.context.data
        request = self.method.statistics(self.context)
        params = self.recipe.parameters
        if request is not None and data:
            samples = self.method.samples(params)
            wanted = [f"Gram matrices of {len(request.grams)} linear inputs" if request.grams else "",
                      f"diagonal Fisher of {len(request.fisher)} parameters "
                      f"({'true labels' if request.fisher_labels == 'empirical' else 'labels sampled from the model'})"
                      if request.fisher else "",
                      f"activations of {len(request.activations)} modules" if request.activations else ""]
            lines.append(f"statistics stage: {'; '.join(w for w in wanted if w)}, "
                         f"on {samples if samples else 'all'} images of each source's data:")
            for source, spec in zip(self.sources, data):
                lines.append(f"  {source.name} ← {spec.ref}")
        training = self.method.gate_training(self.context)
        if training is not None and data:
            gate = self.context.auxiliary.get(training.gate)
            what = f"the gate network {gate.source.name}" if gate is not None else "the method's network"
            fraction = params.get("gate_fraction")
            share = f"{fraction:.0%} of " if isinstance(fraction, float) else ""
            lines.append(f"training stage: {what}, on {share}each source's data (label = the source)")
        tuning = self.method.fine_tuning(self.context, self.plan)
        if tuning is not None and data:
            lines.append(f"post-train stage: fine-tune for at most {tuning.epochs} epochs (patience {tuning.patience}) "
                         f"on {tuning.samples or 'all'} labeled images of each source's data: "
                         + ", ".join(spec.ref for spec in dict.fromkeys(data)))
        elif self.method.uses_data and not data:
            lines.append("post-train stage: none (no --data given)")
        if self.recipe.eval_data:
            lines.append("evaluation: " + ", ".join(spec.ref for spec in self.recipe.eval_data))
        return lines
