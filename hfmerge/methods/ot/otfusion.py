"""OTFusion: match every source's neurons to the target's with optimal transport, then average.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020, Algorithm 1
(summarised in clafusion.txt §2.3): models trained from different seeds hold
their hidden units in different orders, so averaging them unaligned mixes
unrelated neurons. Layer by layer, a transport plan T between source A's
neurons and the target's (the anchor's) is solved on a ground cost — the
distance between their pre-activations on the same images (activation-based,
the paper's and CLAFusion's choice) or between their incoming weights once
those are aligned with the previous layer's plan (weight-based) — with
uniform marginals; A's tensors are moved onto the target's neurons,
W̃ = diag(1/β) Tᵀ W M_prev, along every dimension that indexes a neuron
group, and then averaged. The groups come from the adapters
(:mod:`hfmerge.adapters.neurons`): a convolution's output channels carry its
BatchNorm and the next layer's input channels, and the blocks of a residual
stage share one map, which is what the official code lacked (its issue #6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.errors import IncompatibleModelsError, RecipeError
from hfmerge.methods.base import MergeMethod, ParamSpec, available_methods, register_method
from hfmerge.methods.stages import (
    Compare,
    Comparison,
    DataNeed,
    Derive,
    Derived,
    FineTune,
    FineTuning,
    Stage,
    Statistics,
)

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.adapters.neurons import NeuronGroup
    from hfmerge.engine.ops import Loader
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.engine.statistics import StatisticsRequest


def map_key(source: int, group: int) -> str:
    """The derived table's key of source ``source``'s alignment matrix for the anchor's group ``group``."""
    return f"map/{source}/{group}"


TRANSPORT_PARAMETERS = (
    ParamSpec("samples", int, 200, "images whose activations represent each neuron (cost=activations)",
              minimum=1),
    ParamSpec("pool", int, 8, "convolution activations are average-pooled to at most pool x pool positions "
              "per image before they are compared (0: every position, as the paper's 32 px images)", minimum=0),
    ParamSpec("solver", str, "emd", "exact optimal transport (emd) or entropic (sinkhorn, with reg)",
              choices=("emd", "sinkhorn")),
    ParamSpec("reg", float, 0.01, "Sinkhorn's entropic regularisation, relative to the largest cost",
              minimum=1e-9),
    ParamSpec("fuse_weight", float, None, "the target's (the anchor's) weight in the average; the other "
              "sources share the rest (default: --weights, or equal weights)", minimum=0.0, maximum=1.0),
)
"""OTFusion's transport options, which CLAFusion shares."""

FINE_TUNING_PARAMETERS = (
    ParamSpec("finetune_epochs", int, 0, "epochs of fine-tuning of the fused model on the labeled --data",
              minimum=0, needs_data=True),
    ParamSpec("learning_rate", float, 1e-4, "fine-tuning learning rate (AdamW)", minimum=0.0, needs_data=True),
    ParamSpec("batch_size", int, 32, "images per batch of the statistics and fine-tuning", minimum=1),
    ParamSpec("patience", int, 2, "epochs without a better held-out accuracy before fine-tuning stops",
              minimum=1, needs_data=True),
)
"""Fine-tuning of the fused model on the labeled data, which CLAFusion shares."""


