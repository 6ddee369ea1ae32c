"""Task metrics, computed with torchmetrics: classification, semantic segmentation, panoptic segmentation.

Each function takes whole tensors and returns plain floats by name, so a
report can store them as JSON and a test can compare them with scikit-learn.
Segmentation over a dataset accumulates one confusion matrix batch by batch
(:class:`SegmentationMeter`), since its images need not share one size.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

IGNORE_INDEX = 255  # the "void" label of ADE20K, Cityscapes and most semantic segmentation sets


def classification_metrics(logits_or_preds: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 accuracy and support-weighted precision, recall and F1.

    Args:
        logits_or_preds: ``[N, num_classes]`` scores (logits or probabilities; the top one counts) or ``[N]``
            predicted class indices.
        targets: ``[N]`` true class indices.
        num_classes: the size of the model's label space.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``. The weighted averages weight each class by its number
        of true samples, and a class never predicted has precision 0 (scikit-learn's
        ``precision_recall_fscore_support(average="weighted", zero_division=0)``).
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    preds = logits_or_preds.argmax(dim=-1) if logits_or_preds.ndim == 2 else logits_or_preds
    preds, targets = preds.long().cpu(), targets.long().cpu()
    common = {"num_classes": num_classes, "validate_args": True}
    return {
        "accuracy": float(multiclass_accuracy(preds, targets, average="micro", **common)),
        "precision": float(multiclass_precision(preds, targets, average="weighted", zero_division=0, **common)),
        "recall": float(multiclass_recall(preds, targets, average="weighted", zero_division=0, **common)),
        "f1": float(multiclass_f1_score(preds, targets, average="weighted", zero_division=0, **common)),
    }


class SegmentationMeter:
    """Intersection over union per class, accumulated over batches in one confusion matrix.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) over every pixel whose true label is
    not ``ignore_index``; the mean is over the classes that occur in the
    targets or the predictions (a class absent from both has no IoU, as in
    scikit-learn's ``jaccard_score(average="macro")``).
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = IGNORE_INDEX,
                 class_names: Mapping[int, str] | None = None) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.class_names = dict(class_names or {})
        self._confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)

    def update(self, logits_or_preds: Tensor, targets: Tensor) -> None:
        """Add a batch: ``[B, C, H, W]`` scores or ``[B, H, W]`` class indices, and ``[B, H, W]`` true labels.

        Scores of another size than the targets are resized to them (bilinear), as the SegFormer and UperNet
        processors do before taking the argmax.
        """
        if logits_or_preds.ndim == targets.ndim + 1:
            if logits_or_preds.shape[-2:] != targets.shape[-2:]:
                logits_or_preds = torch.nn.functional.interpolate(
                    logits_or_preds.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
            logits_or_preds = logits_or_preds.argmax(dim=1)
        self._confusion.update(logits_or_preds.long().cpu().flatten(), targets.long().cpu().flatten())

    def compute(self, *, per_class: bool = False) -> dict[str, float]:
        """``mean_iou`` and ``pixel_accuracy``; with ``per_class``, also ``iou/<class name>`` per present class."""
        confusion = self._confusion.compute().double()  # rows: true class, columns: predicted class
        intersection = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        present = union > 0
        iou = intersection[present] / union[present]
        total = confusion.sum()
        scores = {
            "mean_iou": float(iou.mean()) if present.any() else 0.0,
            "pixel_accuracy": float(intersection.sum() / total) if total > 0 else 0.0,
        }
        if per_class:
            for index, value in zip(present.nonzero().flatten().tolist(), iou.tolist()):
                scores[f"iou/{self.class_names.get(index, str(index))}"] = value
        return scores


def segmentation_metrics(logits_or_preds: Tensor, targets: Tensor, num_classes: int, *,
                         ignore_index: int | None = IGNORE_INDEX, class_names: Mapping[int, str] | None = None,
                         per_class: bool = False) -> dict[str, float]:
    """Mean IoU (and pixel accuracy, and optionally per-class IoU) of one batch; see :class:`SegmentationMeter`."""
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index, class_names=class_names)
    meter.update(logits_or_preds, targets)
    return meter.compute(per_class=per_class)


def panoptic_metrics(preds: Tensor, targets: Tensor, *, things: Collection[int], stuffs: Collection[int],
                     allow_unknown_preds_category: bool = True) -> dict[str, float]:
    """Panoptic quality PQ = SQ × RQ (Kirillov et al., "Panoptic Segmentation", 2019, Eq. 1).

    A predicted segment matches a true segment of the same category when their IoU exceeds 0.5;
    SQ is the mean IoU of the matched pairs, RQ = |TP| / (|TP| + ½|FP| + ½|FN|), both averaged over categories.

    Args:
        preds, targets: ``[B, H, W, 2]`` integer tensors: per pixel, its category id and its instance id
            (any integer that tells two segments of one category apart; stuff categories use one segment per
            image whatever the id). A pixel whose target category is in neither ``things`` nor ``stuffs`` is
            void and ignored; :func:`panoptic_pairs` turns a post-processed panoptic map into this form.
        things, stuffs: the category ids of countable objects and of amorphous regions.
        allow_unknown_preds_category: predicted categories outside both sets (pixels no predicted segment
            covers, :func:`panoptic_pairs`' ``void``) are void; ``False`` makes them an error instead.

    Returns:
        ``pq``, ``sq``, ``rq``, each in [0, 1].
    """
    from torchmetrics.detection import PanopticQuality

    metric = PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True,
                             allow_unknown_preds_category=allow_unknown_preds_category)
    metric.update(preds.long().cpu(), targets.long().cpu())
    pq, sq, rq = (float(v) for v in metric.compute().flatten()[:3])
    return {"pq": pq, "sq": sq, "rq": rq}


def panoptic_pairs(segmentation: Tensor, segments_info: list[dict], *, void: int = -1) -> Tensor:
    """``[H, W, 2]`` (category, instance) pairs from a panoptic map and its segments.

    ``segmentation`` holds a segment id per pixel and ``segments_info`` one
    ``{"id", "label_id"}`` per segment, as transformers'
    ``post_process_panoptic_segmentation`` returns them; pixels of no segment get category ``void``.
    """
    categories = torch.full_like(segmentation, void)
    for segment in segments_info:
        categories[segmentation == segment["id"]] = int(segment["label_id"])
    return torch.stack([categories, segmentation], dim=-1).long()
