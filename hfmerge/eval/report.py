"""Evaluation results as data: per task, per model, and the report the card and the Space show.

No torch here: a report is read back from JSON (``hfmerge evaluate --json``,
an existing card) and rendered as a Markdown table, as ``model-index``
metadata (huggingface_hub's :class:`~huggingface_hub.EvalResult`) and as a
self-contained SVG bar chart, on machines that never ran a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

ROLES = ("merged", "source", "ensemble")
MAIN_METRICS = ("accuracy", "mean_iou", "pq")  # the headline metric of a task, first one present
METRIC_NAMES = {
    "accuracy": "accuracy", "precision": "precision (weighted)", "recall": "recall (weighted)",
    "f1": "F1 (weighted)", "mean_iou": "mean IoU", "pixel_accuracy": "pixel accuracy",
    "pq": "PQ", "sq": "SQ", "rq": "RQ",
}
FORMAT_VERSION = 1
UNSTABLE_SPREAD = 0.25  # a latency whose passes' interquartile range exceeds this share of their median is flagged
SAME_SIZE_RATIO = 2.0  # models of one size (parameters, FLOPs, batch, device) whose latencies differ more: flagged
MODEL_INDEX_DECIMALS = 6  # torchmetrics computes in float32: 0.3333333432674408 is 0.333333 in the metadata


@dataclass
class TaskResult:
    """One model's metrics on one task (a dataset split).

    ``dataset`` is the Hub dataset id, or a local folder's name (never its
    path); ``revision`` the commit sha it resolved to. ``kind`` is the
    pipeline task the metrics belong to, as the Hub names it.
    """

    task: str
    dataset: str
    split: str
    metrics: dict[str, float]
    samples: int
    kind: str = "image-classification"
    revision: str | None = None

    @property
    def main_metric(self) -> str:
        """The metric the summary table and the bar chart show: accuracy, mean IoU or PQ."""
        for name in MAIN_METRICS:
            if name in self.metrics:
                return name
        return next(iter(self.metrics), "")


@dataclass
class ZeroShotScoring:
    """How a row was scored zero-shot: each class name written into ``prompts``, embedded by the text tower of
    ``text_tower`` (the model named so: a base's repo id or folder name, or the row's own model, whose text
    tower it is). ``default_prompts``: the prompts were hfmerge's defaults, not the user's (``--prompt``)."""

    text_tower: str
    prompts: list[str]
    default_prompts: bool = False


@dataclass
class ModelEvaluation:
    """A model's results on every task, and its cost.

    ``role``: ``merged``, ``source`` or ``ensemble``. ``flops``: per image.
    ``latency_ms``: median of one forward pass over a batch of ``batch_size`` images on ``device``;
    ``latency_spread``: the timed passes' interquartile range over that median (``None``: not known, as in
    reports written before it was recorded). ``zero_shot``: the prompts and the text tower of a row scored by
    zero-shot classification (``None``: scored by its own head, or in a report written before it was recorded).
    """

    name: str
    role: str
    tasks: list[TaskResult]
    parameters: int
    flops: int | None
    latency_ms: float | None
    batch_size: int
    device: str | None = None
    latency_spread: float | None = None
    zero_shot: ZeroShotScoring | None = None

    def result(self, task: str) -> TaskResult | None:
        return next((t for t in self.tasks if t.task == task), None)


@dataclass
class EvaluationReport:
    """The models compared (merged, each source, the ensemble) on the same tasks."""

    models: list[ModelEvaluation] = field(default_factory=list)

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, "models": [asdict(m) for m in self.models]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        data = json.loads(text)
        models = []
        for model in data["models"]:
            tasks = [TaskResult(**task) for task in model.pop("tasks")]
            scoring = model.pop("zero_shot", None)  # absent from reports written before it was recorded
            models.append(ModelEvaluation(tasks=tasks, zero_shot=ZeroShotScoring(**scoring) if scoring else None,
                                          **model))
        return cls(models=models)

    # -- what is compared ---------------------------------------------------------------
    def ordered_models(self) -> list[ModelEvaluation]:
        """Merged first, then the sources, then the ensemble, then anything else, each in given order."""
        rank = {role: i for i, role in enumerate(ROLES)}
        return sorted(self.models, key=lambda m: rank.get(m.role, len(ROLES)))

    def task_names(self) -> list[str]:
        """Every task, in order of first appearance."""
        return list(dict.fromkeys(t.task for m in self.ordered_models() for t in m.tasks))

    def _reference(self, task: str) -> TaskResult:
        return next(t for m in self.ordered_models() for t in m.tasks if t.task == task)

    def merged(self, model_name: str | None = None) -> ModelEvaluation:
        """The model named ``model_name`` when the report has one, else the one whose role is ``merged``."""
        named = [m for m in self.models if m.name == model_name]
        if named:
            return named[0]
        merged = [m for m in self.models if m.role == "merged"]
        if not merged:
            raise ValueError("the evaluation report has no merged model (role 'merged')")
        return merged[0]

    # -- latency ------------------------------------------------------------------------
    def unstable_latencies(self) -> dict[str, str]:
        """The models whose latency is not to be compared, by name, each with the reason.

        A latency is unstable when its own passes spread widely (:data:`UNSTABLE_SPREAD`), or when models of
        one size (the same parameters, FLOPs per image, batch and device, so the same work) differ by more
        than :data:`SAME_SIZE_RATIO`: a process that held a core during some models' passes and not others'
        makes both, and a ratio of them means nothing.
        """
        timed = [m for m in self.ordered_models() if m.latency_ms is not None]
        reasons: dict[str, str] = {}
        for model in timed:
            if model.latency_spread is not None and model.latency_spread > UNSTABLE_SPREAD:
                reasons[model.name] = (f"{model.name}: the interquartile range of its timed passes is "
                                       f"{model.latency_spread:.0%} of their median")
        sizes: dict[tuple[int, int, int, str | None], list[ModelEvaluation]] = {}
        for model in timed:
            if model.flops is not None:
                sizes.setdefault((model.parameters, model.flops, model.batch_size, model.device), []).append(model)
        for same in sizes.values():
            milliseconds = [m.latency_ms or 0.0 for m in same]
            fastest, slowest = min(milliseconds), max(milliseconds)
            if fastest > 0 and slowest / fastest > SAME_SIZE_RATIO:
                names = ", ".join(m.name for m in same)
                for model in same:
                    reasons.setdefault(model.name, f"{names} do the same work, yet their latencies differ "
                                                   f"{slowest / fastest:.3g}×")
        return reasons

    # -- Markdown -----------------------------------------------------------------------
    def markdown(self, chart: str | None = None) -> str:
        """The summary table (a row per model: each task's main metric, their mean, the cost), then per task
        a table of every metric. ``chart``: the path of :meth:`bar_chart_svg`'s file, shown after the summary."""
        tasks = self.task_names()
        models = self.ordered_models()
        batch_sizes = {m.batch_size for m in models if m.latency_ms is not None}
        shared_batch = len(batch_sizes) == 1
        latency_header = f"latency (ms, batch {min(batch_sizes)})" if shared_batch else "latency (ms)"
        header = ["model", "role",
                  *(f"{task} ({METRIC_NAMES.get(self._reference(task).main_metric, self._reference(task).main_metric)})"
                    for task in tasks),
                  "mean", "parameters", "FLOPs / image", latency_header]
        lines = [_row(header), _row(["---"] * len(header))]
        unstable = self.unstable_latencies()
        for model in models:
            values = []
            for task in tasks:
                result = model.result(task)
                metric = self._reference(task).main_metric
                values.append(result.metrics.get(metric) if result else None)
            mean = sum(values) / len(values) if values and None not in values else None
            latency = None
            if model.latency_ms is not None:
                remarks = [*([] if shared_batch else [f"batch {model.batch_size}"]),
                           *(["unstable"] if model.name in unstable else [])]
                latency = _milliseconds(model.latency_ms) + (f" ({', '.join(remarks)})" if remarks else "")
            lines.append(_row([
                _cell(model.name), model.role, *(_number(v) for v in values), _number(mean),
                f"{model.parameters:,}", _flops(model.flops), latency or "—",
            ]))
        devices = sorted({m.device for m in models if m.device and m.latency_ms is not None})
        notes = ["Main metric per task; the mean is over the tasks. FLOPs counted by PyTorch's FlopCounterMode "
                 "(a multiply-add is 2 FLOPs); latency is the median of timed forward passes after a warm-up"
                 + (f", on {', '.join(devices)}" if devices else "") + "."]
        if unstable:
            notes.append("Latencies marked unstable are not to be compared (the machine was busy while they were "
                         "timed; measure again on an idle one): " + "; ".join(dict.fromkeys(unstable.values())) + ".")
        if any(t.kind == "zero-shot-image-classification" for m in models for t in m.tasks):
            notes.append(_zero_shot_note(models))
        if any(m.role == "ensemble" for m in models):
            notes.append("The ensemble averages the sources' softmax: a reference that runs every source, "
                         "not a merged model.")
        parts = ["\n".join(lines), " ".join(notes)]
        if chart:
            parts.append(f"![Evaluation]({chart})")
        for task in tasks:
            reference = self._reference(task)
            metrics = list(dict.fromkeys(k for m in models if (r := m.result(task)) for k in r.metrics))
            where = f"{reference.dataset}, split {reference.split}"
            detail = [f"### {task}", "", f"{_cell(where)}, {reference.samples} samples.", "",
                      _row(["model", *(METRIC_NAMES.get(k, k) for k in metrics)]),
                      _row(["---"] * (len(metrics) + 1))]
            for model in models:
                result = model.result(task)
                if result is not None:
                    detail.append(_row([_cell(model.name), *(_number(result.metrics.get(k)) for k in metrics)]))
            parts.append("\n".join(detail))
        return "\n\n".join(parts) + "\n"

    # -- model-index --------------------------------------------------------------------
    def eval_results(self, model_name: str | None = None) -> list[EvalResult]:
        """The merged model's results as ``model-index`` entries: one per (task, metric), to 6 decimals.

        ``model_name`` picks the report's model of that name; otherwise (the card's repo id, say) the model
        whose role is ``merged``.
        """
        from huggingface_hub import EvalResult

        model = self.merged(model_name)
        results = []
        for task in model.tasks:
            for metric, value in task.metrics.items():
                results.append(EvalResult(
                    task_type=task.kind, task_name=task.task, dataset_type=task.dataset,
                    dataset_name=task.dataset, dataset_split=task.split, dataset_revision=task.revision,
                    metric_type=metric, metric_name=METRIC_NAMES.get(metric, metric), metric_value=round(float(value), MODEL_INDEX_DECIMALS),
                ))
        return results

    # -- chart --------------------------------------------------------------------------
    def bar_chart_svg(self) -> str:
        """The main metric per task as grouped bars (merged, each source, the ensemble): a standalone SVG."""
        tasks = self.task_names()
        models = self.ordered_models()
        bar, gap, left, top, plot_height = 18, 24, 64, 24, 220
        label_width = 7 * max((len(task) for task in tasks), default=0)  # about 7 px a character at 11 px
        group = max(bar * len(models), label_width) + gap  # wide enough that task names never overlap
        plot_width = max(group * len(tasks), 160)
        legend_top = top + plot_height + 56
        width = left + plot_width + 24
        height = legend_top + 18 * len(models) + 12
        values = [r.metrics.get(r.main_metric, 0.0) for m in models for r in m.tasks]
        scale = max(1.0, *values) if values else 1.0

        def y(value: float) -> float:
            return top + plot_height * (1 - max(value, 0.0) / scale)

        out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'),
               f'<rect width="{width}" height="{height}" fill="white"/>']
        for i in range(5):
            value = scale * i / 4
            out.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                       f'stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
        for t, task in enumerate(tasks):
            x0 = left + t * group + (group - bar * len(models)) / 2
            for m, model in enumerate(models):
                result = model.result(task)
                if result is None:
                    continue
                value = result.metrics.get(self._reference(task).main_metric, 0.0)
                x = x0 + m * bar
                tip = f"{model.name} on {task}: {value:.4f}"
                out.append(f'<rect class="bar" data-model={quoteattr(model.name)} data-task={quoteattr(task)} '
                           f'x="{x:.1f}" y="{y(value):.1f}" width="{bar - 2}" '
                           f'height="{top + plot_height - y(value):.1f}" fill="{_colour(model, models)}">'
                           f'<title>{escape(tip)}</title></rect>')
            out.append(f'<text x="{x0 + bar * len(models) / 2:.1f}" y="{top + plot_height + 16}" '
                       f'text-anchor="middle">{escape(task)}</text>')
        out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_height}" stroke="black"/>')
        out.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{top + plot_height}" '
                   f'y2="{top + plot_height}" stroke="black"/>')
        out.append(f'<text x="{left + plot_width / 2:.1f}" y="{top + plot_height + 36}" text-anchor="middle" '
                   f'class="axis-label">task</text>')
        metric_names = sorted({METRIC_NAMES.get(self._reference(t).main_metric, self._reference(t).main_metric)
                               for t in tasks})
        out.append(f'<text class="axis-label" transform="translate(16 {top + plot_height / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{escape(" / ".join(metric_names) or "score")}</text>')
        out.append('<g class="legend">')
        for m, model in enumerate(models):
            row = legend_top + 18 * m
            out.append(f'<rect x="{left}" y="{row}" width="12" height="12" fill="{_colour(model, models)}"/>')
            out.append(f'<text x="{left + 18}" y="{row + 10}">{escape(model.name)} ({escape(model.role)})</text>')
        out.append("</g>")
        out.append("</svg>")
        return "\n".join(out) + "\n"


