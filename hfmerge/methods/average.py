"""Weighted or uniform parameter averaging ("model soup", AvgMean)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfmerge.methods.base import MergeMethod, register_method

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergeContext, MergePlan


@register_method
class Average(MergeMethod):
    """θ = Σ_i w_i θ_i with w_i ≥ 0 normalised to sum to one (uniform by default).

    Wortsman et al., "Model soups" (2022), Eq. for the uniform soup; BatchNorm
    running statistics average like weights, integer buffers are copied from
    the anchor (the first source unless ``--anchor``). Classifier heads follow the head policy
    (:mod:`hfmerge.methods.heads`): averaged like the rest when the sources share one
    label set, concatenated when they do not, or the anchor's.
    """

    name = "average"
    title = "Weighted parameter averaging (model soup)"
    reference = "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time, ICML 2022"
    reference_url = "https://arxiv.org/abs/2203.05482"
    uses_weights = True
    card_template = (
        "θ = Σᵢ wᵢ θᵢ over the {{ sources | length }} models, "
        "{% if details.weights | unique | list | length == 1 %}with equal weights wᵢ = 1/{{ sources | length }}"
        "{% else %}with the weights in the sources table (the given weights divided by their sum){% endif %}. "
        "{% if details.heads == 'average' %}Every parameter"
        "{% if details.get('not_merged') %} outside the {{ details.not_merged.part or 'part no method merges' }}"
        "{% endif %} is averaged{% if details.head_tensors %}, classifier heads included{% endif %}"
        "{% else %}Every parameter outside the classifier heads"
        "{% if details.get('not_merged') %} and the {{ details.not_merged.part or 'part no method merges' }}"
        "{% endif %} is averaged{% endif %}{% if batch_norm %}, BatchNorm running "
        "statistics included; integer buffers (BatchNorm's `num_batches_tracked`) are the anchor's{% endif %}"
        "{% if details.heads == 'concat' %}. The heads follow the `concat` head policy: stacked into one head "
        "over the union of the {{ details.num_labels }} labels"
        "{% elif details.heads == 'anchor' %}. The heads follow the `anchor` head policy: the anchor's head and "
        "labels are kept{% endif %}."
    )

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import LinearCombination
        from hfmerge.engine.plan import MergePlan, require_all_shared
        from hfmerge.methods.heads import head_policy, plan_heads

        heads = [info.name for info in ctx.anchor.head_tensors]
        require_all_shared(ctx, self.name, except_names=heads)
        head_plan = plan_heads(ctx, heads, head_policy(ctx))
        by_name = {entry.name: entry for entry in head_plan.entries}
        weights = ctx.normalised_weights()
        entries = [
            by_name.get(name) or ctx.plan_entry(info, LinearCombination(ctx.refs(name), weights))
            for name, info in ctx.anchor.tensors.items()
        ]
        return MergePlan(entries, config_updates=head_plan.config_updates,
                         details={"weights": list(weights), "head_tensors": len(heads), **head_plan.details})
