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

    where scaling the off-diagonal entries by α < 1 regularises the solve. This
    is :class:`RegMeanGroup`'s computation on full matrices held in memory (the
    merge's op reads packed ones from the statistics tables).

    Args:
        weights: PyTorch ``Linear.weight`` tensors, each out × in.
        grams: the Gram matrix G_i of each layer's inputs, each in × in.
        alpha: the off-diagonal scale α in [0, 1] (0: a diagonal, weighted average; 1: no regularisation).

    Returns:
        The merged weight, out × in, in float32.
    """
    import torch

    from hfmerge.engine.statistics import pack_upper

    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean_linear needs one Gram matrix per weight, got {len(weights)} and {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tables: dict[TensorRef, torch.Tensor] = {}
    for i, (weight, gram) in enumerate(zip(weights, grams)):
        tables[(i, "weight")] = weight
        tables[(i, "gram")] = pack_upper(gram.to(torch.float64))
    count = len(weights)
    group = RegMeanGroup(("linear",), {"linear": tuple((i, "weight") for i in range(count))},
                         tuple((i, "gram") for i in range(count)), alpha)
    return group.solve(tables.__getitem__)["linear"]


def cholesky_factor(total: torch.Tensor, *, name: str = "") -> torch.Tensor:
    """The lower Cholesky factor of Σ G̃_i (never an explicit inverse), regularised when it is singular.

    A singular Σ G̃_i (α = 1 with fewer rows than features, or inputs that are
    linearly dependent; a feature no sample excited is set aside before, by
    :class:`RegMeanGroup`) is regularised with a ridge of 1e-6 of its mean
    diagonal, retried with larger ridges until the factorisation succeeds; a
    warning says so. The solution is then never NaN.
    """
    import torch

    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        return factor
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
    return factor


def regularise_packed(packed: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G) of a packed upper triangle (:func:`~hfmerge.engine.statistics.pack_upper`), in float64.

    The off-diagonal entries are scaled by α and the diagonal is kept as it
    is, which is what the formula gives; a new tensor, ``packed`` is left alone.
    RegMean's regularisation is linear, so Σ G̃_i is the regularised Σ G_i.
    """
    import torch

    from hfmerge.engine.statistics import packed_diagonal, packed_order

    diagonal = packed_diagonal(packed_order(packed.shape[0]))
    scaled = packed.to(torch.float64) * alpha
    scaled[diagonal] = packed[diagonal].to(torch.float64)
    return scaled