@register_method
class OTFusion(MergeMethod):
    """OTFusion (Singh & Jaggi, NeurIPS 2020): neurons aligned by optimal transport, then averaged."""

    name = "otfusion"
    title = "OTFusion (neurons aligned by optimal transport, then averaged)"
    reference = "Singh & Jaggi, Model Fusion via Optimal Transport, NeurIPS 2020"
    reference_url = "https://arxiv.org/abs/1910.05653"
    uses_anchor = True
    uses_weights = True
    parameters = (
        ParamSpec("cost", str, "activations", "ground cost between neurons: activations (pre-activations on the "
                  "same images, needs --data) or weights (incoming weights, aligned with the previous layer)",
                  choices=("activations", "weights")),
        *TRANSPORT_PARAMETERS,
        ParamSpec("residual", bool, False, "also align a transformer's residual stream (ViT: the embeddings, "
                  "every LayerNorm, the attention and MLP outputs, the classifier's input) as one more group"),
        ParamSpec("align", bool, True, "false: average without aligning (vanilla averaging, the baseline the paper "
                  "compares with)"),
        ParamSpec("compare", bool, True, "with --eval-data, also evaluate vanilla averaging (align=false) beside "
                  "the fused model, when the widths agree"),
        *FINE_TUNING_PARAMETERS,
    )
    card_template = """\
{% if not parameters.align %}The sources were averaged as they are, with the weights in the sources table, \
without aligning their neurons (`align=false`: vanilla averaging, the baseline of OTFusion's comparisons).\
{% else %}The neurons of every source were matched to those of the target model ({{ details.target }}) before averaging, \
with optimal transport (OTFusion, Singh & Jaggi 2020, Algorithm 1). For each of the \
{{ details.transport | length }} neuron groups, the ground cost between a source neuron and a target neuron is \
the Euclidean distance between \
{%- if parameters.cost == 'activations' %} their pre-activations on the same {{ details.get("activation_samples", parameters.samples) }} images \
of the data{% if parameters.pool %} (a convolution's output average-pooled to at most {{ parameters.pool }} × \
{{ parameters.pool }} positions per image){% endif %}{% else %} their incoming weights, after those were aligned with the maps of the layers before\
{%- endif %}; the transport plan T between them, with uniform marginals, is \
{%- if parameters.solver == 'emd' %} the exact optimal one (`ot.emd`){% else %} Sinkhorn's entropic \
approximation (`ot.sinkhorn`, regularisation {{ parameters.reg }} of the largest cost){% endif %}. Each source \
tensor is moved onto the target's neurons along every dimension that indexes a group, W̃ = diag(1/β) Tᵀ W \
T_prev diag(1/β_prev), with β = Tᵀ1 the target's marginal (1/n for n neurons), where a group is a layer's \
output units together with every tensor indexed by them (a normalisation's, the next layers' inputs), and \
layers that add into one residual stream share one group{% if details.widths_differ %}; the fused model has \
the target's widths{% endif %}. The aligned tensors are \
averaged with the weights in the sources table ({{ details.weights | map('round', 3) | join(', ') }}). \
Dimensions in no group (the image's colour channels, the classifier's labels\
{%- if not parameters.residual and details.get("optional_groups") %}, the residual stream: \
`residual=true` aligns it too{% endif %}) stay as they are.
{% if details.get("transport_costs") %}
Transport cost per neuron group: the mean distance between matched neurons, before alignment (neuron k with \
neuron k{% if details.widths_differ %}; "—" where the widths differ, so neuron k has no counterpart{% endif %}) \
and after (Σ T∘C).{% if details.widths_differ %} Vanilla averaging is not compared: it needs equal widths.\
{% endif %}

| neuron group | neurons |{% for name in details.aligned_sources %} {{ name }}: before | after |{% endfor %}
|---|---|{% for name in details.aligned_sources %}---|---|{% endfor %}
{% for row in details.transport_costs -%}
| {{ row.group }} | {{ row.size }} |{% for pair in row.costs %} {{ '—' if pair[0] is none else '%.4g' | format(pair[0]) }} \
| {{ '%.4g' | format(pair[1]) }} |{% endfor %}
{% endfor %}{% endif %}
{% set finetuning = details.get("finetuning") %}{% if finetuning %}
The fused model was then fine-tuned on {{ finetuning.data }} ({{ finetuning.samples }} training images) with \
AdamW at learning rate {{ parameters.learning_rate }}, batch size {{ parameters.batch_size }}, for \
{{ finetuning.epochs_run }} of at most {{ parameters.finetune_epochs }} epochs; {{ finetuning.validation }} \
The weights are those of epoch {{ finetuning.best_epoch }}, the best on the held-out images.{% endif %}{% endif %}"""

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """Activations of the anchor's neuron groups on the data, the transport maps, fine-tuning, the comparison."""
        need = DataNeed(required=False, purpose="to compare the models' neurons by their pre-activations on the same "
                        "images", when="needed by the default cost=activations, and to fine-tune; cost=weights runs "
                        "without")
        return [
            Statistics(lambda ctx, i: self._activations(ctx), samples=int(ctx.params["samples"]),
                       batch_size=int(ctx.params.get("batch_size") or 32),
                       labeled=int(ctx.params.get("finetune_epochs") or 0) > 0, need=need),
            Derive(self._derive),
            FineTune(self._fine_tuning),
            Compare(self._comparisons),
        ]

    def _activations(self, ctx: MergeContext) -> StatisticsRequest | None:
        if ctx.params["cost"] != "activations" or not ctx.params.get("align", True):
            return None
        from hfmerge.engine.statistics import StatisticsRequest

        modules = [m for group in _groups(ctx, ctx.anchor) for m in group.activations]
        return StatisticsRequest(activations=tuple(dict.fromkeys(modules)),
                                 activation_samples=int(ctx.params["samples"]),
                                 activation_pool=int(ctx.params["pool"]))

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import LinearCombination
        from hfmerge.engine.plan import MergePlan
        from hfmerge.methods.ot.alignment import AlignedAverage

        if ctx.params["cost"] == "activations" and ctx.params.get("align", True) and not ctx.data:
            raise RecipeError(
                "otfusion with cost=activations compares neurons by their activations on images: give --data "
                "(one dataset for all sources, or one per source), or use --param cost=weights"
            )
        groups = self._checked_groups(ctx)
        anchor = ctx.anchor
        members = membership(groups[ctx.anchor_index])
        coefficients = fused_coefficients(ctx)
        entries = []
        align = bool(ctx.params.get("align", True))
        for name, info in anchor.tensors.items():
            dims = members.get(name, [])
            self._check_shape(ctx, groups, name, dims)
            if not dims or not align:
                entries.append(ctx.plan_entry(info, LinearCombination(ctx.refs(name), coefficients)))
                continue
            alignments = tuple(
                () if i == ctx.anchor_index
                else tuple((dim, (Derive.name, map_key(i, g)), unit) for dim, g, unit in dims)
                for i in range(len(ctx.sources))
            )
            entries.append(ctx.plan_entry(info, AlignedAverage(ctx.refs(name), alignments, coefficients)))
        widths_differ = _widths_differ(ctx, groups)
        if widths_differ and not align:
            raise IncompatibleModelsError(
                "align=false averages the models as they are, which needs equal widths; the sources' widths differ: "
                "drop align=false"
            )
        details = {
            "target": anchor.source.name, "groups": [g.name for g in groups[ctx.anchor_index]],
            "weights": list(coefficients), "widths_differ": widths_differ,
            "aligned_sources": [s.source.short_name for i, s in enumerate(ctx.sources) if i != ctx.anchor_index],
            "transport": [{"group": g.name, "size": g.size} for g in groups[ctx.anchor_index]],
            "optional_groups": [g.name for g in anchor.all_neuron_groups if g.optional],
        }
        return MergePlan(entries, details=details)

    def _comparisons(self, ctx: MergeContext) -> list[Comparison]:
        """Vanilla averaging of the same sources, the baseline of the paper's tables, when the widths agree."""
        if not (ctx.params.get("compare") and ctx.params.get("align")):
            return []
        if _widths_differ(ctx, [_groups(ctx, layout) for layout in ctx.sources]):
            return []
        return [Comparison("vanilla average (no alignment)", {"align": False})]

    def _derive(self, ctx: MergeContext, load: Loader) -> Derived | None:
        """Every source's alignment matrix per neuron group, against the anchor (Algorithm 1), and the costs."""
        if not ctx.params.get("align", True):
            return None
        groups = self._checked_groups(ctx)
        target = groups[ctx.anchor_index]
        anchor = ctx.anchor_index

        def side(index: int) -> Side:
            layout = ctx.sources[index]
            return Side(groups[index],
                        lambda module: load((ctx.statistics_index(index), f"activation/{module}")),
                        lambda name: load((index, layout.tensors[name].key)))

        tensors: dict[str, torch.Tensor] = {}
        costs: list[list[tuple[float | None, float]]] = [[] for _ in target]
        for i in range(len(ctx.sources)):
            if i == anchor:
                continue
            matrices, pairs = transport_maps(side(i), side(anchor), ctx.params)
            for g, matrix in enumerate(matrices):
                tensors[map_key(i, g)] = matrix
                costs[g].append(pairs[g])
        rows = [{"group": group.name, "size": group.size, "costs": pair} for group, pair in zip(target, costs)]
        details: dict[str, Any] = {"transport_costs": rows}
        if ctx.params["cost"] == "activations" and target and target[0].activations:
            first = load((ctx.statistics_index(anchor), f"activation/{target[0].activations[0]}"))
            details["activation_samples"] = int(first.shape[0])
        return Derived(tensors, details)

    def _fine_tuning(self, ctx: MergeContext) -> FineTuning | None:
        """Fine-tune the fused model on the labeled data (the sources share one label set)."""
        if int(ctx.params["finetune_epochs"]) == 0:
            return None
        identity = {j: j for j in range(len(ctx.anchor.id2label))}
        return FineTuning(
            label_maps=tuple(identity for _ in ctx.sources), epochs=int(ctx.params["finetune_epochs"]),
            learning_rate=float(ctx.params["learning_rate"]), batch_size=int(ctx.params["batch_size"]),
            patience=int(ctx.params["patience"]),
        )

    def _checked_groups(self, ctx: MergeContext) -> list[list[NeuronGroup]]:
        """Each source's neuron groups, checked to pair up with the anchor's one by one."""
        architectures = {s.architecture for s in ctx.sources}
        if len(architectures) > 1:
            raise IncompatibleModelsError(
                f"otfusion aligns models of one architecture, got {', '.join(sorted(architectures))}"
            )
        labels = [s.id2label for s in ctx.sources]
        if any(other != labels[ctx.anchor_index] for other in labels):
            raise IncompatibleModelsError(
                "otfusion fuses models of one task, but the sources' labels differ "
                f"({ctx.anchor.source.short_name}: {len(labels[ctx.anchor_index])} labels); "
                "use --method fusion or gating to serve several tasks"
            )
        groups = [_groups(ctx, layout) for layout in ctx.sources]
        target = groups[ctx.anchor_index]
        for layout, own in zip(ctx.sources, groups):
            names = [g.name for g in own]
            if len(own) == len(target) and names != [g.name for g in target]:
                first = next(i for i, (a, b) in enumerate(zip(names, target)) if a != b.name)
                raise IncompatibleModelsError(
                    f"{layout.source.short_name} and {ctx.anchor.source.short_name} are built differently (neuron "
                    f"group {first + 1} is {names[first]!r} in one and {target[first].name!r} in the other): "
                    "otfusion aligns models of one architecture, whose widths alone may differ"
                )
            if names != [g.name for g in target]:
                deeper = ("--method clafusion" if "clafusion" in available_methods()
                          else "cross-layer alignment (CLAFusion, not in hfmerge yet)")
                raise IncompatibleModelsError(
                    f"{layout.source.short_name} has {len(own)} neuron groups and {ctx.anchor.source.short_name} "
                    f"{len(target)} (the models differ in depth): otfusion aligns layer by layer, so fuse models of "
                    f"one depth, or use {deeper}"
                )
        return groups

    def _check_shape(self, ctx: MergeContext, groups: list[list[NeuronGroup]], name: str,
                     dims: list[tuple[int, int, int]]) -> None:
        """Every source's tensor has the anchor's shape once its group dimensions take the anchor's widths."""
        expected = ctx.anchor.tensors[name].shape
        for i, layout in enumerate(ctx.sources):
            info = layout.tensors.get(name)
            if info is None:
                raise IncompatibleModelsError(
                    f"otfusion needs every tensor in every model, but {layout.source.short_name} lacks {name}"
                )
            shape = list(info.shape)
            for dim, g, unit in dims:
                if shape[dim] != groups[i][g].size * unit:
                    raise IncompatibleModelsError(f"{layout.source.name}: {name} does not match its neuron groups")
                shape[dim] = groups[ctx.anchor_index][g].size * unit
            if tuple(shape) != expected:
                raise IncompatibleModelsError(
                    f"otfusion can align widths, but {name} has shape {list(info.shape)} in "
                    f"{layout.source.short_name} and {list(expected)} in {ctx.anchor.source.short_name} in a "
                    "dimension that no neuron group covers; fuse models of one architecture"
                )


