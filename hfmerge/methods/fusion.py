"""Parameter fusion: average the feature extractor, concatenate the classifier heads."""

from __future__ import annotations

from collections import Counter

from hfmerge.adapters.layout import ModelLayout
from hfmerge.engine.plan import MergeContext, MergePlan
from hfmerge.errors import IncompatibleModelsError
from hfmerge.methods.base import MergeMethod, register_method
from hfmerge.ops import ConcatHeads, LinearCombination


def union_labels(sources: list[ModelLayout]) -> list[str]:
    """The labels of all sources in source order.

    A label that appears in more than one source becomes
    ``<source short name>/<label>`` in each of them, so no two outputs share a
    name and each says which model it came from.
    """
    counts = Counter(label for s in sources for label in s.id2label.values())
    labels = []
    for source in sources:
        for i in range(len(source.id2label)):
            label = source.id2label[i]
            labels.append(f"{source.source.short_name}/{label}" if counts[label] > 1 else label)
    return labels


@register_method
class Fusion(MergeMethod):
    """Guo & Zhang, Parameter Fusion (§III).

    The feature extractor (every parameter outside the classifier heads) is
    averaged as in ``average``; the classifier heads are concatenated along the
    output dimension — weights stacked, biases concatenated — so the merged
    model outputs Σ_i num_labels_i classes and ``id2label`` is their union. A
    "no object" row (Mask2Former) is kept once, averaged. The paper then
    fine-tunes on the combined data; that step needs data and comes later.
    """

    name = "fusion"
    title = "Parameter fusion (feature-extractor averaging, classifier concatenation)"
    reference = "Guo & Zhang, Parameter Fusion: Efficient Multi-Domain Classification Through Feature Extractor Averaging and Classifier Concatenation"
    reference_url = ""  # no stable URL is known: cards and `hfmerge methods` give the title alone
    uses_weights = True
    card_template = """\
The feature extractor (every parameter outside the classifier head) is the weighted average θ = Σᵢ wᵢ θᵢ \
of the {{ sources | length }} models, with the weights in the sources table. The classifier heads are \
concatenated along the output dimension (weights stacked, biases concatenated), so the model predicts over \
the union of the sources' labels: {{ details.num_labels }} labels, in source order. A label that occurs in \
more than one source is renamed `<source>/<label>`.
{%- if architecture == "Mask2FormerForUniversalSegmentation" %} Mask2Former's "no object" class is kept \
once: its row of the class predictor is the weighted average of the sources' "no object" rows.{% endif %}

The paper then fine-tunes the fused model on the combined data (§III). hfmerge does not apply that step \
(it has no fine-tuning option yet): this is the fused model before fine-tuning."""

    def plan(self, ctx: MergeContext) -> MergePlan:
        anchor = ctx.anchor
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
        weights = ctx.normalised_weights()
        label_rows = []
        for source in ctx.sources:
            if not source.id2label:
                raise IncompatibleModelsError(f"{source.source.name} has no id2label in its config; fusion needs label names")
            label_rows.append(len(source.id2label))
        entries = []
        for name, info in anchor.tensors.items():
            if info.head is None:
                entries.append(ctx.plan_entry(info, LinearCombination(ctx.refs(name), weights)))
                continue
            for source, rows in zip(ctx.sources, label_rows):
                shape = source.tensors[name].shape
                if shape[0] != rows + info.head.null_rows or shape[1:] != info.shape[1:]:
                    raise IncompatibleModelsError(
                        f"{source.source.name}: head tensor {info.key} has shape {list(shape)}, which does not match "
                        f"its {rows} labels or the other sources' heads; fusion cannot concatenate it"
                    )
            out_shape = (sum(label_rows) + info.head.null_rows, *info.shape[1:])
            op = ConcatHeads(ctx.refs(name), tuple(label_rows), info.head.null_rows, weights)
            entries.append(ctx.plan_entry(info, op, shape=out_shape))
        labels = union_labels(ctx.sources)
        id2label = {i: label for i, label in enumerate(labels)}
        return MergePlan(
            entries,
            config_updates={"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}},
            details={"weights": list(weights), "num_labels": len(labels),
                     "labels_per_source": {s.source.name: n for s, n in zip(ctx.sources, label_rows)}},
        )
