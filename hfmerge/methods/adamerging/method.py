"""AdaMerging: task arithmetic whose coefficients are learned by entropy minimisation on unlabeled data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hfmerge.errors import IncompatibleModelsError
from hfmerge.methods.adamerging.op import COEFFICIENTS, STAGE, AdaMergingOp
from hfmerge.methods.base import (
    TASK_VECTOR_CARD_NOTES,
    MergeMethod,
    ParamSpec,
    register_method,
    require_image_classifiers,
)

if TYPE_CHECKING:
    from hfmerge.adapters.layout import ModelLayout, TensorInfo
    from hfmerge.engine.ops import TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.methods.stages import Stage


@register_method
class AdaMerging(MergeMethod):
    """AdaMerging (Yang et al., ICLR 2024, §3.2): task arithmetic with learned, per-source coefficients.

    Task-wise (``granularity=task``): θ = θ_base + Σᵢ λᵢ τᵢ, one λᵢ per source i. Layer-wise
    (``granularity=layer``): θˡ = θ_baseˡ + Σᵢ λᵢˡ τᵢˡ, one λᵢˡ per source and layer l. A layer is
    one parameter tensor, as in the paper's code (EnnengYang/AdaMerging,
    ``src/main_layer_wise_adamerging.py``: one coefficient per entry of the state dict) and in FusionBench
    (``LayerWiseMergedModel``: one per parameter); a weight and its bias are two layers.

    The coefficients minimise the Shannon entropy H(p) = −Σ_c p_c log p_c of the merged model's
    predictions on unlabeled images of every task (the paper's surrogate objective, §3.2): each step
    takes a batch of each source's ``--data`` through the merged backbone and that source's own
    classifier head, and adds the batches' mean entropies (the training stage,
    :class:`~hfmerge.methods.adamerging.training.LearnCoefficients`). The defaults are the paper's and
    its code's: λ starts at the prior 0.3 (the code's ``prior``; task arithmetic's λ), Adam with
    learning rate 1e-3 and β = (0.9, 0.999), batches of 16 images, 500 steps, and the coefficients
    clamped to [0, 1] where the merged model reads them (the code's ``lambdas()``; FusionBench's configs
    turn the clamp off and run 1000 steps). The official script reads two batches of 16 per task per
    step (its loop breaks after ``i > 0``); here each step reads one batch of ``batch_size``.

    Which tensors are task vectors, and what becomes of the rest (BatchNorm statistics averaged, integer
    buffers the anchor's, heads the base lacks or labels differently by the head policy), is task
    arithmetic's (:func:`~hfmerge.methods.task_vectors.plan_task_vectors`); a head that is a task vector
    (the base has the sources' labels) gets its coefficient like any tensor, and every task then reads
    that merged head. The output is an ordinary model of the sources' architecture.

    Memory: learning the coefficients holds the base, the N task vectors (in the checkpoint's dtype)
    and one model at once, since every step rebuilds the whole merged model from them; that is
    inherent to the method (the merge itself then streams, tensor by tensor).
    """

    name = "adamerging"
    title = "AdaMerging (task-vector coefficients learned by entropy minimisation)"
    reference = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024"
    reference_url = "https://arxiv.org/abs/2310.02575"
    needs_base = True
    min_sources = 1
    parameters = (
        ParamSpec("granularity", str, "task", "task: one coefficient per source (task-wise AdaMerging); layer: one "
                  "per source and parameter tensor (layer-wise)", choices=("task", "layer")),
        ParamSpec("prior", float, 0.3, "initial value of every coefficient (the paper's code: 0.3)"),
        ParamSpec("steps", int, 500, "Adam steps (the paper's code: 500; 0: task arithmetic with λ = prior)",
                  minimum=0),
        ParamSpec("learning_rate", float, 1e-3, "Adam's learning rate (the paper: 1e-3, β = (0.9, 0.999))",
                  minimum=0.0),
        ParamSpec("batch_size", int, 16, "images of each source's data per step (the paper: 16)", minimum=1),
        ParamSpec("clamp", bool, True, "clamp the coefficients to [0, 1] where the model reads them (the paper's "
                  "code; FusionBench: false)"),
        ParamSpec("samples", int, 0, "images of each source's data the batches are drawn from (0: all)", minimum=0),
    )
    card_template = """\
{% set learned = details.adamerging -%}
θ = θ_base + Σᵢ λᵢ τᵢ, where τᵢ = θᵢ − θ_base is the task vector of source i and θ_base the pre-trained model \
{% if base.url %}[{{ base.name }}]({{ base.url }}){% else %}`{{ base.name }}`{% endif %}, \
{%- if details.granularity == 'layer' %} with one coefficient λᵢˡ per source for each of the \
{{ details.learned_tensors }} task-vector tensors (layer-wise AdaMerging; a layer is one parameter tensor, as in \
the paper's code){% else %} with one coefficient λᵢ per source for all {{ details.learned_tensors }} task-vector \
tensors (task-wise AdaMerging){% endif %}. The coefficients start at λ = {{ details.prior }} and are learned by \
minimising the Shannon entropy H = −Σ_c p_c log p_c of the merged model's predictions on each source's unlabeled \
data (§3.2 of the paper), \
{%- if details.heads == 'task vectors' %} every source's images going through the merged model, whose classifier \
head is a task vector too{% else %} each source's images going through that source's own classifier head on the \
merged backbone{% endif %}: {{ learned.steps }} Adam steps (learning rate {{ learned.learning_rate }}, \
β = (0.9, 0.999)), each on a batch of at most {{ learned.batch_size }} images of every source\
{%- if learned.clamp %}, the coefficients clamped to [0, 1]{% endif %}. \
{%- if learned.steps %} The objective (the batches' mean entropies summed over the sources) was \
{{ '%.4f' | format(learned.objective_start) }} at the first step and {{ '%.4f' | format(learned.objective_end) }} \
at the last.{% else %} With `steps=0` nothing was learned: this is task arithmetic with λ = {{ details.prior }}.\
{% endif %}

{% if details.granularity == 'layer' -%}
| source | mean λ | min λ | max λ |
|---|---|---|---|
{% for source in sources -%}
| {{ source.name }} | {{ '%.4f' | format(learned.summary[loop.index0].mean) }} | \
{{ '%.4f' | format(learned.summary[loop.index0].min) }} | {{ '%.4f' | format(learned.summary[loop.index0].max) }} |
{% endfor %}
![AdaMerging's coefficient of each tensor, per source]({{ learned.plot }})

Every tensor's coefficients are in `{{ learned.file }}`.
{%- else -%}
| source | λ |
|---|---|
{% for source in sources -%}
| {{ source.name }} | {{ '%.4f' | format(learned.coefficients[loop.index0]) }} |
{% endfor %}{% endif %}

""" + TASK_VECTOR_CARD_NOTES

    def stages(self, ctx: MergeContext) -> list[Stage]:
        """The coefficients' training, on each source's own data (one dataset per source)."""
        from hfmerge.methods.adamerging.training import LearnCoefficients

        samples = int(ctx.params.get("samples") or 0)
        return [LearnCoefficients(
            granularity=str(ctx.params.get("granularity", "task")), prior=float(ctx.params.get("prior", 0.3)),
            steps=int(ctx.params.get("steps", 500)), learning_rate=float(ctx.params.get("learning_rate", 1e-3)),
            batch_size=int(ctx.params.get("batch_size", 16)), clamp=bool(ctx.params.get("clamp", True)),
            samples=samples or None,
        )]

    def check_sources(self, layouts: list[ModelLayout], parameters: dict[str, Any]) -> None:
        """Image classifiers only: the entropy minimised is that of class predictions."""
        require_image_classifiers(layouts, "adamerging minimises the entropy of class predictions", "task_arithmetic")

    def plan(self, ctx: MergeContext) -> MergePlan:
        """Task arithmetic's plan, each task vector's tensor reading its coefficients from the stage's table.

        Raises:
            IncompatibleModelsError: the sources are not image classifiers (the entropy is that of class
                predictions), or no tensor is a task vector.
        """
        from hfmerge.methods.task_vectors import plan_task_vectors

        self.check_sources(ctx.sources, ctx.params)
        layer = ctx.params["granularity"] == "layer"
        table: TensorRef = (STAGE, COEFFICIENTS)
        learned: list[str] = []

        def make_op(info: TensorInfo, base: TensorRef, sources: tuple[TensorRef, ...]) -> AdaMergingOp:
            learned.append(info.name)
            return AdaMergingOp(base, sources, table, len(learned) - 1 if layer else 0)

        details = {"granularity": ctx.params["granularity"], "prior": float(ctx.params["prior"])}
        plan = plan_task_vectors(ctx, self.name, make_op, details)
        if not learned:
            raise IncompatibleModelsError(
                f"no tensor of {ctx.anchor.source.short_name} is a task vector (none is shared with the base "
                f"{ctx.base.source.name if ctx.base else ''}); give as --base the model the sources were fine-tuned from"
            )
        plan.details["learned_tensors"] = len(learned)
        return plan