def fused_coefficients(ctx: MergeContext) -> tuple[float, ...]:
    """The anchor (the target) gets ``fuse_weight`` and the others share the rest by their weights; else the weights."""
    weights = ctx.normalised_weights()
    fuse_weight = ctx.params.get("fuse_weight")
    if fuse_weight is None:
        return weights
    others = [w for i, w in enumerate(weights) if i != ctx.anchor_index]
    rest = sum(others)
    return tuple(
        float(fuse_weight) if i == ctx.anchor_index
        else (1.0 - float(fuse_weight)) * (w / rest if rest else 1.0 / len(others))
        for i, w in enumerate(weights)
    )


def _groups(ctx: MergeContext, layout: ModelLayout) -> list[NeuronGroup]:
    """The neuron groups this merge aligns: optional ones (a residual stream) with ``residual=true``."""
    return layout.neuron_groups_with(bool(ctx.params.get("residual")))


def _widths_differ(ctx: MergeContext, groups: list[list[NeuronGroup]]) -> bool:
    target = groups[ctx.anchor_index]
    return any(a.size != b.size for own in groups for a, b in zip(own, target))


def membership(groups: list[NeuronGroup]) -> dict[str, list[tuple[int, int, int]]]:
    """Tensor name -> its (dimension, group index, unit) triples."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for g, group in enumerate(groups):
        for tensor, dim in group.members:
            out.setdefault(tensor, []).append((dim, g, group.unit_of(tensor, dim)))
    return out


@dataclass(frozen=True)
class Side:
    """One model as transport sees it: its neuron groups, its activations by module, its tensors by name."""

    groups: list[NeuronGroup]
    activation: Callable[[str], torch.Tensor]
    tensor: Callable[[str], torch.Tensor]


def transport_maps(source: Side, target: Side, params: dict[str, Any]) -> tuple[
        list[torch.Tensor], list[tuple[float | None, float]]]:
    """Algorithm 1 for one source against the target: each group's alignment matrix, in forward order.

    Group g's ground cost compares the source's units with the target's (their activations, or their
    incoming weights once aligned with the maps of the groups before); the transport plan between
    them gives the alignment matrix. Also returns each group's mean cost before alignment (unit k
    with unit k, ``None`` where the widths differ) and after (Σ T∘C).
    """
    from hfmerge.methods.ot.alignment import alignment_matrix, pairwise_cost, transport_plan

    cost_kind, solver, reg = params["cost"], params["solver"], float(params["reg"])
    matrices: dict[int, torch.Tensor] = {}
    costs: list[tuple[float | None, float]] = []
    for g, (group, anchor_group) in enumerate(zip(source.groups, target.groups)):
        if cost_kind == "activations":
            x = _activation_features(source.activation, group)
            y = _activation_features(target.activation, anchor_group)
        else:
            x = _weight_features(source.tensor, source.groups, g, matrices)
            y = _weight_features(target.tensor, target.groups, g, None)
        cost = pairwise_cost(x, y)
        plan = transport_plan(cost, solver=solver, reg=reg)
        matrices[g] = alignment_matrix(plan)
        before = float(cost.diagonal().mean()) if cost.shape[0] == cost.shape[1] else None
        costs.append((before, float((plan * cost).sum())))
    return [matrices[g] for g in range(len(source.groups))], costs


def _activation_features(activation: Callable[[str], torch.Tensor], group: NeuronGroup) -> torch.Tensor:
    """[units, features]: each unit's activations over the samples, at every module that carries the group."""
    import torch

    from hfmerge.methods.ot.alignment import unit_features

    parts = [unit_features(activation(module), group.activation_dim, group.unit) for module in group.activations]
    if not parts:
        raise IncompatibleModelsError(
            f"the neuron group {group.name} names no module whose activations represent it; use --param cost=weights"
        )
    return torch.cat(parts, dim=1)


def _weight_features(tensor_of: Callable[[str], torch.Tensor], groups: list[NeuronGroup], g: int,
                     matrices: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """[units, features]: each unit's incoming weights (its producers' rows), aligned with earlier groups' maps.

    ``matrices`` are this model's alignment matrices of the groups already solved (``None`` for the
    target, which is not moved). A producer whose input dimension belongs to a group not yet solved
    cannot be compared across models and is left out.
    """
    import torch

    from hfmerge.methods.ot.alignment import align_dim, unit_features

    members = membership(groups)
    group = groups[g]
    parts = []
    for producer in group.producers:
        others = [(dim, h, unit) for dim, h, unit in members.get(producer, []) if h != g]
        if any(h > g for _, h, _ in others):
            continue
        tensor = tensor_of(producer).to(torch.float64)
        if matrices is not None:
            for dim, h, unit in others:
                tensor = align_dim(tensor, matrices[h], dim, unit)
        parts.append(unit_features(tensor.unsqueeze(0), 1, group.unit_of(producer, 0)))
    if not parts:
        raise IncompatibleModelsError(
            f"the neuron group {group.name} has no incoming weights to compare; use --param cost=activations"
        )
    return torch.cat(parts, dim=1)
