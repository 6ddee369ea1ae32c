"""DARE: drop and rescale task-vector entries, then merge (Yu et al., ICML 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hfmerge.errors import RecipeError
from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergeContext, MergePlan


DARE_DROP_RATE_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Drop rates searched on validation data: 0.1 to 0.9 in steps of 0.2 (hfmerge's choice; the paper reports
results over a range of drop rates up to 0.99 rather than one grid)."""


@register_method
class Dare(MergeMethod):
    """Drop And REscale (§3, Eq. 2), then task arithmetic or TIES's sign election.

    For each task vector τ_i = θ_i − θ_base, each entry is dropped with
    probability p and the kept ones are multiplied by 1/(1 − p), which keeps
    the expectation of τ_i: τ̃_i = (1 − m_i) ⊙ τ_i / (1 − p), m_i ~ Bernoulli(p).
    Then ``sign=sum`` gives θ = θ_base + λ Σ_i τ̃_i (task arithmetic, as the
    paper's DARE + Task Arithmetic) and ``sign=ties`` elects each entry's sign
    γ = sgn(Σ_i τ̃_i) and takes the mean of the τ̃_i whose sign is γ (DARE +
    TIES, §4). The masks come from a generator seeded by (seed, tensor key,
    source index), so a merge is reproducible byte for byte whatever the order
    tensors and sources are read in.
    """

    name = "dare"
    title = "DARE (drop and rescale task vectors)"
    reference = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024"
    reference_url = "https://arxiv.org/abs/2311.03099"
    parameters = (
        ParamSpec("drop_rate", float, 0.9, "probability p of dropping each task-vector entry (0 <= p < 1)",
                  minimum=0.0, maximum=1.0, search=DARE_DROP_RATE_GRID),
        ParamSpec("sign", str, "sum", "how the rescaled task vectors combine: sum (task arithmetic) or ties",
                  choices=("sum", "ties")),
        ParamSpec("lambda", float, 1.0, "scale λ of the merged task vector", minimum=0.0),
    )
    needs_base = True
    uses_seed = True
    min_sources = 1
    card_template = (
        "Per tensor, each entry of each task vector τ_i = θ_i − θ_base is dropped with probability "
        "p = {{ details.drop_rate }} and the kept entries are multiplied by 1/(1 − p) (τ̃_i; random masks seeded "
        "by seed {{ details.seed }}, the tensor's name and the source's position). "
        "{% if details.sign == 'ties' %}Each entry's sign is elected as γ = sgn(Σ_i τ̃_i) and the merged task "
        "vector τ_m is the mean of the τ̃_i whose sign is γ (zeros excluded); θ = θ_base + λ · τ_m"
        "{% else %}θ = θ_base + λ Σ_i τ̃_i{% endif %} with λ = {{ details[\"lambda\"] }}"
        "{% if base %}, base model `{{ base.name }}`{% endif %}. "
    ) + TASK_VECTOR_CARD_NOTES

    def validate_parameters(self, given: dict[str, Any]) -> dict[str, Any]:
        params = super().validate_parameters(given)
        if params["drop_rate"] >= 1.0:
            raise RecipeError(
                f"parameter 'drop_rate' of method 'dare' must be below 1 (kept entries are rescaled by 1/(1 − p)), "
                f"got {params['drop_rate']}"
            )
        return params

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_vectors import DisjointMerge, plan_task_vectors

        drop_rate, sign, scale = float(ctx.params["drop_rate"]), str(ctx.params["sign"]), float(ctx.params["lambda"])
        seed = ctx.seed or 0
        return plan_task_vectors(
            ctx, self.name,
            lambda info, base, sources: DisjointMerge(base, sources, scale, "drop", sign, drop_rate=drop_rate,
                                                      seed=seed, key=info.key, group=f"DARE: base + λ·{sign}"),
            {"drop_rate": drop_rate, "sign": sign, "lambda": scale, "seed": seed},
        )
