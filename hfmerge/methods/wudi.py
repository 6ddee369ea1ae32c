"""WUDI-Merging: the merged task vector of each weight matrix found by gradient descent on an interference bound.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
Vectors" (ICML 2025), §3: the task vector of a linear layer lies approximately in the span of that layer's
inputs (Proposition 1), so the interference the merged task vector τ causes on task i's inputs is bounded
by ‖(τ − τᵢ) τᵢᵀ‖_F, and the merge minimises, per weight matrix,

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F

with Adam from τ = Σᵢ τᵢ, with no data and no rescaling: θ = θ_base + λ τ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.methods.base import TASK_VECTOR_CARD_NOTES, MergeMethod, ParamSpec, register_method

if TYPE_CHECKING:
    import torch

    from hfmerge.adapters.layout import TensorInfo
    from hfmerge.engine.ops import Loader, MergeOp, TensorRef
    from hfmerge.engine.plan import MergeContext, MergePlan

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s defaults, which the official code leaves as they are."""


def wudi_task_vector(task_matrices: Iterable[torch.Tensor], steps: int, learning_rate: float) -> torch.Tensor:
    """The merged task vector of one weight matrix from its task matrices τᵢ, read one at a time.

    Only A = Σᵢ τᵢᵀτᵢ / ‖τᵢ‖²_F, B = Σᵢ τᵢ τᵢᵀτᵢ / ‖τᵢ‖²_F and Σᵢ τᵢ are kept (∇L(τ) = 2 (τ A − B)), so
    memory does not grow with N. A zero task vector adds nothing: its term of L is zero for every τ
    (the paper's quotient is 0/0 there).
    """
    import torch

    gram = target = start = None
    for tau in task_matrices:
        if start is None:
            gram = torch.zeros(tau.shape[1], tau.shape[1], dtype=tau.dtype)
            target, start = torch.zeros_like(tau), torch.zeros_like(tau)
        start.add_(tau)
        squared_norm = float(torch.sum(tau.double() ** 2))
        if squared_norm > 0.0:
            task_gram = tau.T @ tau / squared_norm
            gram.add_(task_gram)
            target.add_(tau @ task_gram)
    if start is None:
        raise ValueError("WUDI needs at least one task vector")
    return adam_on_interference(start, gram, target, steps, learning_rate)


def adam_on_interference(start: torch.Tensor, gram: torch.Tensor, target: torch.Tensor, steps: int,
                         learning_rate: float) -> torch.Tensor:
    """``steps`` Adam steps (Kingma & Ba, Algorithm 1, as ``torch.optim.Adam`` computes them) on L from ``start``.

    The gradient 2 (τ A − B) is the autograd gradient of L that the official code takes, with the N Gram
    matrices summed once beforehand: one (out × in) · (in × in) product a step instead of N, and memory
    that does not grow with N. No random numbers: the result is a function of the task vectors alone.
    """
    import torch

    tau = start.clone()
    first_moment = torch.zeros_like(tau)
    second_moment = torch.zeros_like(tau)
    beta1, beta2 = ADAM_BETAS
    for step in range(1, steps + 1):
        gradient = 2.0 * (tau @ gram - target)
        first_moment.mul_(beta1).add_(gradient, alpha=1.0 - beta1)
        second_moment.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        step_size = learning_rate / (1.0 - beta1**step)
        denominator = (second_moment.sqrt() / (1.0 - beta2**step) ** 0.5).add_(ADAM_EPS)
        tau.addcdiv_(first_moment, denominator, value=-step_size)
    return tau


@dataclass(frozen=True)
class WudiMatrix:
    """θ = θ_base + λ τ, τ = argmin Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F found by Adam from Σᵢ τᵢ, per weight matrix.

    A convolution kernel is the matrix (out, in·k·k); the task vectors are read one at a time and only their
    Gram sums are kept, so memory is a few matrices of the layer's size whatever the number of sources.

    The steps run in float64. Adam divides each gradient entry by its running RMS, so an entry whose
    gradient is small against the matrix's (where τA and B nearly cancel) takes a whole step of ±lr in
    the direction float32 rounding gives it: on tiny ResNets, float32 and float64 runs part by up to 1e-5,
    the size of one step. In float64 the result is the task vectors' alone, on any BLAS.
    """

    base: TensorRef
    sources: tuple[TensorRef, ...]
    steps: int
    learning_rate: float
    scale: float
    group: str = "WUDI: base + λ·τ (Adam on the interference loss)"

    def apply(self, load: Loader) -> torch.Tensor:
        import torch

        from hfmerge.methods.task_vectors import as_matrix

        base = load(self.base).to(torch.float64)
        base_matrix = as_matrix(base)
        task_matrices = (as_matrix(load(ref).to(torch.float64)) - base_matrix for ref in self.sources)
        merged = wudi_task_vector(task_matrices, self.steps, self.learning_rate)
        return (base_matrix + self.scale * merged).reshape(base.shape).to(torch.float32)


