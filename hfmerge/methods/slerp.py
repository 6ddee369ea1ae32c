"""Spherical linear interpolation (SLERP) of two models, tensor by tensor, as mergekit does it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.methods.base import MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan

DOT_THRESHOLD = 0.9995
"""mergekit's bound on |cos Ω| above which two tensors count as parallel and are interpolated linearly."""
NORM_EPS = 1e-8
"""mergekit's: a tensor whose norm is at most this is not normalised before the cosine is taken."""


def slerp(t: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The point at ``t`` on the great-circle arc from ``first`` to ``second``, each taken as one flat vector.

    Shoemake (1985): slerp(t) = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁ with cos Ω = ⟨v₀, v₁⟩/(‖v₀‖‖v₁‖);
    the original tensors (not their unit vectors) are combined, so the norm follows the arc only when
    ‖v₀‖ = ‖v₁‖. As mergekit's ``slerp``: Ω from the whole tensor whatever its number of dimensions
    (1-D biases and norms included), a vector of norm ≤ 1e-8 left unnormalised (its cosine with anything is
    then ≈ 0), and ``lerp`` when |cos Ω| > 0.9995 (parallel or antiparallel), where sin Ω is too small to divide
    by. The linear fallback is ``torch.lerp``: exactly v₀ at t = 0, v₁ at t = 1 and v at v₀ = v₁ = v.
    """
    import math

    import torch

    first_norm, second_norm = float(torch.linalg.vector_norm(first)), float(torch.linalg.vector_norm(second))
    first_unit = first / first_norm if first_norm > NORM_EPS else first
    second_unit = second / second_norm if second_norm > NORM_EPS else second
    cosine = float(torch.sum(first_unit * second_unit))
    if abs(cosine) > DOT_THRESHOLD:
        return torch.lerp(first, second, t)
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    return (math.sin(omega - omega * t) / sin_omega) * first + (math.sin(omega * t) / sin_omega) * second


@dataclass(frozen=True)
class SlerpTensor:
    """slerp(t; θ₁, θ₂) of one tensor, computed in float64."""

    first: TensorRef
    second: TensorRef
    t: float
    group: str = "spherical interpolation"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        first, second = load(self.first).to(torch.float64), load(self.second).to(torch.float64)
        return slerp(self.t, first, second).to(torch.float32)


@register_method
class Slerp(MergeMethod):
    """θ = slerp(t; θ₁, θ₂) per tensor: θ₁ at t = 0, θ₂ at t = 1.

    Spherical linear interpolation (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985)
    applied to weights as mergekit does it (``mergekit/merge_methods/slerp.py``, which cites the Wikipedia
    article on Slerp): each tensor is one vector, interpolated along the arc between the two sources'
    directions, or linearly when they are nearly parallel (:func:`slerp`). There is no base model; θ₁ is the
    first source given, θ₂ the second (mergekit's base model plays θ₁).

    Not every tensor is a direction. BatchNorm running means and variances are statistics of activations:
    they are interpolated linearly, (1 − t)·θ₁ + t·θ₂, which keeps variances positive. Integer buffers
    (``num_batches_tracked``) are the anchor's (the first source unless ``--heads anchor --anchor``).
    Classifier heads over one label set are interpolated like every other tensor; heads over different
    label sets follow the head policy (:mod:`hfmerge.methods.heads`), as for ``average``.
    """

    name = "slerp"
    title = "Spherical linear interpolation (SLERP) of two models"
    reference = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (as mergekit applies it to weights)"
    reference_url = "https://doi.org/10.1145/325165.325242"
    parameters = (
        ParamSpec("t", float, 0.5, "interpolation position: 0 gives the first source, 1 the second "
                  "(mergekit requires it; 0.5 is FusionBench's default; auto: chosen on validation data from 0.1..0.9)",
                  minimum=0.0, maximum=1.0, search=tuple(round(0.1 * i, 1) for i in range(1, 10))),
    )
    max_sources = 2
    card_template = (
        "Per tensor, θ = sin((1 − t)Ω)/sin Ω · θ₁ + sin(tΩ)/sin Ω · θ₂ with t = {{ details.t }}, θ₁ = "
        "`{{ sources[0].name }}`, θ₂ = `{{ sources[1].name }}` and cos Ω = ⟨θ₁, θ₂⟩/(‖θ₁‖‖θ₂‖) over the whole tensor "
        "(spherical interpolation, as mergekit computes it); where |cos Ω| > 0.9995 the tensor is "
        "interpolated linearly, (1 − t)·θ₁ + t·θ₂, and a tensor of norm ≤ 1e-8 is not normalised{% if batch_norm %}. BatchNorm "
        "running statistics are interpolated linearly; integer buffers (BatchNorm's "
        "`num_batches_tracked`) are the anchor's{% endif %}"
        "{% if details.heads == 'concat' %}. The heads follow the `concat` head policy: stacked into one head "
        "over the union of the {{ details.num_labels }} labels"
        "{% elif details.heads == 'anchor' %}. The heads follow the `anchor` head policy: the anchor's head and "
        "labels are kept{% else %}; classifier heads are interpolated like every other tensor{% endif %}."
    )

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import Copy, LinearCombination
        from hfmerge.engine.plan import MergePlan, require_all_shared
        from hfmerge.methods.heads import head_policy, labels_agree, plan_heads
        from hfmerge.methods.task_vectors import is_running_statistic

        t = float(ctx.params["t"])
        policy = head_policy(ctx)
        heads = [info.name for info in ctx.anchor.head_tensors]
        # one label set under `average`: the heads are weights like the others; otherwise the policy's
        handed = [] if policy == "average" and labels_agree(ctx.sources) else heads
        require_all_shared(ctx, self.name, except_names=handed)
        head_plan = plan_heads(ctx, handed, policy)
        by_name = {entry.name: entry for entry in head_plan.entries}
        entries = []
        for name, info in ctx.anchor.tensors.items():
            first, second = ctx.refs(name)
            if name in by_name:
                entries.append(by_name[name])
            elif info.is_integer:
                entries.append(ctx.plan_entry(info, Copy((ctx.anchor_index, info.key))))
            elif is_running_statistic(name):
                op = LinearCombination((first, second), (1.0 - t, t),
                                       group="interpolated linearly (normalisation statistics)")
                entries.append(ctx.plan_entry(info, op))
            else:
                entries.append(ctx.plan_entry(info, SlerpTensor(first, second, t)))
        return MergePlan(entries, config_updates=head_plan.config_updates,
                         details={"t": t, "heads": policy, **head_plan.details})
