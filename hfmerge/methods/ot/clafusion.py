"""CLAFusion: fuse networks of one family but different depth (cross-layer alignment, layer balancing, OTFusion).

Nguyen et al., "On Cross-Layer Alignment for Model Fusion of Heterogeneous
Neural Networks" (``clafusion.txt`` §3). OTFusion fuses layer by layer, so
both networks need the same layers. CLAFusion first aligns the hidden layers
of the shallower network B to the deeper network A (Definition 1, Algorithm 1:
a strictly increasing map a with a(1) = 1 and a(n) = m minimising Σᵢ C[a(i), i],
C = 1 − linear CKA of the layers' pre-activations, Eq. 2–3), segment by
segment (VGG: between max-poolings; ResNet: the blocks of a stage). Then it
balances the depths (§3.2): *adding* to B, where A has a layer no layer of B
matches, a layer that passes its input through (identity weights and a ReLU,
Dirac kernels, a ResNet block whose residual branch is zero), so B computes
what it did with A's depth; or, for MLPs, *merging* A's unmatched layers into
the next ones, W' = W_{l+1} D W_l. The balanced pair is fused with OTFusion
(:mod:`hfmerge.methods.ot.otfusion`), and the result has the target's (the
deeper network's, or with ``merge`` the shallower's) architecture and config.
More than two networks (§3.3): each is aligned and balanced against the
target, then all are fused. The fused model may be fine-tuned, optionally
with knowledge distillation from the deeper source (§4.2).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.methods.ot.otfusion import (
    FINE_TUNING_PARAMETERS,
    TRANSPORT_PARAMETERS,
    Side,
    fused_coefficients,
    map_key,
    membership,
    transport_maps,
)
from hfmerge.methods.stages import DataNeed, Derive, Derived, FineTune, FineTuning, Stage, Statistics

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.depth import DepthSegment
    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.adapters.neurons import NeuronGroup
    from hfmerge.engine.ops import Loader
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.engine.statistics import StatisticsRequest

logger = logging.getLogger(__name__)

ALIGNMENT_SVG = "layer_alignment.svg"
COST_SVG = "layer_costs.svg"


DATA_PURPOSE = "to compare the models' layers and neurons by their pre-activations on the same images"
DATA_WHEN = ("needed by the default representation=activations and cost=activations, by balance=merge and to "
             "fine-tune; representation=neurons with cost=weights runs without")


def balanced_key(source: int, name: str) -> str:
    """The derived table's key of source ``source``'s balanced tensor ``name`` (the target's in-memory name)."""
    return f"balanced/{source}/{name}"


@register_method
class CLAFusion(MergeMethod):
    """CLAFusion (Nguyen et al.): cross-layer alignment, layer balancing, then OTFusion."""

    name = "clafusion"
    title = "CLAFusion (networks of different depth: cross-layer alignment, layer balancing, then OTFusion)"
    reference = ("Nguyen et al., On Cross-Layer Alignment for Model Fusion of Heterogeneous Neural Networks, "
                 "arXiv:2110.15538")
    reference_url = "https://arxiv.org/abs/2110.15538"
    uses_weights = True
    parameters = (
        ParamSpec("balance", str, "add", "add: identity layers into the shallower model (function-preserving); "
                  "merge: fold the deeper model's unmatched layers into the next ones (MLPs only)",
                  choices=("add", "merge")),
        ParamSpec("representation", str, "activations", "layer representation for the cross-layer alignment: "
                  "activations (pre-activations on the same images, cost 1 - linear CKA) or neurons (widths, "
                  "cost the squared difference)", choices=("activations", "neurons")),
        ParamSpec("relu_estimate", str, "sign_of_sum", "balance=merge: how the dropped layer's ReLU becomes the "
                  "diagonal D", choices=("sign_of_sum", "majority_vote", "average_of_sign")),
        ParamSpec("cost", str, "activations", "OTFusion's ground cost between neurons: activations or weights",
                  choices=("activations", "weights")),
        *TRANSPORT_PARAMETERS,
        *FINE_TUNING_PARAMETERS,
        ParamSpec("distill_temperature", float, 4.0, "fine-tuning with distillation from the deepest source: the "
                  "softmax temperature T", minimum=1e-6, needs_data=True),
        ParamSpec("distill_weight", float, 0.0, "γ, the distillation term's weight in the fine-tuning loss "
                  "(0: plain fine-tuning)", minimum=0.0, maximum=1.0, needs_data=True),
    )
    card_template = """\
{% if not details.get("depths_differ", True) %}The sources have the same depth, so nothing was added or merged: \
the alignment below is layer by layer, and this is OTFusion. {% endif %}\
The hidden layers of the sources were first aligned across depths (CLAFusion, \
Nguyen et al., §3.1): segment by segment ({{ details.segment_kind }}), each hidden layer of the shallower model \
was matched to one layer of the deeper model by the strictly increasing map a with a(1) = 1 and a(n) = m that \
minimises Σᵢ C[a(i), i] (Definition 1, solved by the dynamic programming of Algorithm 1), where C is \
{% if parameters.representation == 'activations' %}1 − linear CKA (Eq. 2–3) between the layers' \
pre-activations on the same {{ details.get("activation_samples", parameters.samples) }} images of the data\
{% else %}the squared difference of the layers' widths (the paper's toy representation){% endif %}. \
{% if parameters.balance == 'add' %}Then the shallower model was balanced by adding layers (§3.2): wherever \
the deeper model has a layer that no layer matches, an added layer passes its input through unchanged \
({{ details.identity }}), so the shallower model computes exactly what it did, now with the deeper model's \
depth.{% else %}Then the deeper model was balanced by merging layers (§3.2): each layer that no layer matches \
is folded into the next, W' = W_{l+1} D W_l (and b' = W_{l+1} D b_l + b_{l+1}), where the diagonal D stands \
for the folded layer's ReLU, estimated from its pre-activations ({{ parameters.relu_estimate | \
replace('_', ' ') }}).{% endif %} The balanced models were fused with OTFusion (Singh & Jaggi 2020): per neuron \
group, a transport plan between each source's neurons and the target's ({{ details.target }}), with the \
Euclidean distance between their {% if parameters.cost == 'activations' %}pre-activations{% else %}incoming \
weights{% endif %} as ground cost, moves every tensor onto the target's neurons, and the aligned tensors are \
averaged with the weights in the sources table. The result has the target's \
architecture and config{% if details.get("widths_differ") %} (the widths differ, and the target's are kept){% endif %}.

The pictures show the alignment of {{ details.pictured }} with the target (layers numbered from 0 in the \
pictures, from 1 in the table).

![Cross-layer alignment: the deeper model's layers above, the shallower model's below, matched pairs joined]\
({{ details.alignment_svg }})
{% if details.get("cost_svg") %}
![The cost matrix of each segment, the chosen pairs outlined]({{ details.cost_svg }})
{% endif %}
| source | segment | layers (deeper / shallower) | map a (1-based) |
|---|---|---|---|
{% for entry in details.alignment -%}
{% for segment in entry.segments -%}
| {{ entry.source }} | {{ segment.name }} | {{ segment.deeper }} / {{ segment.shallower }} | \
{{ segment.mapping | map('string') | join(', ') }} |
{% endfor %}{% endfor %}
{% set finetuning = details.get("finetuning") %}{% if finetuning %}
The fused model was then fine-tuned on {{ finetuning.data }} ({{ finetuning.samples }} training images) with \
AdamW at learning rate {{ parameters.learning_rate }}, batch size {{ parameters.batch_size }}, for \
{{ finetuning.epochs_run }} of at most {{ parameters.finetune_epochs }} epochs\
{% if finetuning.teacher %}, distilling from {{ finetuning.teacher }} (Hinton's loss, temperature \
{{ parameters.distill_temperature }}, weight γ = {{ parameters.distill_weight }}){% endif %}; \
{{ finetuning.validation }} The weights are those of epoch {{ finetuning.best_epoch }}, the best on the \
held-out images.{% endif %}"""

    # ----- what the stages ask for -----

    def choose_anchor(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> tuple[int, str] | None:
        """The target: the deepest source for ``balance=add`` (§3.3), the shallowest for ``merge``."""
        depths = [_depth(layout) for layout in layouts]
        if any(d is None for d in depths):
            return None  # refused with a clear message by plan()
        if parameters.get("balance", "add") == "merge":
            index = min(range(len(layouts)), key=lambda i: (depths[i], i))
            return index, f"the shallowest source ({depths[index]} hidden layers): balance=merge folds the others' layers"
        index = max(range(len(layouts)), key=lambda i: (depths[i], -i))
        return index, f"the deepest source ({depths[index]} hidden layers), as the paper's §3.3"

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """Each source's pre-activations on the data, the alignment and balancing, fine-tuning."""
        need = DataNeed(required=False, purpose=DATA_PURPOSE, when=DATA_WHEN)
        return [
            Statistics(self._activations, samples=int(ctx.params["samples"]),
                       batch_size=int(ctx.params.get("batch_size") or 32),
                       labeled=int(ctx.params.get("finetune_epochs") or 0) > 0, need=need),
            Derive(self._derive),
            FineTune(self._fine_tuning),
        ]

    def _activations(self, ctx: MergeContext, index: int) -> StatisticsRequest | None:
        """Source ``index``'s pre-activations: at its layers' representations and its neuron groups' modules."""
        if not _needs_activations(ctx.params):
            return None
        from hfmerge.adapters.depth import Structure
        from hfmerge.engine.statistics import StatisticsRequest

        layout = ctx.sources[index]
        spec = _spec(layout)
        modules = [module for segment in spec.segments(Structure.of_layout(layout)) for layer in segment.layers
                   for module in (layer.representation, layer.output) if module is not None]
        modules += [m for group in layout.neuron_groups for m in group.activations]
        return StatisticsRequest(activations=tuple(dict.fromkeys(modules)),
                                 activation_samples=int(ctx.params["samples"]),
                                 activation_pool=int(ctx.params["pool"]))

    # ----- plan -----

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.plan import MergePlan, OutputSpec
        from hfmerge.methods.ot.alignment import AlignedAverage

        segments = self._checked_segments(ctx)
        if _needs_activations(ctx.params) and not ctx.data:
            if ctx.params["balance"] == "merge":
                raise RecipeError(
                    "balance=merge estimates each folded layer's ReLU from its pre-activations on images: give "
                    "--data (one dataset for all sources, or one per source), or use --param balance=add"
                )
            raise RecipeError(
                "clafusion compares layers and neurons by their activations on images: give --data (one dataset "
                "for all sources, or one per source), or use --param representation=neurons --param cost=weights"
            )
        if float(ctx.params["distill_weight"]) > 0 and int(ctx.params["finetune_epochs"]) == 0:
            logger.warning("clafusion: distill_weight acts during fine-tuning only; without --param "
                           "finetune_epochs=N nothing is distilled")
        anchor = ctx.anchor
        groups = anchor.neuron_groups
        members = membership(groups)
        coefficients = fused_coefficients(ctx)
        entries = []
        for name, info in anchor.tensors.items():
            refs = tuple((i, info.key) if i == ctx.anchor_index else (Derive.name, balanced_key(i, name))
                         for i in range(len(ctx.sources)))
            alignments = tuple(
                () if i == ctx.anchor_index
                else tuple((dim, (Derive.name, map_key(i, g)), unit) for dim, g, unit in members.get(name, []))
                for i in range(len(ctx.sources))
            )
            op = AlignedAverage(refs, alignments, coefficients,
                                group="balanced, aligned by optimal transport, then averaged")
            entries.append(ctx.plan_entry(info, op))
        forced = {i: [_forced(ctx, t, own) for t, own in zip(segments[ctx.anchor_index], segments[i])]
                  for i in range(len(ctx.sources)) if i != ctx.anchor_index}
        spec = _spec(anchor)
        details = {
            "target": anchor.source.name, "weights": list(coefficients),
            "segment_kind": spec.segment_kind,
            "identity": spec.identity_layer,
            "alignment_svg": ALIGNMENT_SVG,
            "planned_alignment": {ctx.sources[i].source.short_name: [
                None if mapping is None else [j + 1 for j in mapping] for mapping in maps]
                for i, maps in forced.items()},
        }
        output = OutputSpec(config=anchor.config, architecture=anchor.architecture, task=anchor.task,
                            files=dict(anchor.family.file_texts()), loads_with_transformers=anchor.family.classes is None)
        return MergePlan(entries, details=details, output=output)

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        """The target and each source's alignment as far as the plan knows it (the data decides the rest)."""
        chosen = self.choose_anchor(ctx.sources, ctx.params)
        why = f" — {chosen[1]}" if chosen is not None and chosen[0] == ctx.anchor_index else ""
        lines = [f"target (the output's architecture): {ctx.anchor.source.name}{why}"]
        segments = self._checked_segments(ctx)
        for i, layout in enumerate(ctx.sources):
            if i == ctx.anchor_index:
                continue
            lines.append(f"cross-layer alignment of {layout.source.name} ({ctx.params['balance']}):")
            for t, own in zip(segments[ctx.anchor_index], segments[i]):
                deeper, shallower = (t, own) if ctx.params["balance"] == "add" else (own, t)
                mapping = _forced(ctx, t, own)
                shown = ("chosen from the data's activations (1 - linear CKA)" if mapping is None
                         else f"a = {[j + 1 for j in mapping]}")
                lines.append(f"  {t.name}: {len(deeper.layers)} / {len(shallower.layers)} layers, {shown}")
        return lines

    # ----- derive: alignment, balancing, transport -----

    def _derive(self, ctx: MergeContext, load: Loader) -> Derived:
        """Per source: the cross-layer alignment, the balanced tensors and activations, the transport maps."""
        from hfmerge.methods.ot.pictures import AlignedSegment, alignment_map_svg, cost_heatmap_svg

        segments = self._checked_segments(ctx)
        anchor_index = ctx.anchor_index
        target_groups = ctx.anchor.neuron_groups
        tensors: dict[str, torch.Tensor] = {}
        alignment: list[dict[str, Any]] = []
        pictures: list[AlignedSegment] = []
        transport: list[list[tuple[float | None, float]]] = [[] for _ in target_groups]
        target = Side(target_groups,
                      lambda module: load((ctx.statistics_index(anchor_index), f"activation/{module}")),
                      lambda name: load((anchor_index, ctx.anchor.tensors[name].key)))
        seconds = dict.fromkeys(("alignment", "balancing", "transport"), 0.0)
        widths_differ = False
        for i, layout in enumerate(ctx.sources):
            if i == anchor_index:
                continue
            clock = time.perf_counter()
            maps, costs = self._align(ctx, load, i, segments)
            seconds["alignment"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if ctx.params["balance"] == "add":
                balanced, activations = _deepened(ctx, load, i, segments[anchor_index], maps)
            else:
                balanced, activations = _merged(ctx, load, i, maps)
            seconds["balancing"] += time.perf_counter() - clock
            clock = time.perf_counter()
            own_groups = [_resized(group, balanced) for group in target_groups]
            widths_differ |= any(own.size != group.size for own, group in zip(own_groups, target_groups))
            side = Side(own_groups, activations.__getitem__, balanced.__getitem__)
            matrices, pairs = transport_maps(side, target, ctx.params)
            seconds["transport"] += time.perf_counter() - clock
            for g, matrix in enumerate(matrices):
                tensors[map_key(i, g)] = matrix
                transport[g].append(pairs[g])
            for name in ctx.anchor.tensors:
                tensors[balanced_key(i, name)] = balanced[name]
            entry = {"source": layout.source.short_name, "segments": []}
            for s, (t_seg, own_seg, mapping, cost) in enumerate(zip(segments[anchor_index], segments[i], maps, costs)):
                deeper, shallower = (t_seg, own_seg) if ctx.params["balance"] == "add" else (own_seg, t_seg)
                entry["segments"].append({"name": t_seg.name, "deeper": len(deeper.layers),
                                          "shallower": len(shallower.layers), "mapping": [j + 1 for j in mapping],
                                          "cost": None if cost is None else cost.tolist()})
                if len(alignment) == 0:  # the pictures show the first pair (the paper's two-model case)
                    pictures.append(AlignedSegment(
                        t_seg.name, [_label(x) for x in deeper.layers], [_label(x) for x in shallower.layers],
                        mapping, None if cost is None else cost.tolist()))
            alignment.append(entry)
        logger.info("clafusion: cross-layer alignment %.1f s, balancing %.1f s, optimal transport %.1f s",
                    seconds["alignment"], seconds["balancing"], seconds["transport"])
        first = next(i for i in range(len(ctx.sources)) if i != anchor_index)
        deeper_name, shallower_name = ctx.anchor.source.short_name, ctx.sources[first].source.short_name
        if ctx.params["balance"] == "merge":
            deeper_name, shallower_name = shallower_name, deeper_name
        files: dict[str, str | bytes] = {ALIGNMENT_SVG: alignment_map_svg(deeper_name, shallower_name, pictures)}
        depths_differ = any(s["deeper"] != s["shallower"] for entry in alignment for s in entry["segments"])
        details: dict[str, Any] = {"alignment": alignment, "widths_differ": widths_differ,
                                   "depths_differ": depths_differ, "pictured": ctx.sources[first].source.short_name,
                                   "transport_costs": [
            {"group": group.name, "size": group.size, "costs": pair} for group, pair in zip(target_groups, transport)]}
        if any(p.cost is not None for p in pictures):
            what = "1 − linear CKA" if ctx.params["representation"] == "activations" else "squared width difference"
            files[COST_SVG] = cost_heatmap_svg(pictures, title=f"Cross-layer cost ({what})")
            details["cost_svg"] = COST_SVG
        if _needs_activations(ctx.params):
            module = next(iter(ctx.sources[anchor_index].neuron_groups[0].activations), None)
            if module is not None:
                details["activation_samples"] = int(
                    load((ctx.statistics_index(anchor_index), f"activation/{module}")).shape[0])
        return Derived(tensors, details, files)

    def _align(self, ctx: MergeContext, load: Loader, index: int, segments: list[list[DepthSegment]]) -> tuple[
            list[list[int]], list[torch.Tensor | None]]:
        """Source ``index``'s alignment with the target, segment by segment, and each segment's cost matrix."""
        from hfmerge.methods.ot.cross_layer import cka_costs, cross_layer_alignment, width_costs

        maps: list[list[int]] = []
        costs: list[torch.Tensor | None] = []
        for t_seg, own_seg in zip(segments[ctx.anchor_index], segments[index]):
            (deeper, d_index), (shallower, s_index) = (
                ((t_seg, ctx.anchor_index), (own_seg, index)) if ctx.params["balance"] == "add"
                else ((own_seg, index), (t_seg, ctx.anchor_index)))
            if ctx.params["representation"] == "neurons":
                cost = width_costs([x.width for x in deeper.layers], [x.width for x in shallower.layers])
            else:
                def representations(segment: DepthSegment, i: int) -> list[torch.Tensor]:
                    return [load((ctx.statistics_index(i), f"activation/{x.representation}")) for x in segment.layers]

                cost = cka_costs(representations(deeper, d_index), representations(shallower, s_index))
            maps.append(cross_layer_alignment(cost))
            costs.append(cost if len(shallower.layers) > 1 and len(deeper.layers) > len(shallower.layers) else None)
        return maps, costs

    # ----- fine-tuning -----

    def _fine_tuning(self, ctx: MergeContext) -> FineTuning | None:
        """Fine-tune the fused model on the labeled data; with ``distill_weight`` > 0, distil from the deepest source."""
        if int(ctx.params["finetune_epochs"]) == 0:
            return None
        identity = {j: j for j in range(len(ctx.anchor.id2label))}
        depths = [_depth(layout) or 0 for layout in ctx.sources]
        teacher = max(range(len(ctx.sources)), key=lambda i: (depths[i], -i))
        return FineTuning(
            label_maps=tuple(identity for _ in ctx.sources), epochs=int(ctx.params["finetune_epochs"]),
            learning_rate=float(ctx.params["learning_rate"]), batch_size=int(ctx.params["batch_size"]),
            patience=int(ctx.params["patience"]), teacher=teacher,
            temperature=float(ctx.params["distill_temperature"]), distill_weight=float(ctx.params["distill_weight"]),
        )

    # ----- checks -----

    def _checked_segments(self, ctx: MergeContext) -> list[list[DepthSegment]]:
        """Every source's segments, checked: one family that can be balanced, one task, matching segments."""
        from hfmerge.adapters.depth import Structure

        anchor = ctx.anchor
        spec = _spec(anchor)
        balance = ctx.params["balance"]
        if balance == "merge" and spec.merge is None:
            raise IncompatibleModelsError(
                f"balance=merge folds fully connected layers (MLPs); {anchor.family.name} layers cannot be merged "
                "that way: use --param balance=add"
            )
        labels = [s.id2label for s in ctx.sources]
        if any(other != labels[ctx.anchor_index] for other in labels):
            raise IncompatibleModelsError(
                "clafusion fuses models of one task, but the sources' labels differ; use --method fusion or gating "
                "to serve several tasks"
            )
        segments = [spec.segments(Structure.of_layout(layout)) for layout in ctx.sources]
        target = segments[ctx.anchor_index]
        for layout, own in zip(ctx.sources, segments):
            _check_kind(anchor, layout)
            if len(own) != len(target):
                raise IncompatibleModelsError(
                    f"{layout.source.short_name} has {len(own)} {_segment_word(anchor)} and "
                    f"{anchor.source.short_name} {len(target)}: clafusion aligns layers within matching "
                    f"{_segment_word(anchor)}"
                )
            for t_seg, own_seg in zip(target, own):
                m, n = len(t_seg.layers), len(own_seg.layers)
                if (balance == "add" and n > m) or (balance == "merge" and n < m):
                    which = "deeper" if balance == "add" else "shallower"
                    raise IncompatibleModelsError(
                        f"{layout.source.short_name} has {n} layers in {t_seg.name} and the target "
                        f"{anchor.source.short_name} {m}: the target must be at least as {which.removesuffix('er')} "
                        f"in every segment; fuse models where one is the {which} throughout"
                    )
        return segments


def _needs_activations(params: dict[str, Any]) -> bool:
    return (params["representation"] == "activations" or params["cost"] == "activations"
            or params["balance"] == "merge")


def _spec(layout: ModelLayout) -> Any:
    """The family's depth declaration, or a clear refusal."""
    from hfmerge.adapters.base import balanceable_families

    spec = layout.family.depth
    if spec is None or layout.family.neurons is None:
        raise IncompatibleModelsError(
            f"clafusion balances the depth of {', '.join(balanceable_families())} models; "
            f"{layout.source.short_name} is a {layout.family.name} model"
        )
    return spec


def _depth(layout: ModelLayout) -> int | None:
    from hfmerge.adapters.depth import Structure

    spec = layout.family.depth
    if spec is None:
        return None
    return sum(len(segment.layers) for segment in spec.segments(Structure.of_layout(layout)))


def _segment_word(layout: ModelLayout) -> str:
    return _spec(layout).segment_plural


def _check_kind(anchor: ModelLayout, layout: ModelLayout) -> None:
    """What balancing cannot change must agree: ResNet block type, VGG batch norm, input size and channels."""
    if layout.architecture != anchor.architecture:
        raise IncompatibleModelsError(
            f"clafusion fuses models of one architecture: {layout.source.short_name} is {layout.architecture}, "
            f"{anchor.source.short_name} {anchor.architecture}"
        )
    for field in ("layer_type", "batch_norm", "num_channels", "image_size", "downsample_in_first_stage",
                  "downsample_in_bottleneck", "hidden_act"):
        mine, theirs = getattr(layout.config, field, None), getattr(anchor.config, field, None)
        if mine != theirs:
            raise IncompatibleModelsError(
                f"{layout.source.short_name} and {anchor.source.short_name} differ in {field} ({mine} and "
                f"{theirs}): clafusion changes depth, and optimal transport widths, but not that"
            )


def _forced(ctx: MergeContext, target: DepthSegment, own: DepthSegment) -> list[int] | None:
    """The segment's alignment when the plan can tell it without data (equal depths, n ≤ 2, or widths as cost)."""
    from hfmerge.methods.ot.cross_layer import cross_layer_alignment, width_costs

    deeper, shallower = (target, own) if ctx.params["balance"] == "add" else (own, target)
    m, n = len(deeper.layers), len(shallower.layers)
    if ctx.params["representation"] == "neurons":
        return cross_layer_alignment(width_costs([x.width for x in deeper.layers], [x.width for x in shallower.layers]))
    if n == m:
        return list(range(n))
    if n == 1:
        return [0]
    if n == 2:
        return [0, m - 1]
    return None


def _label(layer: Any) -> str:
    """A short label of a layer for the pictures: its main module's last two name parts."""
    parts = layer.modules[0].split(".")
    return ".".join(parts[-2:])


def _resized(group: NeuronGroup, tensors: dict[str, torch.Tensor]) -> NeuronGroup:
    """The target's neuron group with the width it has in a balanced source (OT aligns widths)."""
    tensor, dim = group.members[0]
    return replace(group, size=int(tensors[tensor].shape[dim]) // group.unit_of(tensor, dim))


def _model(ctx: MergeContext, load: Loader, index: int) -> torch.nn.Module:
    """Source ``index`` as a model in memory, float32, from its tensors (the tables the pipeline opened)."""
    import torch

    layout = ctx.sources[index]
    with torch.device("cpu"):
        model = layout.family.model_class(layout.architecture)(layout.config)
    state = {name: load((index, info.key)).to(torch.float32) if info.dtype.is_floating_point else load((index, info.key))
             for name, info in layout.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise IncompatibleModelsError(f"{layout.source.short_name}: unexpected tensors {unexpected[:3]}")
    return model.eval()


def _deepened(ctx: MergeContext, load: Loader, index: int, target: list[DepthSegment], maps: list[list[int]]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Source ``index`` with identity layers added to the target's depth: its tensors and activations by name."""
    from hfmerge.methods.ot.balancing import deepen, deepened_activations

    spec = _spec(ctx.sources[index])
    deepened = deepen(_model(ctx, load, index), spec, maps, [len(s.layers) for s in target])
    state = {name: tensor.detach() for name, tensor in deepened.model.state_dict().items()}
    modules = [m for group in ctx.anchor.neuron_groups for m in group.activations]
    activations: dict[str, torch.Tensor] = {}
    if ctx.params["cost"] == "activations":
        activations = deepened_activations(
            deepened, spec, modules, lambda module: load((ctx.statistics_index(index), f"activation/{module}")))
    return state, activations


def _merged(ctx: MergeContext, load: Loader, index: int, maps: list[list[int]]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Source ``index`` (deeper) with its unmatched layers folded into the next ones (MLPs, §3.2)."""
    import torch

    from hfmerge.methods.ot.balancing import merge_linear, relu_estimate

    layout = ctx.sources[index]
    kept = maps[0]
    count = len(layout.config.hidden_sizes)
    layers = [f"layers.{i}" for i in range(count)] + ["classifier"]

    def linear(module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = layout.tensors.get(f"{module}.bias")
        return (load((index, layout.tensors[f"{module}.weight"].key)).to(torch.float64),
                load((index, bias.key)).to(torch.float64) if bias is not None else None)

    def pre_activation(i: int) -> torch.Tensor:
        return load((ctx.statistics_index(index), f"activation/layers.{i}")).to(torch.float64)

    targets = [*kept, count]  # every kept layer, then the classifier, takes in the layers dropped before it
    merged: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    start = 0
    for j in targets:
        weight, bias = linear(layers[start])
        for dropped in range(start, j):
            d = relu_estimate(pre_activation(dropped), ctx.params["relu_estimate"])
            weight, bias = merge_linear((weight, bias), linear(layers[dropped + 1]), d)
        merged.append((weight, bias))
        start = j + 1
    state: dict[str, torch.Tensor] = {}
    for position, (weight, bias) in enumerate(merged):
        module = f"layers.{position}" if position < len(kept) else "classifier"
        state[f"{module}.weight"] = weight.to(torch.float32)
        if bias is not None:
            state[f"{module}.bias"] = bias.to(torch.float32)
    activations: dict[str, torch.Tensor] = {}
    if ctx.params["cost"] == "activations":
        z = pre_activation(kept[0]) if kept[0] == 0 else None
        if z is None:
            raise IncompatibleModelsError("balance=merge keeps the first hidden layer (a(1) = 1)")
        for position in range(len(kept)):
            if position:
                weight, bias = merged[position]
                z = torch.relu(z) @ weight.T + (bias if bias is not None else 0.0)
            activations[f"layers.{position}"] = z
    return state, activations