@register_method
class Wudi(MergeMethod):
    """WUDI-Merging (Cheng et al., ICML 2025, §3: its objective and Adam solution).

    Per weight matrix (an ``nn.Linear`` weight, or a convolution kernel as the matrix (out, in·k·k):
    :func:`~hfmerge.methods.task_vectors.is_weight_matrix`), with τᵢ = θᵢ − θ_base,

        τ* ≈ argmin_τ Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,    θ = θ_base + λ τ*,

    τ* being ``steps`` Adam steps of learning rate ``lr`` from τ = Σᵢ τᵢ. Defaults from the official code
    (github.com/nathanielyvo/WUDI-Merging, ``vit/wudi_main.py``): 300 steps (its ``--iter``), lr 1e-5,
    λ = 1 (``scaling_coef=1``), the squared norm in the denominator. FusionBench
    (``fusion_bench/method/wudi/wudi.py``) does the same with 400 steps in its configuration.

    Choices where the code and this implementation part:

    - Other tensors (biases, norms, embeddings, position tensors) are θ_base + (1/N) Σᵢ τᵢ, the mean task
      vector, as FusionBench does. The official ViT code keeps them at θ_base (its task vector holds only
      the blocks' linear weights).
    - Convolution kernels are matrices (out, in·k·k) by default: a convolution is a linear layer on its
      unfolded input patches, so Proposition 1 holds for it as written. The official code and FusionBench
      (2-D tensors only) leave ViT's patch-embedding convolution out; ``convolutions=false`` does too
      (it is then a mean task vector), and leaves a ResNet nothing but its classifier to optimise.
    - A zero task vector (a source equal to the base) contributes nothing instead of 0/0.
    - L is quadratic: its minimiser solves τ A = B, A = Σᵢ τᵢᵀτᵢ/‖τᵢ‖², B = Σᵢ τᵢτᵢᵀτᵢ/‖τᵢ‖². Adam with
      lr 1e-5 moves each entry by about lr per step (at most ≈3.2·lr), so 300 steps move it a few 1e-3 from Σᵢ τᵢ: the
      paper's procedure, not the exact minimiser, is what is computed.

    BatchNorm running statistics are averaged, integer buffers copied and heads the base lacks follow the
    head policy, as for every task-vector method (:mod:`hfmerge.methods.task_vectors`).
    """

    name = "wudi"
    title = "WUDI-Merging (data-free interference minimisation)"
    reference = ("Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
                 "via Task Vectors, ICML 2025")
    reference_url = "https://arxiv.org/abs/2503.08099"
    parameters = (
        ParamSpec("steps", int, 300, "Adam steps per weight matrix (official code's --iter default; "
                  "FusionBench's configuration uses 400)", minimum=0),
        ParamSpec("lr", float, 1e-5, "Adam learning rate (official code)", minimum=0.0),
        ParamSpec("lambda", float, 1.0, "scale λ of the optimised task vector of each weight matrix "
                  "(the official code's scaling_coef=1)", minimum=0.0),
        ParamSpec("convolutions", bool, True, "treat convolution kernels as matrices (out, in·k·k); false: "
                  "as other tensors, as the official code and FusionBench do for ViT's patch embedding"),
    )
    needs_base = True
    min_sources = 1
    card_template = (
        "Per weight matrix (linear layers{% if details.convolutions %}, and convolution kernels as matrices "
        "(out, in·k·k){% endif %}; {{ details.matrices }} tensors), the merged task vector τ minimises "
        "Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F over the task vectors τᵢ = θᵢ − θ_base, found by "
        "{{ details.steps }} Adam steps of learning rate {{ details.lr }} from τ = Σᵢ τᵢ, and "
        "θ = θ_base + λ τ with λ = {{ details['lambda'] }}"
        "{% if base %}, base model `{{ base.name }}`{% endif %}. Every other tensor (biases, norms, embeddings) "
        "is θ_base + (1/{{ sources | length }}) Σᵢ τᵢ, the mean task vector. Integer buffers are the anchor's. "
    ) + TASK_VECTOR_CARD_NOTES

    def plan(self, ctx: MergeContext) -> MergePlan:
        from hfmerge.methods.task_arithmetic import TaskArithmeticOp
        from hfmerge.methods.task_vectors import is_weight_matrix, plan_task_vectors

        steps, lr, scale = int(ctx.params["steps"]), float(ctx.params["lr"]), float(ctx.params["lambda"])
        convolutions = bool(ctx.params["convolutions"])
        mean = 1.0 / len(ctx.sources)
        matrices = []

        def make_op(info: TensorInfo, base: TensorRef, sources: tuple[TensorRef, ...]) -> MergeOp:
            if is_weight_matrix(ctx.anchor, info) and (convolutions or len(info.shape) == 2):
                matrices.append(info.name)
                return WudiMatrix(base, sources, steps, lr, scale)
            return TaskArithmeticOp(base, sources, mean, group="base + mean task vector")

        plan = plan_task_vectors(ctx, self.name, make_op, {"steps": steps, "lr": lr, "lambda": scale,
                                                           "convolutions": convolutions})
        plan.details["matrices"] = len(matrices)
        return plan
