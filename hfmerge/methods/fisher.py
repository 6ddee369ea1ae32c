"""Fisher merging: every parameter weighted by its diagonal Fisher information."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.methods.base import MergeMethod, ParamSpec, register_method, require_image_classifiers
from hfmerge.methods.stages import Stage, Statistics

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.engine.statistics import StatisticsRequest


@dataclass(frozen=True)
class FisherWeighted:
    """Fisher merging (Matena & Raffel, 2022, Eq. 2) with the diagonal Fisher.

    θ = Σ_i w_i F̂_i θ_i / Σ_i w_i F̂_i, entry by entry, where F̂_i = F_i / n_i + ε
    is source i's mean per-sample Fisher (a statistics sum ``F_i`` over ``n_i``
    samples) and w_i the source weights. ε keeps entries that no sample
    informed (zero Fisher in every source) at the weighted average.
    """

    sources: tuple[TensorRef, ...]
    fishers: tuple[TensorRef, ...]
    counts: tuple[TensorRef, ...]
    weights: tuple[float, ...]
    epsilon: float = 1e-8
    group: str = "Fisher-weighted"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        numerator: torch.Tensor | None = None
        denominator: torch.Tensor | None = None
        for ref, fisher_ref, count_ref, weight in zip(self.sources, self.fishers, self.counts, self.weights):
            if weight == 0.0:
                continue
            count = float(load(count_ref))
            importance = weight * (load(fisher_ref).to(torch.float64) / max(count, 1.0) + self.epsilon)
            term = importance * load(ref).to(torch.float64)
            numerator = term if numerator is None else numerator.add_(term)
            denominator = importance if denominator is None else denominator.add_(importance)
        assert numerator is not None and denominator is not None
        return (numerator / denominator).to(torch.float32)


@register_method
class Fisher(MergeMethod):
    """Fisher merging (Matena & Raffel, NeurIPS 2022, Eq. 2 with the diagonal Fisher, §2.2).

    θ = Σ_i w_i F̂_i θ_i / Σ_i w_i F̂_i, entry by entry, where F̂_i is the mean
    over source i's samples of (∂ log p(y|x; θ_i) / ∂θ)², with y drawn from the
    model's own prediction (the true Fisher, on unlabeled data) or, with
    ``empirical=true``, the data's labels (the empirical Fisher). ε keeps
    entries no sample informs at the weighted average. BatchNorm running
    statistics, which have no gradient, are averaged; integer buffers are the
    anchor's. Classifier heads with one label set are Fisher-weighted like
    the rest; heads over different label sets follow the head policy.
    """

    name = "fisher"
    title = "Fisher merging (diagonal Fisher-weighted averaging)"
    reference = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022"
    reference_url = "https://arxiv.org/abs/2111.09832"
    uses_weights = True
    min_sources = 1  # one source merges to itself: a check of the statistics, as the paper's Eq. 2 implies
    parameters = (
        ParamSpec("samples", int, 256, "images of each source's data to estimate its Fisher on", minimum=1),
        ParamSpec("empirical", bool, False, "use the data's labels (empirical Fisher) instead of sampled ones"),
        ParamSpec("epsilon", float, 1e-8, "added to every Fisher value, so entries no sample informs average",
                  minimum=0.0),
        ParamSpec("batch_size", int, 16, "images per batch of the statistics stage", minimum=1),
    )
    card_template = """\