class RegMeanGroup:
    """RegMean (Jin et al., 2023, Eq. 5) for the linear layers of one shared-input group, solved together.

    Linear layers that read one input (an attention's query, key and value)
    have one Gram matrix G_i per source, so one Σ G̃_i and one Cholesky
    factorisation serve them all: their weights are stacked, W = [W_q; W_k; W_v],
    and solved in one go. With source 0 as the reference, Eq. 5 is computed as

        Wᵀ = W_0ᵀ + (Σ_i G̃_i)⁻¹ Σ_{i≥1} G̃_i (W_i − W_0)ᵀ,

    the same solution (Σ_i G̃_i W_0ᵀ moved out of the sum), one product fewer,
    and exact where it should be: identical sources give W_0 bit for bit. The
    packed Gram triangles are summed before anything is unpacked, everything in
    float64; memory holds a few in × in matrices whatever the number of sources.

    An input feature that no sample excited (zero in every G_i) leaves Eq. 5
    undefined for its weights: they are the sources' average, the other
    weights are solved exactly without it, and a warning says so. Any other
    singular Σ G̃_i (α = 1 with fewer rows than features) gets a small ridge
    (:func:`cholesky_factor`).

    Each member's :class:`RegMeanLinear` asks for its own weight; the first one
    asked solves the group and keeps the others' results until they are asked for.
    """

    def __init__(self, modules: tuple[str, ...], weights: dict[str, tuple[TensorRef, ...]],
                 grams: tuple[TensorRef, ...], alpha: float) -> None:
        self.modules = modules
        self.weights = weights
        self.grams = grams
        self.alpha = alpha
        self._solved: dict[str, torch.Tensor] = {}

    def solved(self, module: str, load: Loader) -> torch.Tensor:
        """The merged ``module.weight`` (out × in, float32)."""
        if module not in self._solved:
            self._solved = self.solve(load)
        return self._solved.pop(module)

    def solve(self, load: Loader) -> dict[str, torch.Tensor]:
        """Every member's merged weight, by module."""
        import torch

        from hfmerge.engine.statistics import packed_diagonal, packed_order, unpack_gram

        total: torch.Tensor | None = None
        for ref in self.grams:
            packed = load(ref)
            total = packed.to(torch.float64, copy=True) if total is None else total.add_(packed)
        assert total is not None
        regularised = regularise_packed(total, self.alpha)
        del total
        diagonal = packed_diagonal(packed_order(regularised.shape[0]))
        # An input feature that no sample excited has a zero row and column in every G_i: the data say
        # nothing of its weights. A one on its diagonal keeps it out of the solve of the others, which stays
        # exact (a ridge over the whole matrix would move every weight), and its weights are averaged below.
        dead = regularised[diagonal] == 0
        any_dead = bool(dead.any())
        if any_dead:
            regularised[diagonal[dead]] = 1.0
            logger.warning(
                "RegMean: %d of the %d input features of %s were never excited by the data (zero in every "
                "source's Gram matrix); their weights are the sources' average", int(dead.sum()), len(dead),
                ", ".join(self.modules),
            )
        factor = cholesky_factor(unpack_gram(regularised), name=self.modules[0])
        del regularised

        def stacked(source: int) -> torch.Tensor:
            return torch.cat([load(self.weights[m][source]) for m in self.modules]).to(torch.float64)

        parts = [load(self.weights[m][0]) for m in self.modules]
        sizes = [len(part) for part in parts]
        reference = torch.cat(parts).to(torch.float64)  # W_0 stacked: (Σ out) × in
        del parts
        dead_sum = reference[:, dead].clone() if any_dead else None
        rhs: torch.Tensor | None = None
        for i in range(1, len(self.grams)):
            weights = stacked(i)
            if dead_sum is not None:
                dead_sum.add_(weights[:, dead])
            gram = unpack_gram(regularise_packed(load(self.grams[i]), self.alpha))
            product = gram @ (weights - reference).T  # G̃_i (W_i − W_0)ᵀ: in × Σ out
            del gram, weights
            rhs = product if rhs is None else rhs.add_(product)
        merged = reference if rhs is None else reference + torch.cholesky_solve(rhs, factor).T
        if dead_sum is not None:
            merged[:, dead] = dead_sum / len(self.grams)
        return dict(zip(self.modules, merged.to(torch.float32).split(sizes)))


@dataclass(frozen=True)
class RegMeanLinear:
    """One ``nn.Linear`` weight of a :class:`RegMeanGroup` (RegMean, Jin et al., 2023, Eq. 5).

    W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ for PyTorch's ``Linear.weight`` (out × in),
    with G_i the Gram matrix of the layer's inputs on source i's data and G̃_i
    its α-regularised form; the group computes it with the layers that share the input.
    """

    solver: RegMeanGroup
    module: str
    group: str = "RegMean (linear layers)"

    def apply(self, load: Loader) -> torch.Tensor:
        return self.solver.solved(self.module, load).contiguous()


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
        from hfmerge.engine.statistics import GRAM_UPPER
        from hfmerge.methods.heads import head_policy, plan_heads

        heads = [info.name for info in ctx.anchor.head_tensors]
        require_all_shared(ctx, self.name, except_names=heads)
        head_plan = plan_heads(ctx, heads, head_policy(ctx))
        by_name = {entry.name: entry for entry in head_plan.entries}
        alpha = float(ctx.params["alpha"])
        for group in linear_groups(ctx):
            grams = tuple((ctx.statistics_index(i), f"{GRAM_UPPER}{group[0]}") for i in range(len(ctx.sources)))
            solver = RegMeanGroup(group, {m: ctx.refs(f"{m}.weight") for m in group}, grams, alpha)
            for module in group:
                info = ctx.anchor.tensors[f"{module}.weight"]
                by_name[info.name] = ctx.plan_entry(info, RegMeanLinear(solver, module))
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
