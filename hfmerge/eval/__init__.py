"""Evaluation: per-task metrics, a model's cost, the ensemble reference, and the report the card shows.

The public names are imported on first use (PEP 562), so that the card, which
only reads an :class:`EvaluationReport`, loads neither torch nor torchmetrics.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfmerge.eval.cost import Latency, count_flops, count_parameters, measure_latency
    from hfmerge.eval.ensemble import Ensemble
    from hfmerge.eval.evaluate import SegmentationSamples, evaluate_classifier, evaluate_segmenter, load_metric
    from hfmerge.eval.metrics import (
        SegmentationMeter,
        classification_metrics,
        panoptic_metrics,
        segmentation_metrics,
    )
    from hfmerge.eval.report import EvaluationReport, ModelEvaluation, TaskResult

_LAZY = {
    "count_flops": "hfmerge.eval.cost", "count_parameters": "hfmerge.eval.cost", "measure_latency": "hfmerge.eval.cost",
    "Latency": "hfmerge.eval.cost",
    "Ensemble": "hfmerge.eval.ensemble",
    "evaluate_classifier": "hfmerge.eval.evaluate", "load_metric": "hfmerge.eval.evaluate",
    "evaluate_segmenter": "hfmerge.eval.evaluate", "SegmentationSamples": "hfmerge.eval.evaluate",
    "SegmentationMeter": "hfmerge.eval.metrics", "classification_metrics": "hfmerge.eval.metrics",
    "panoptic_metrics": "hfmerge.eval.metrics", "segmentation_metrics": "hfmerge.eval.metrics",
    "EvaluationReport": "hfmerge.eval.report", "ModelEvaluation": "hfmerge.eval.report",
    "TaskResult": "hfmerge.eval.report",
}

__all__ = [
    "Ensemble", "EvaluationReport", "Latency", "ModelEvaluation", "SegmentationMeter", "SegmentationSamples", "TaskResult",
    "classification_metrics", "count_flops", "count_parameters", "evaluate_classifier", "evaluate_segmenter",
    "load_metric", "measure_latency", "panoptic_metrics", "segmentation_metrics",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hfmerge.eval' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
