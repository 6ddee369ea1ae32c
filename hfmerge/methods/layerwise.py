"""Layer-wise merging with an anchor (Alcover-Couso et al., §3.3, Eq. 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfmerge.errors import IncompatibleModelsError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergeContext, MergePlan


def layer_weights(num_shared: int, num_models: int, start_layer: int = 1) -> list[float]:
    """Non-anchor weight H_i^(j) for j = 1..Np (Eq. 1 and the text below it).

    H_i^(j) = (Np − j) / (Np · M): near-uniform at the first shared layer,
    zero (all anchor) at the last. With ``start_layer`` K > 1 (§4.2, Fig. 5)
    the layers j < K are merged uniformly (1/M) and the same linear decay runs
    over j = K..Np, i.e. (Np − j) / ((Np − K + 1) · M), which reduces to Eq. 1
    at K = 1.
    """
    span = num_shared - start_layer + 1
    weights = []
    for j in range(1, num_shared + 1):
        if j < start_layer:
            weights.append(1.0 / num_models)
        else:
            weights.append((num_shared - j) / (span * num_models))
    return weights


@register_method
class Layerwise(MergeMethod):
    """Anchor-weighted layer-wise merge.

    Shared layers are the layers (modules whose output reaches the model's
    output; see ``ModelLayout.forward``) whose every tensor exists with one
    shape in every source, numbered j = 1..Np in the order the anchor's forward
    pass runs them; a module's weight, bias and normalisation statistics share
    its j, and the output layer is j = Np. Each non-anchor source gets H^(j)
    (see :func:`layer_weights`), the anchor 1 − Σ of the others. Every tensor of
    a module that is not a layer (an auxiliary head, a loss criterion) is the
    anchor's; layers that are not shared (a head with another class count,
    another head architecture) follow the head policy, by default ``anchor``
    as in the paper. An explicit ``--heads`` also takes the classifier heads
    out of the numbering when they are shared, so ``--heads average`` averages
    them and ``--heads concat`` gives a head over the union of the labels. The paper merges models that share a backbone, so a merge whose
    shared layers lack part of the anchor's backbone is refused.
    """

    name = "layerwise"
    title = "Layer-wise model merging"
    reference = "Alcover-Couso et al., Layer-wise Model Merging for Unsupervised Domain Adaptation in Segmentation Tasks, 2024"
    reference_url = "https://arxiv.org/abs/2409.15813"
    parameters = (
        ParamSpec(
            "start_layer", int, 1,
            "first shared layer K of the decay: each non-anchor model's weight at layer j of Np is 1/M for j < K, "
            "then (Np − j)/((Np − K + 1)·M), reaching 0 (all anchor) at j = Np; K = 1 is Eq. 1, (Np − j)/(Np·M)",
            minimum=1,
        ),
    )
    uses_anchor = True
    card_template = """\
{%- set M = sources | length -%}
{%- set K = details.start_layer -%}
The M = {{ M }} models share N_p = {{ details.shared_layers }} layers, numbered j = 1..N_p in forward \
order; the anchor is {% for s in sources if s.role == "anchor" %}`{{ s.name }}`{% endfor %}. \
{% if K > 1 -%}
With start layer K = {{ K }} (`start_layer`), every model but the anchor gets weight H⁽ʲ⁾ = 1/M for \
j < K (a uniform average) and H⁽ʲ⁾ = (N_p − j) / ((N_p − K + 1) · M) for j ≥ K: the paper's linear decay \
(§3.3, Eq. 1) started at layer K.
{%- else -%}
Every model but the anchor gets weight H⁽ʲ⁾ = (N_p − j) / (N_p · M) (§3.3, Eq. 1).
{%- endif %} The anchor gets 1 − (M − 1) · H⁽ʲ⁾, so the weights of a layer sum to one and the last shared \
layer (j = N_p) is the anchor's. Layers that are not shared (a head with other classes, another head \
architecture) {{ {'anchor': "are the anchor's", 'concat': 'are concatenated into one head over the union of the labels (other unshared layers averaged)', 'average': 'are averaged'}[details.heads] }}. Modules whose output does not reach the model's output \
(an auxiliary head, a loss criterion) are not layers: they are the anchor's.

