"""AdaMerging's own stage: its coefficients learned by entropy minimisation before the merge (§3.2 of the paper).

The merged model is a function of the coefficients, θ(λ) = θ_base + Σᵢ λᵢ τᵢ (λ per source, or per source
and tensor): every step rebuilds its task-vector tensors from the base and the task vectors, runs a batch
of each source's unlabeled images through it with that source's own classifier head
(``torch.func.functional_call`` on one instance of the anchor's model class), and takes one Adam step on
λ against the sum over the sources of the batches' mean prediction entropy. Under ``accelerate launch``
every process draws the same batches and runs its share of each; the gradients are summed across the
processes before the step, so every process takes the same step, the one a single process would take.

The loop runs on the pipeline's Accelerator (its device, mixed precision, reductions) but is not
:func:`hfmerge.train.train_model`: that is fine-tuning's loop (epochs, AdamW decaying linearly, gradient
clipping, early stopping on held-out labels, each process on its own batches), while the paper's is a
fixed number of constant-rate Adam steps on a few numbers, every step reading every task. The merged
model runs in eval mode (no dropout; BatchNorm on the plan's averaged running statistics), as the
paper's script, which evaluates the model before it trains, leaves it; FusionBench trains in train mode.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any, ClassVar

from hfmerge.errors import DataError
from hfmerge.methods.adamerging.op import (
    COEFFICIENTS,
    COEFFICIENTS_JSON,
    COEFFICIENTS_SVG,
    STAGE,
    AdaMergingOp,
)
from hfmerge.methods.stages import DataNeed, Phase, Stage

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.plan import MergeContext, MergePlan
    from hfmerge.io.checkpoint import TensorTable
    from hfmerge.methods.stages import StageRun

logger = logging.getLogger(__name__)

DATA_PURPOSE = "to learn its coefficients (entropy minimisation on each source's unlabeled images)"
ADAM_BETAS = (0.9, 0.999)
"""Adam's β (the paper's implementation details and its code); ε is PyTorch's default, 1e-8, as in the code."""


