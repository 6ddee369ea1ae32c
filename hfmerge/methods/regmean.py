"""RegMean: every linear layer solved in closed form from the Gram matrices of its inputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.errors import IncompatibleModelsError, MergeNumericError
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.methods.stages import Stage, Statistics

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.ops import Loader, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.engine.statistics import StatisticsRequest

logger = logging.getLogger(__name__)


def regmean_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9) -> torch.Tensor:
    """Merge ``nn.Linear`` weights with RegMean (Jin et al., 2023, Eq. 5; vit-gating-merge appendix A).

    RegMean finds the W minimising Σ_i ‖X_i W − X_i W_iᵀ‖² over the inputs X_i
    each model i saw on its own data (x·W orientation, W: in × out). The
    closed form is

        W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,   G̃_i = α G_i + (1 − α) diag(G_i),   G_i = X_iᵀ X_i,

    where scaling the off-diagonal entries by α < 1 regularises the solve. It
    is computed in float64 with a Cholesky solve, never an explicit inverse; a
    singular Σ G̃_i gets a small ridge and a warning.

    Args:
        weights: PyTorch ``Linear.weight`` tensors, each out × in.
        grams: the Gram matrix G_i of each layer's inputs, each in × in.
        alpha: the off-diagonal scale α in [0, 1] (0: a diagonal, weighted average; 1: no regularisation).

    Returns:
        The merged weight, out × in, in float32.
    """
    import torch

    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean_linear needs one Gram matrix per weight, got {len(weights)} and {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total, scaled = regularised_sum_of_grams(grams, alpha)
    rhs = sum(g @ w.to(torch.float64).T for g, w in zip(scaled, weights))
    return solve_gram_system(total, rhs).T.to(torch.float32).contiguous()


def regularised_sum_of_grams(grams: Sequence[torch.Tensor], alpha: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """G̃_i = α G_i + (1 − α) diag(G_i) for each Gram matrix, in float64, and their sum.

    RegMean's regularisation (Jin et al., 2023, §3.2; the ViT paper's appendix A):
    the off-diagonal entries of every Gram matrix are scaled by α, which keeps
    Σ G̃_i positive definite whenever every input feature was seen (α < 1).
    """
    import torch

    scaled = []
    for gram in grams:
        g = gram.to(torch.float64)
        scaled.append(alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g)))
    total = scaled[0].clone()
    for g in scaled[1:]:
        total.add_(g)
    return total, scaled


def solve_gram_system(total: torch.Tensor, rhs: torch.Tensor, *, name: str = "") -> torch.Tensor:
    """X with (Σ G̃_i) X = rhs, by a Cholesky factorisation (never an explicit inverse).

    A singular Σ G̃_i (an input feature no sample ever excited, or α = 1 with
    fewer rows than features) is regularised with a ridge of 1e-6 of its mean
    diagonal, retried with larger ridges until the factorisation succeeds; a
    warning says so. The result is never NaN.
    """
    import torch

    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        scale = float(torch.diagonal(total).abs().mean()) or 1.0
        ridge = 1e-6 * scale
        eye = torch.eye(total.shape[0], dtype=total.dtype)
        for _ in range(12):
            factor, info = torch.linalg.cholesky_ex(total + ridge * eye)
            if int(info) == 0:
                break
            ridge *= 10.0
        else:
            raise MergeNumericError(
                f"RegMean: the summed Gram matrix{f' of {name}' if name else ''} is not finite or not positive "
                "semi-definite; check the sources' outputs on the data for NaN/inf"
            )
        logger.warning(
            "RegMean: the summed Gram matrix%s is singular (an input feature the data never excited); "
            "regularised with a ridge of %.3g",
            f" of {name}" if name else "", ridge,
        )
    return torch.cholesky_solve(rhs, factor)


@dataclass(frozen=True)
class RegMeanLinear:
    """RegMean (Jin et al., 2023, Eq. 5; the ViT paper's appendix A) for one ``nn.Linear`` weight.

    W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ in the x·W orientation, i.e. for PyTorch's
    ``Linear.weight`` (out × in): W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹, with G_i the
    Gram matrix of the layer's inputs on source i's data (a statistics
    reference) and G̃_i its α-regularised form. Sources are accumulated one at
    a time, so memory holds two in×in matrices whatever their number.
    """

    sources: tuple[TensorRef, ...]
    grams: tuple[TensorRef, ...]
    alpha: float
    group: str = "RegMean (linear layers)"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        total: torch.Tensor | None = None
        rhs: torch.Tensor | None = None
        for weight_ref, gram_ref in zip(self.sources, self.grams):
            _, (g,) = regularised_sum_of_grams([load(gram_ref)], self.alpha)
            product = g @ load(weight_ref).to(torch.float64).T  # G̃_i W_iᵀ: in × out
            total = g if total is None else total.add_(g)
            rhs = product if rhs is None else rhs.add_(product)
        assert total is not None and rhs is not None
        return solve_gram_system(total, rhs, name=self.sources[0][1]).T.to(torch.float32).contiguous()


def linear_groups(ctx: MergeContext) -> list[tuple[str, ...]]:
    """The groups of shared, non-head linear layers, as (module, ...) sharing one input (so one Gram matrix)."""
    anchor = ctx.anchor
    heads = {info.module for info in anchor.head_tensors}
    groups = []
    for group in anchor.linear_groups:
        kept = tuple(m for m in group if m not in heads and ctx.is_shared(f"{m}.weight"))
        if kept:
            groups.append(kept)
    return groups


def gram_request(groups: Sequence[tuple[str, ...]]) -> StatisticsRequest | None:
    """The statistics RegMean reads: the Gram matrix of each group's input (``None``: no group)."""
    from hfmerge.engine.statistics import StatisticsRequest

    return StatisticsRequest(grams=tuple(group[0] for group in groups)) if groups else None


@register_method
class RegMean(MergeMethod):
    """RegMean (Jin et al., ICLR 2023), as the ViT gating paper applies it (appendix A).

    Every ``nn.Linear`` of the shared backbone is solved in closed form from the
    Gram matrices of its inputs, each computed on its source's own data
    (:func:`regmean_linear`); linear layers that read one input (q, k and v of an
    attention) share one Gram matrix. Everything else — biases, convolutions,
    norms, embeddings — is averaged as in ``average``; classifier heads follow
    the head policy (:mod:`hfmerge.methods.heads`).
    """

    name = "regmean"
    title = "RegMean (closed-form merging of linear layers from input Gram matrices)"
    reference = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023"
    reference_url = "https://arxiv.org/abs/2212.09849"
    uses_weights = False
    parameters = (
        ParamSpec("alpha", float, 0.9, "scale of the Gram matrices' off-diagonal entries (regularisation)",
                  minimum=0.0, maximum=1.0),
        ParamSpec("samples", int, 256, "images of each source's data to compute its Gram matrices on", minimum=1),
        ParamSpec("batch_size", int, 32, "images per forward pass of the statistics stage", minimum=1),
        ParamSpec("cache", bool, True, "keep each source's Gram matrices in the statistics cache "
                  "($HF_HOME/hfmerge/statistics, 0.5 GiB per ViT-B source) for the next merge on the same "
                  "models and data; false: hold them in memory and write nothing"),
    )
    card_template = """\
Each linear layer outside the classifier head ({{ details.regmean_layers }} layers) is solved in closed form \
(RegMean, Jin et al. 2023, Eq. 5): W = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ in the x·W orientation, where Gᵢ = XᵢᵀXᵢ is the \
Gram matrix of the layer's inputs (every token of every image) when model i runs on \
{% set images = details.get("statistics_images") %}{% if images and images | unique | list | length == 1 %}\
{{ images[0] }} images{% else %}the images in the Data table{% endif %} of its own data, and G̃ᵢ scales Gᵢ's \
off-diagonal entries by α = {{ parameters.alpha }}. Linear layers that read the same input (such as an \
attention's query, key and value) share one Gram matrix. \
{%- if details.get("multihead_linears") %} The {{ details.multihead_linears }} projections owned by \
`nn.MultiheadAttention` modules, which use their weights without calling them (so no input can be recorded), \
are averaged.{% endif %} Biases, convolutions, normalisation layers and embeddings are averaged with equal weights
{%- if details.heads == 'concat' %}; the classifier heads follow the `concat` head policy: stacked into one \
head over the union of the {{ details.num_labels }} labels
{%- elif details.heads == 'anchor' %}; the classifier head and labels are the anchor's
{%- else %}, classifier heads included{% endif %}."""

    def stages(self, ctx: MergeContext) -> list[Stage]:
        return [Statistics(lambda ctx, i: gram_request(linear_groups(ctx)), samples=ctx.params.get("samples"),
                           batch_size=int(ctx.params.get("batch_size") or 32),
                           cache=bool(ctx.params.get("cache", True)))]

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.engine.ops import LinearCombination
        from hfmerge.engine.plan import MergePlan, require_all_shared
        from hfmerge.methods.heads import head_policy, plan_heads

        heads = [info.name for info in ctx.anchor.head_tensors]
        require_all_shared(ctx, self.name, except_names=heads)
        head_plan = plan_heads(ctx, heads, head_policy(ctx))
        by_name = {entry.name: entry for entry in head_plan.entries}
        alpha = float(ctx.params["alpha"])
        for group in linear_groups(ctx):
            grams = tuple((ctx.statistics_index(i), f"gram/{group[0]}") for i in range(len(ctx.sources)))
            for module in group:
                info = ctx.anchor.tensors[f"{module}.weight"]
                by_name[info.name] = ctx.plan_entry(info, RegMeanLinear(ctx.refs(info.name), grams, alpha))
        uniform = tuple(1.0 / len(ctx.sources) for _ in ctx.sources)
        entries = [
            by_name.get(name) or ctx.plan_entry(info, LinearCombination(ctx.refs(name), uniform))
            for name, info in ctx.anchor.tensors.items()
        ]
        layers = sum(len(g) for g in linear_groups(ctx))
        if layers == 0:
            raise IncompatibleModelsError(
                f"regmean solves linear layers, and {ctx.anchor.source.short_name} ({ctx.anchor.architecture}) has "
                "none outside its classifier head: it would be a plain average; use --method average"
            )
        multihead = [m for m, cls in ctx.anchor.module_classes.items() if cls.__name__ == "MultiheadAttention"]
        details = {"regmean_layers": layers, "multihead_linears": 2 * len(multihead), **head_plan.details}
        return MergePlan(entries, config_updates=head_plan.config_updates, details=details)