| j | module | anchor weight | each other model |
|---|---|---|---|
{% for row in details.layer_weights -%}
| {{ row.layer }} | `{{ row.module }}` | {{ "%.4f" | format(row.anchor) }} | {{ "%.4f" | format(row.each_other) }} |
{% endfor %}"""

    def describe_plan(self, ctx: MergeContext, plan: MergePlan) -> list[str]:
        return [f"shared layers Np = {plan.details['shared_layers']}"]

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import Copy, LinearCombination
        from hfmerge.engine.plan import MergePlan
        from hfmerge.methods.heads import head_policy, plan_heads

        anchor = ctx.anchor
        # An explicit --heads takes the classifier heads out of the numbering, shared or not.
        policy_heads = {info.module for info in anchor.head_tensors} if ctx.heads is not None else set()
        by_module: dict[str, list[str]] = {}
        for name, info in anchor.forward.items():
            if info.is_layer:
                by_module.setdefault(info.module, []).append(name)
        shared = [m for m, names in by_module.items()
                  if m not in policy_heads and all(ctx.is_shared(n) for n in names)]
        if not shared:
            raise IncompatibleModelsError(
                "the sources share no layer (no module with the same parameter names and shapes); "
                "layerwise merges models that share at least a backbone"
            )
        _require_shared_backbone(ctx, list(by_module), set(shared))
        num_shared, num_models = len(shared), len(ctx.sources)
        start = int(ctx.params["start_layer"])
        if start > num_shared:
            raise IncompatibleModelsError(
                f"start_layer={start} but the sources share only {num_shared} layers; choose 1..{num_shared}"
            )
        others = layer_weights(num_shared, num_models, start)
        index = {module: j for j, module in enumerate(shared, start=1)}
        unshared = [name for name, info in anchor.forward.items() if info.is_layer and info.module not in index]
        head_plan = plan_heads(ctx, unshared, head_policy(ctx, default="anchor"))
        by_name = {entry.name: entry for entry in head_plan.entries}
        entries = []
        for name, info in anchor.forward.items():
            j = index.get(info.module)
            if name in by_name:
                entries.append(by_name[name])
                continue
            if j is None:
                entries.append(ctx.plan_entry(info, Copy((ctx.anchor_index, info.key), group="kept from anchor (not a layer)")))
                continue
            h = others[j - 1]
            coefficients = tuple(
                1.0 - h * (num_models - 1) if i == ctx.anchor_index else h for i in range(num_models)
            )
            op = LinearCombination(ctx.refs(name), coefficients, group="layer-weighted")
            entries.append(ctx.plan_entry(info, op))
        details = {
            "shared_layers": num_shared,
            "start_layer": start,
            "layer_weights": [
                {"layer": j, "module": m, "anchor": 1.0 - others[j - 1] * (num_models - 1), "each_other": others[j - 1]}
                for j, m in enumerate(shared, start=1)
            ],
            **head_plan.details,
        }
        return MergePlan(entries, config_updates=head_plan.config_updates, details=details)


def _require_shared_backbone(ctx: MergeContext, layers: list[str], shared: set[str]) -> None:
    """Refuse unless every layer of the anchor's backbone is shared by every source.

    Averaging the decoder of models whose backbones differ (UperNet-ConvNeXt
    with UperNet-Swin) merges layers that read different features. The backbone
    is the modules under the adapter's ``backbone_prefix``; a headless model
    (no such module) is all backbone.
    """
    prefix = ctx.anchor.family.backbone_prefix
    backbone = [m for m in layers if prefix and (m == prefix or m.startswith(prefix + "."))] or layers
    missing = [m for m in backbone if m not in shared]
    if missing:
        lacking = next(
            s.source.name for s in ctx.sources
            if any(not ctx.is_shared(n, [s]) for n, t in ctx.anchor.tensors.items() if t.module == missing[0])
        )
        raise IncompatibleModelsError(
            f"layerwise merges models that share a backbone, but {len(missing)} of the {len(backbone)} backbone "
            f"layers of the anchor {ctx.anchor.source.name} are missing or shaped differently in {lacking} "
            f"(e.g. {missing[0]}); merge models with one backbone architecture and size"
        )