@dataclass(frozen=True)
class LearnCoefficients(Stage):
    """AdaMerging's coefficients, learned on each source's unlabeled data; the table ``adamerging``.

    The table's ``coefficients`` have one row per task-vector tensor (``granularity=layer``) or a single
    row (``task``), one column per source: the values the merged model reads, clamped when ``clamp`` is.
    """

    granularity: str
    prior: float
    steps: int
    learning_rate: float
    batch_size: int
    clamp: bool
    samples: int | None = None
    need: DataNeed = DataNeed(required=True, purpose=DATA_PURPOSE, per_source=True)
    name: ClassVar[str] = STAGE
    phase: ClassVar[Phase] = Phase.PREPARE
    all_processes: ClassVar[bool] = True

    def data_need(self) -> DataNeed:
        return self.need

    def resolve(self, ctx: MergeContext) -> LearnCoefficients | None:
        return self if ctx.data else None

    def describe(self, ctx: MergeContext) -> list[str]:
        per = "per source" if self.granularity == "task" else "per source and task-vector tensor"
        clamped = ", clamped to [0, 1]" if self.clamp else ""
        lines = [f"training stage: AdaMerging's coefficients ({per}) from λ = {self.prior:g}{clamped}: {self.steps} "
                 f"Adam steps (learning rate {self.learning_rate:g}), each on {self.batch_size} images of every "
                 "source's data, each through its own classifier head:"]
        lines.extend(f"  {layout.source.name} ← {spec.ref}" for layout, spec in zip(ctx.sources, ctx.data or []))
        return lines

    def run(self, run: StageRun) -> TensorTable:
        table = learn_coefficients(self, run)
        run.record.tables[self.name] = table
        return table


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_c p_c log p_c of p = softmax(logits) over the last dimension, one value per row (§3.2)."""
    import torch

    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@dataclass
class LearnedTensor:
    """One task-vector tensor of the merged model: its in-memory name, its row of coefficients, θ_base and the τᵢ."""

    name: str
    row: int
    base: torch.Tensor
    task_vectors: list[torch.Tensor]


@dataclass
class MergedModel:
    """The merged model as a function of the coefficients, with each source's own classifier head.

    ``fixed`` are the tensors the coefficients do not touch (averaged BatchNorm statistics, integer
    buffers), ``learned`` the task-vector tensors, ``heads[i]`` source i's own head tensors (the heads the
    head policy merges; none when the heads are task vectors).
    """

    model: torch.nn.Module
    fixed: dict[str, torch.Tensor]
    learned: list[LearnedTensor]
    heads: list[dict[str, torch.Tensor]]

    def weights(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(λ) for every task-vector tensor: θ_base + Σᵢ λᵢ τᵢ in float32, λ the tensor's row of ``coefficients``."""
        import torch

        out = {}
        for tensor in self.learned:
            row = coefficients[tensor.row]
            merged = tensor.base.to(torch.float32)
            for i, task_vector in enumerate(tensor.task_vectors):
                merged = merged + row[i] * task_vector.to(torch.float32)
            out[tensor.name] = merged
        return out

    def logits(self, weights: dict[str, torch.Tensor], source: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """The logits of ``pixel_values`` through the merged model with ``weights`` and source ``source``'s head."""
        from torch.func import functional_call

        tensors = {**self.fixed, **weights, **self.heads[source]}
        output = functional_call(self.model, tensors, args=(), kwargs={"pixel_values": pixel_values})
        return output.logits


def build_merged_model(context: MergeContext, plan: MergePlan, run: StageRun, device: torch.device) -> MergedModel:
    """The plan's merged model as a function of the coefficients, on ``device``.

    Holds the base and the N task vectors of every tensor the plan learns (in the checkpoint's dtype),
    the rest of the plan's tensors as the plan makes them, and each source's own head.
    """
    import torch

    model = run.source_model(context.anchor, device).requires_grad_(False)
    known = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    fixed: dict[str, torch.Tensor] = {}
    learned: list[LearnedTensor] = []
    heads: list[dict[str, torch.Tensor]] = [{} for _ in context.sources]
    for entry in plan.tensors:
        if entry.name not in known:
            continue  # a checkpoint tensor transformers does not load
        op = entry.op
        if isinstance(op, AdaMergingOp):
            base = run.load(op.base)
            task_vectors = []
            for ref in op.sources:
                tensor = run.load(ref)
                task_vectors.append((tensor.to(torch.float32) - base.to(torch.float32)).to(tensor.dtype).to(device))
            learned.append(LearnedTensor(entry.name, op.row, base.to(device), task_vectors))
            continue
        info = context.anchor.tensors.get(entry.name)
        if info is not None and info.head is not None:  # a head the head policy merges: each task reads its own
            for i, layout in enumerate(context.sources):
                own = layout.tensors.get(entry.name)
                head = run.load((i, own.key)) if own is not None else op.apply(run.load)
                heads[i][entry.name] = head.to(device, torch.float32)
            continue
        tensor = op.apply(run.load)
        fixed[entry.name] = tensor.to(device, torch.float32) if tensor.is_floating_point() else tensor.to(device)
    return MergedModel(model, fixed, learned, heads)


class BatchOrder:
    """Which images of one source each step reads: consecutive batches of seeded permutations.

    A batch has ``min(batch_size, images)`` distinct images; a new permutation starts when fewer than a
    batch are left (those are skipped this pass), so every batch has the same size.
    """

    def __init__(self, images: int, batch_size: int, seed: int) -> None:
        import torch

        self.images = images
        self.size = min(batch_size, images)
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        import torch

        if len(self.queue) < self.size:
            self.queue = torch.randperm(self.images, generator=self.generator).tolist()
        batch, self.queue = self.queue[: self.size], self.queue[self.size :]
        return batch


@dataclass
class Learned:
    """What the training found: the coefficients the merge reads, the objective per step, the first gradient."""

    coefficients: torch.Tensor
    objective: list[float]
    first_gradient: torch.Tensor | None


def optimise(stage: LearnCoefficients, merged: MergedModel, datasets: list[Any], accelerator: Any, *, rows: int,
             seed: int, progress: bool) -> Learned:
    """Adam on the raw coefficients against Σᵢ mean_{x ∈ Bᵢ} H(p(x; θ(λ))), ``stage.steps`` steps.

    Each step: λ = clamp(raw, 0, 1) (or raw), θ(λ) built once, then per source i a batch Bᵢ of its
    images (:class:`BatchOrder`, seeded by ``seed + i``) through θ(λ) and source i's head; each source's
    loss is back-propagated on its own (the graphs of the sources are never held together). Under
    several processes each takes every ``num_processes``-th image of each batch and divides by the
    whole batch's size, and the gradients are summed across processes: every process takes the step one
    process would take.
    """
    import torch
    from tqdm.auto import tqdm

    device = accelerator.device
    processes, rank = accelerator.num_processes, accelerator.process_index
    raw = torch.full((rows, len(datasets)), stage.prior, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=stage.learning_rate, betas=ADAM_BETAS)
    orders = [BatchOrder(len(data), stage.batch_size, seed + i) for i, data in enumerate(datasets)]
    objective: list[float] = []
    first_gradient = None
    show = progress and accelerator.is_local_main_process
    bar = tqdm(range(stage.steps), desc="AdaMerging", unit="step", disable=not show, leave=False, dynamic_ncols=True)
    for _ in bar:
        coefficients = raw.clamp(0.0, 1.0) if stage.clamp else raw
        weights = merged.weights(coefficients)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for i, data in enumerate(datasets):
            batch = orders[i].next()
            mine = batch[rank::processes]
            if not mine:
                continue
            pixels = torch.stack([data[j]["pixel_values"] for j in mine]).to(device)
            with accelerator.autocast():
                logits = merged.logits(weights, i, pixels)
            loss = prediction_entropy(logits.float()).sum() / len(batch)
            loss.backward(retain_graph=True)
            total += loss.detach()
        del weights
        if raw.grad is None:
            raw.grad = torch.zeros_like(raw)
        if processes > 1:
            raw.grad = accelerator.reduce(raw.grad, reduction="sum")
            total = accelerator.reduce(total, reduction="sum")
        objective.append(float(total))
        if first_gradient is None:
            first_gradient = raw.grad.detach().cpu().clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        bar.set_postfix(entropy=f"{objective[-1]:.4f}", refresh=False)
    bar.close()
    with torch.no_grad():
        coefficients = (raw.clamp(0.0, 1.0) if stage.clamp else raw).detach().clone()
    if processes > 1:
        from accelerate.utils import broadcast

        broadcast(coefficients, from_process=0)  # equal already; bitwise equal for certain
    return Learned(coefficients.cpu(), objective, first_gradient)


def learn_coefficients(stage: LearnCoefficients, run: StageRun) -> TensorTable:
    """Learn the coefficients and return them as the table the plan's :class:`AdaMergingOp` read.

    With ``steps=0`` no data is read and every coefficient is the prior: the merge is task arithmetic.
    The facts go to the card (``details["adamerging"]``); every coefficient, the objective per step and
    the gradient of the first step go to ``adamerging_coefficients.json`` in the output folder, and for
    layer-wise coefficients a plot of them.
    """
    import torch

    from hfmerge.data.load import ProcessedImages
    from hfmerge.io.checkpoint import MemoryTable

    started = time.perf_counter()
    context, accelerator = run.context, run.accelerator
    plan: MergePlan = run.plan  # type: ignore[attr-defined]
    learned_ops = [(entry.name, entry.op) for entry in plan.tensors if isinstance(entry.op, AdaMergingOp)]
    rows = 1 + max(op.row for _, op in learned_ops)
    sources = len(context.sources)
    images: list[int] = []
    if stage.steps == 0:
        learned = Learned(torch.full((rows, sources), stage.prior, dtype=torch.float32), [], None)
    else:
        datasets = []
        for i, layout in enumerate(context.sources):
            data = run.source_data(i, samples=stage.samples, labeled=False)
            if len(data) == 0:
                raise DataError(f"{data.name} has no images; AdaMerging learns from each source's unlabeled images")
            datasets.append(ProcessedImages(data, run.source_processor(layout)))
            images.append(len(data))
        merged = build_merged_model(context, plan, run, accelerator.device)
        learned = optimise(stage, merged, datasets, accelerator, rows=rows, seed=run.seed, progress=run.progress)
        del merged
    table = learned.coefficients
    names = [name for name, op in learned_ops] if stage.granularity == "layer" else None
    facts: dict[str, Any] = {"steps": stage.steps, "learning_rate": stage.learning_rate,
                             "batch_size": stage.batch_size, "clamp": stage.clamp, "images": images,
                             "file": COEFFICIENTS_JSON}
    if learned.objective:
        facts["objective_start"], facts["objective_end"] = learned.objective[0], learned.objective[-1]
    if names is None:
        facts["coefficients"] = table[0].tolist()
    else:
        facts["summary"] = [{"mean": float(column.mean()), "min": float(column.min()), "max": float(column.max())}
                            for column in table.T]
        facts["plot"] = COEFFICIENTS_SVG
        run.record.files[COEFFICIENTS_SVG] = coefficients_svg(table.tolist())
    run.record.details["adamerging"] = facts
    run.record.files[COEFFICIENTS_JSON] = coefficients_json(stage, table, names, learned)
    if learned.objective:
        logger.info("learned AdaMerging's coefficients in %d steps (%.1f s): entropy objective %.4f -> %.4f",
                    stage.steps, time.perf_counter() - started, learned.objective[0], learned.objective[-1])
    return MemoryTable({COEFFICIENTS: table}, label="AdaMerging's learned coefficients")


def coefficients_json(stage: LearnCoefficients, table: torch.Tensor, names: list[str] | None, learned: Learned) -> str:
    """Every coefficient (per tensor for ``layer``), the objective per step and the first step's gradient, as JSON."""

    def by_row(values: torch.Tensor) -> Any:
        return values[0].tolist() if names is None else dict(zip(names, values.tolist()))

    content = {
        "granularity": stage.granularity, "prior": stage.prior, "steps": stage.steps,
        "learning_rate": stage.learning_rate, "batch_size": stage.batch_size, "clamp": stage.clamp,
        "coefficients": by_row(table), "objective": learned.objective,
        "first_gradient": by_row(learned.first_gradient) if learned.first_gradient is not None else None,
    }
    return json.dumps(content, indent=1) + "\n"


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def coefficients_svg(rows: list[list[float]]) -> str:
    """A line per source of its layer-wise coefficients, tensor by tensor in the model's order, as SVG text.

    Lines carry ``class="source"`` and ``data-source`` (1-based); sources are named by their number, so
    no local path reaches the card.
    """
    pad, plot_w, plot_h = 40, max(240, 4 * len(rows)), 180
    low = min(0.0, *(v for row in rows for v in row))
    high = max(1.0, *(v for row in rows for v in row))
    width, height = pad * 2 + plot_w + 90, pad * 2 + plot_h

    def x(index: int) -> float:
        return pad + plot_w * index / max(1, len(rows) - 1)

    def y(value: float) -> float:
        return pad + plot_h * (high - value) / (high - low)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{pad}" y="{pad - 16}" font-size="12">AdaMerging coefficient λ of each tensor '
           f'({len(rows)} tensors, in the model\'s order)</text>',
           f'<line x1="{pad}" y1="{y(low)}" x2="{pad + plot_w}" y2="{y(low)}" stroke="#555"/>',
           f'<line x1="{pad}" y1="{y(low)}" x2="{pad}" y2="{y(high)}" stroke="#555"/>']
    for value in (low, high):
        out.append(f'<text x="{pad - 6}" y="{y(value) + 4}" text-anchor="end">{value:g}</text>')
    for i in range(len(rows[0]) if rows else 0):
        colour = _COLOURS[i % len(_COLOURS)]
        points = " ".join(f"{x(j):.1f},{y(row[i]):.1f}" for j, row in enumerate(rows))
        out.append(f'<polyline class="source" data-source="{i + 1}" points="{points}" fill="none" '
                   f'stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{pad + plot_w + 10}" y="{pad + 14 * i + 4}" fill="{colour}">'
                   f'{escape(f"source {i + 1}")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
