"""Parameter fusion: average the feature extractor, concatenate the classifier heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfmerge.errors import IncompatibleModelsError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.methods.stages import FineTune, FineTuning, Stage

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergeContext, MergePlan


@register_method
class Fusion(MergeMethod):
    """Guo & Zhang, Parameter Fusion (§III).

    The feature extractor (every parameter outside the classifier heads) is
    averaged as in ``average``; the classifier heads are concatenated along the
    output dimension — weights stacked, biases concatenated — so the merged
    model outputs Σ_i num_labels_i classes and ``id2label`` is their union. A
    "no object" row (Mask2Former) is kept once, averaged. The paper then
    fine-tunes on the combined data (§III): given ``--data`` (labeled, one
    dataset per source), the post-train stage does, with each source's labels
    mapped to their place in the union; without data the fused model is the result.
    Heads are the ``concat`` head policy (:mod:`hfmerge.methods.heads`) by definition;
    ``--heads average`` or ``anchor`` is refused (that is ``average``).
    Labels that occur in several sources are prefixed with the source's short
    name, its repo id (a folder's parent/name) where short names repeat, or
    its position (:func:`~hfmerge.methods.heads.source_prefixes`), so ``label2id``
    inverts ``id2label``.
    """

    name = "fusion"
    title = "Parameter fusion (feature-extractor averaging, classifier concatenation)"
    reference = "Guo & Zhang, Parameter Fusion: Efficient Multi-Domain Classification Through Feature Extractor Averaging and Classifier Concatenation"
    reference_url = ""  # no stable URL is known: cards and `hfmerge methods` give the title alone
    uses_weights = True
    parameters = (
        ParamSpec("finetune_epochs", int, 3, "epochs of fine-tuning on the sources' combined data (with --data)",
                  minimum=0, needs_data=True),
        ParamSpec("learning_rate", float, 5e-5, "fine-tuning learning rate (AdamW)", minimum=0.0, needs_data=True),
        ParamSpec("batch_size", int, 32, "fine-tuning batch size", minimum=1, needs_data=True),
        ParamSpec("patience", int, 2, "epochs without a better held-out accuracy before fine-tuning stops",
                  minimum=1, needs_data=True),
        ParamSpec("samples", int, 0, "training images per source (0: all of each --data split)", minimum=0,
                  needs_data=True),
    )
    card_template = """\
The feature extractor (every parameter outside the classifier head) is the weighted average θ = Σᵢ wᵢ θᵢ \
of the {{ sources | length }} models, with the weights in the sources table. The classifier heads are \
concatenated along the output dimension (weights stacked, biases concatenated), so the model predicts over \
the union of the sources' labels: {{ details.num_labels }} labels, in source order. A label that occurs in \
more than one source is renamed `<source>/<label>`.
{%- if architecture == "Mask2FormerForUniversalSegmentation" %} Mask2Former's "no object" class is kept \
once: its row of the class predictor is the weighted average of the sources' "no object" rows.{% endif %}

{% set finetuning = details.get("finetuning") %}{% if finetuning %}As the paper does (§III), the fused model was then fine-tuned on the sources' combined \
labeled data ({{ finetuning.data }}; {{ finetuning.samples }} training images, {{ finetuning.labels }}), with AdamW at learning rate {{ parameters.learning_rate }}, batch size {{ parameters.batch_size }}, \
for {{ finetuning.epochs_run }} of at most {{ parameters.finetune_epochs }} epochs; {{ finetuning.validation }} \
The weights are those of epoch {{ finetuning.best_epoch }}, the best on the held-out images.
{%- else %}The paper then fine-tunes the fused model on the combined data (§III). That step was not applied \
here (it needs each source's labeled data: `--data`, once per source{% if parameters.finetune_epochs == 0 %}, \
and `finetune_epochs` above 0{% endif %}): this is the fused model before fine-tuning.{% endif %}"""

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import LinearCombination
        from hfmerge.engine.plan import MergePlan
        from hfmerge.methods.heads import plan_heads

        anchor = ctx.anchor
        if ctx.heads not in (None, "concat"):
            raise IncompatibleModelsError(
                f"fusion concatenates the heads by definition, so --heads {ctx.heads} does not apply; "
                f"drop --heads, or use --method average --heads {ctx.heads}"
            )
        architectures = {s.architecture for s in ctx.sources}
        if len(architectures) > 1:
            raise IncompatibleModelsError(
                f"fusion needs one architecture, got {', '.join(sorted(architectures))}; use layerwise to merge a shared backbone"
            )
        if not anchor.head_tensors:
            raise IncompatibleModelsError(
                f"{anchor.source.name} ({anchor.architecture}) has no classifier head to concatenate; fusion needs task models"
            )
        backbone_diff = [
            n for n in ctx.differing() if (anchor.tensors.get(n) is None or anchor.tensors[n].head is None)
        ]
        if backbone_diff:
            raise IncompatibleModelsError(
                f"fusion averages the feature extractor, but the sources' backbones differ ({len(backbone_diff)} "
                f"tensors, e.g. {backbone_diff[0]}); fuse models of one architecture and size"
            )
        head_plan = plan_heads(ctx, [info.name for info in anchor.head_tensors], "concat")
        by_name = {entry.name: entry for entry in head_plan.entries}
        weights = ctx.normalised_weights()
        entries = [
            by_name.get(name) or ctx.plan_entry(info, LinearCombination(ctx.refs(name), weights))
            for name, info in anchor.tensors.items()
        ]
        return MergePlan(entries, config_updates=head_plan.config_updates,
                         details={"weights": list(weights), **head_plan.details})

    def stages(self, ctx: MergeContext) -> list[Stage]:
        return [FineTune(self._fine_tuning)]

    def _fine_tuning(self, ctx: MergeContext) -> FineTuning | None:
        """Fine-tune on every source's data, its label j landing at j + (labels of the sources before it)."""
        if int(ctx.params["finetune_epochs"]) == 0:
            return None
        maps = []
        offset = 0
        for layout in ctx.sources:
            maps.append({j: offset + j for j in range(len(layout.id2label))})
            offset += len(layout.id2label)
        return FineTuning(
            label_maps=tuple(maps), epochs=int(ctx.params["finetune_epochs"]),
            learning_rate=float(ctx.params["learning_rate"]), batch_size=int(ctx.params["batch_size"]),
            patience=int(ctx.params["patience"]), samples=int(ctx.params["samples"]) or None,
        )