def _zero_shot_note(models: list[ModelEvaluation]) -> str:
    """What the zero-shot rows' scores mean: the class names, the prompt templates they were written into, and
    whose text tower embedded them, so that a reader can score another model the same way."""
    scored = [(m.name, m.zero_shot) for m in models if m.zero_shot is not None]
    if not scored:  # a report written before the prompts and the text tower were recorded
        return ("Zero-shot rows classify each task's images among that task's class names, written into prompt "
                "templates and embedded by a text tower.")
    by_prompts: dict[tuple[tuple[str, ...], bool], list[str]] = {}
    by_tower: dict[str, list[str]] = {}
    for name, scoring in scored:
        by_prompts.setdefault((tuple(scoring.prompts), scoring.default_prompts), []).append(name)
        by_tower.setdefault("" if scoring.text_tower == name else scoring.text_tower, []).append(name)

    def rows(names: list[str], groups: int) -> str:
        return f" ({', '.join(names)})" if groups > 1 else ""

    prompts = " and ".join(
        "the prompt templates " + ", ".join(f"`{t}`" for t in templates)
        + (" (hfmerge's defaults)" if default else "") + rows(names, len(by_prompts))
        for (templates, default), names in by_prompts.items())
    towers = " and ".join(
        (f"by the text tower of {tower}" if tower else "by the model's own text tower") + rows(names, len(by_tower))
        for tower, names in by_tower.items())
    return (f"Zero-shot rows classify each task's images among that task's class names: each name is written into "
            f"{_cell(prompts)} and embedded {_cell(towers)}; a class's weight is the normalised mean of its "
            "prompts' normalised embeddings.")


_SOURCE_COLOURS = ("#7f7f7f", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#aec7e8")


def _colour(model: ModelEvaluation, models: list[ModelEvaluation]) -> str:
    if model.role == "merged":
        return "#1f77b4"
    if model.role == "ensemble":
        return "#ff7f0e"
    others = [m for m in models if m.role not in ("merged", "ensemble")]
    return _SOURCE_COLOURS[others.index(model) % len(_SOURCE_COLOURS)]


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _milliseconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _flops(flops: int | None) -> str:
    if flops is None:
        return "—"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return str(flops)