θ = Σᵢ wᵢ F̂ᵢ θᵢ / Σᵢ wᵢ F̂ᵢ for every parameter, entry by entry (Matena & Raffel 2022, Eq. 2), where F̂ᵢ \
is model i's diagonal Fisher information: the mean, over \
{% set images = details.get("statistics_images") %}{% if images and images | unique | list | length == 1 %}\
{{ images[0] }} images{% else %}the images in the Data table{% endif %} of its own data, of \
the squared gradient of log p(y|x) with y {% if parameters.empirical %}the image's true label (the empirical \
Fisher){% else %}drawn from the model's own prediction{% endif %}, plus ε = {{ parameters.epsilon }}. \
{%- if details.weights | unique | list | length == 1 %} The weights wᵢ are equal.{% else %} The weights wᵢ \
are in the sources table.{% endif %}{% if batch_norm %} BatchNorm running statistics are averaged with the same \
weights wᵢ; integer buffers are the anchor's\
{%- if details.heads == 'concat' %}; the classifier heads, over different label sets, follow the `concat` head \
policy: stacked into one head over the union of the {{ details.num_labels }} labels\
{%- elif details.heads == 'anchor' %}; the classifier head and labels are the anchor's{% endif %}.\
{%- elif details.heads == 'concat' %} The classifier heads, over different label sets, follow the `concat` head \
policy: stacked into one head over the union of the {{ details.num_labels }} labels.\
{%- elif details.heads == 'anchor' %} The classifier head and labels are the anchor's.{% endif %}"""

    def _fisher_names(self, ctx: MergeContext, merged_heads: bool) -> list[str]:
        """Parameters (not buffers) of the anchor that are Fisher-weighted."""
        parameters = ctx.anchor.parameter_names
        return [name for name, info in ctx.anchor.tensors.items()
                if name in parameters and (merged_heads or info.head is None)]

    def _heads_merged(self, ctx: MergeContext) -> bool:
        from hfmerge.methods.heads import head_policy

        return head_policy(ctx) == "average"

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """The diagonal Fisher of each source on its own data (true labels with ``empirical``)."""
        return [Statistics(lambda ctx, i: self._request(ctx), samples=ctx.params.get("samples"),
                           batch_size=int(ctx.params.get("batch_size") or 32), labeled=bool(ctx.params.get("empirical")))]

    def _request(self, ctx: MergeContext) -> StatisticsRequest:
        from hfmerge.engine.statistics import StatisticsRequest

        return StatisticsRequest(
            fisher=tuple(self._fisher_names(ctx, self._heads_merged(ctx))),
            fisher_labels="empirical" if ctx.params.get("empirical") else "model",
        )

    def check_sources(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> None:
        """Image classifiers only: the Fisher information is that of the class probabilities."""
        require_image_classifiers(layouts, "fisher needs the model's class probabilities p(y|x)", "regmean or average")

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import LinearCombination
        from hfmerge.engine.plan import MergePlan, require_all_shared
        from hfmerge.methods.heads import head_policy, plan_heads

        self.check_sources(ctx.sources, ctx.params)
        heads = [info.name for info in ctx.anchor.head_tensors]
        require_all_shared(ctx, self.name, except_names=heads)
        policy = head_policy(ctx)
        merged_heads = policy == "average"
        by_name = {}
        details: dict[str, Any] = {"heads": policy}
        config_updates: dict[str, Any] = {}
        if not merged_heads:
            head_plan = plan_heads(ctx, heads, policy)
            by_name = {entry.name: entry for entry in head_plan.entries}
            details.update(head_plan.details)
            config_updates = head_plan.config_updates
        weights = ctx.normalised_weights()
        counts = tuple((ctx.statistics_index(i), "samples") for i in range(len(ctx.sources)))
        fisher = set(self._fisher_names(ctx, merged_heads))
        entries = []
        for name, info in ctx.anchor.tensors.items():
            if name in by_name:
                entries.append(by_name[name])
            elif name in fisher:
                fishers = tuple((ctx.statistics_index(i), f"fisher/{name}") for i in range(len(ctx.sources)))
                op = FisherWeighted(ctx.refs(name), fishers, counts, weights, float(ctx.params["epsilon"]))
                entries.append(ctx.plan_entry(info, op))
            else:
                op = LinearCombination(ctx.refs(name), weights, group="averaged (buffers)")
                entries.append(ctx.plan_entry(info, op))
        details["weights"] = list(weights)
        return MergePlan(entries, config_updates=config_updates, details=details)
