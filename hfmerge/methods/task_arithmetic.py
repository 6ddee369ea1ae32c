"""Task arithmetic: add scaled task vectors to the pre-trained model."""

from __future__ import annotations

from hfmerge.engine.plan import MergeContext, MergePlan, require_all_shared
from hfmerge.errors import RecipeError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.ops import TaskArithmetic as TaskArithmeticOp


@register_method
class TaskArithmetic(MergeMethod):
    """θ = θ_base + λ Σ_i (θ_i − θ_base).

    Ilharco et al., "Editing models with task arithmetic" (ICLR 2023), §2:
    a task vector is τ_i = θ_i − θ_base; the merge adds their sum scaled by λ.
    Integer buffers are copied from the first source.
    """

    name = "task_arithmetic"
    title = "Task arithmetic"
    reference = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
    reference_url = "https://arxiv.org/abs/2212.04089"
    parameters = (ParamSpec("lambda", float, 0.3, "scale λ of the summed task vectors", minimum=0.0),)
    needs_base = True
    min_sources = 1
    card_template = (
        "θ = θ_base + λ · Σᵢ (θᵢ − θ_base), with λ = {{ details['lambda'] }} and the sum over the "
        "{{ sources | length }} source model{{ 's' if sources | length != 1 }}; θ_base is the pre-trained model "
        "{% if base.url %}[{{ base.name }}]({{ base.url }}){% else %}`{{ base.name }}`{% endif %}. "
        "Each τᵢ = θᵢ − θ_base is the task vector of source i (§2 of the paper). Integer buffers "
        "(BatchNorm's `num_batches_tracked`) are copied from the first source."
    )

    def plan(self, ctx: MergeContext) -> MergePlan:
        if ctx.base is None:
            raise RecipeError(f"method '{self.name}' needs the pre-trained model: add --base org/name")
        require_all_shared(ctx, self.name, ctx.models)
        scale = float(ctx.params["lambda"])
        entries = []
        for name, info in ctx.anchor.tensors.items():
            op = TaskArithmeticOp((ctx.base_index, ctx.base.tensors[name].key), ctx.refs(name), scale)
            entries.append(ctx.plan_entry(info, op))
        return MergePlan(entries, details={"lambda": scale})
