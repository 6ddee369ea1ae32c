"""Evaluation metrics against scikit-learn's on the same predictions, PQ against a hand count, and model cost."""

from __future__ import annotations

import time

import pytest
import torch
from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

from hfmerge.eval.cost import count_flops, count_parameters, measure_latency
from hfmerge.eval.ensemble import Ensemble
from hfmerge.eval.metrics import (
    SegmentationMeter,
    classification_metrics,
    panoptic_metrics,
    panoptic_pairs,
    segmentation_metrics,
)
from hfmerge.testing.tiny import tiny_model


def test_classification_metrics_equal_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (200,), generator=generator)  # class 5 never true
    logits = torch.randn(200, 6, generator=generator)
    logits[:, 4] -= 10  # class 4 never predicted: its precision is 0 (zero_division=0)
    preds = logits.argmax(dim=1)
    assert 4 not in preds and 5 not in targets
    ours = classification_metrics(logits, targets, num_classes=6)
    precision, recall, f1, _ = precision_recall_fscore_support(targets, preds, average="weighted", zero_division=0)
    expected = {"accuracy": accuracy_score(targets, preds), "precision": precision, "recall": recall, "f1": f1}
    assert ours == pytest.approx(expected, abs=1e-6)
    assert classification_metrics(preds, targets, num_classes=6) == ours  # indices or scores, same answer


def test_mean_iou_equals_scikit_learn_jaccard_on_pixels_that_are_not_ignored():
    generator = torch.Generator().manual_seed(1)
    batches = []
    for shape in ((2, 6, 7), (1, 5, 4)):  # images of different sizes, accumulated in one meter
        preds = torch.randint(0, 4, shape, generator=generator)
        targets = torch.randint(0, 5, shape, generator=generator)  # class 4 is never predicted
        targets[torch.rand(shape, generator=generator) < 0.2] = 255
        batches.append((preds, targets))
    meter = SegmentationMeter(6, class_names={i: f"c{i}" for i in range(6)})  # class 5 absent from both
    for preds, targets in batches:
        meter.update(preds, targets)
    ours = meter.compute(per_class=True)
    t = torch.cat([b[1].flatten() for b in batches])
    p = torch.cat([b[0].flatten() for b in batches])
    keep = t != 255
    t, p = t[keep].numpy(), p[keep].numpy()
    assert ours["mean_iou"] == pytest.approx(jaccard_score(t, p, average="macro"), abs=1e-9)
    per_class = jaccard_score(t, p, average=None, labels=[0, 1, 2, 3, 4])
    assert {k: v for k, v in ours.items() if k.startswith("iou/")} == pytest.approx(
        {f"iou/c{i}": per_class[i] for i in range(5)}, abs=1e-9)
    assert ours["pixel_accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-9)
    # scores [B, C, H, W]: the argmax over classes is the prediction
    preds, targets = batches[0]
    scores = torch.nn.functional.one_hot(preds, 6).permute(0, 3, 1, 2).float()
    assert segmentation_metrics(scores, targets, 6) == segmentation_metrics(preds, targets, 6)


def test_panoptic_quality_of_a_hand_counted_case():
    # 4×4 image. Category 1 is stuff (left half), category 0 a thing with two instances (right quarters).
    target = torch.zeros(4, 4, 2, dtype=torch.long)
    target[:, :2] = torch.tensor([1, 0])
    target[:2, 2:] = torch.tensor([0, 1])
    target[2:, 2:] = torch.tensor([0, 2])
    pred = target.clone()
    pred[0, 2] = torch.tensor([1, 0])   # stuff grows by one pixel: IoU 8/9; thing 1 keeps 3 of 4: IoU 3/4
    pred[2:, 2:] = torch.tensor([0, 3])  # thing 2 becomes instance 3 on 3 pixels (IoU 3/4)...
    pred[3, 3] = torch.tensor([0, 4])    # ...and instance 4 on 1 pixel (IoU 1/4: a false positive)
    # stuff: TP 1, SQ 8/9, RQ 1. thing: TP 2 (IoU 3/4 each), FP 1, FN 0: SQ 3/4, RQ 2/(2 + 1/2) = 0.8.
    expected = {"pq": (8 / 9 + 0.75 * 0.8) / 2, "sq": (8 / 9 + 0.75) / 2, "rq": (1 + 0.8) / 2}
    ours = panoptic_metrics(pred[None], target[None], things={0}, stuffs={1})
    assert ours == pytest.approx(expected, abs=1e-6)


def test_panoptic_pairs_from_a_post_processed_map():
    # segment ids as post_process_panoptic_segmentation returns them: 0 = no segment, 1 and 2 two instances
    segmentation = torch.tensor([[1, 1, 2], [0, 2, 2]])
    pairs = panoptic_pairs(segmentation, [{"id": 1, "label_id": 5}, {"id": 2, "label_id": 7}], void=9)
    assert pairs[..., 0].tolist() == [[5, 5, 7], [9, 7, 7]] and torch.equal(pairs[..., 1], segmentation)
    perfect = panoptic_metrics(pairs[None], pairs[None], things={7}, stuffs={5})
    assert perfect == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_parameters_count_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4, bias=False))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 4
    tied = torch.nn.ModuleDict({"a": model[0], "b": torch.nn.Linear(4, 3)})
    tied["b"].weight = tied["a"].weight
    assert count_parameters(tied) == 4 * 3 + 3 + 3  # one weight, two biases


def test_flops_of_a_linear_and_a_convolution_by_hand():
    # a multiply-add is 2 FLOPs; biases are not counted
    assert count_flops(torch.nn.Linear(4, 3), torch.randn(2, 4)) == 2 * (2 * 4 * 3)
    conv = torch.nn.Conv2d(2, 3, kernel_size=3)  # 5×5 input -> 3×3 output, 3 channels, 2·3·3 products each
    assert count_flops(conv, torch.randn(1, 2, 5, 5)) == 2 * (3 * 3 * 3) * (2 * 3 * 3)


class _Sleeper(torch.nn.Module):
    """Sleeps a given time per call and records whether each call ran in inference mode."""

    def __init__(self, delays):
        super().__init__()
        self.delays, self.calls = list(delays), []

    def forward(self, x):
        self.calls.append(torch.is_inference_mode_enabled())
        time.sleep(self.delays[len(self.calls) - 1])
        return x


def test_latency_is_the_median_of_the_timed_repeats_after_warm_up():
    model = _Sleeper([0.3, 0.3, 0.001, 0.2, 0.02, 0.02, 0.02]).train()  # 2 slow warm-ups, one slow repeat
    seconds = measure_latency(model, torch.zeros(1), warmup=2, repeats=5).median
    assert model.calls == [True] * 7
    assert 0.02 <= seconds < 0.1  # the median ignores the warm-ups and the 0.2 s outlier
    assert model.training  # the mode the caller left is restored


class _FakeClock:
    """A clock that moves only when a :class:`_Timed` model runs: timings the test sets exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Timed(torch.nn.Module):
    """Each call moves the fake clock on by the next of ``durations`` seconds."""

    def __init__(self, clock, durations):
        super().__init__()
        self.clock, self.durations, self.calls = clock, list(durations), 0

    def forward(self, x):
        self.clock.now += self.durations[self.calls]
        self.calls += 1
        return x


def test_latency_keeps_each_timed_pass_and_reports_their_median_and_spread():
    clock = _FakeClock()
    model = _Timed(clock, [9.0, 0.010, 0.012, 0.011, 0.013, 0.050])  # a 9 s warm-up, then five passes
    latency = measure_latency(model, torch.zeros(1), warmup=1, repeats=5, clock=clock)
    assert model.calls == 6
    assert latency.seconds == pytest.approx((0.010, 0.012, 0.011, 0.013, 0.050))  # the warm-up is discarded
    assert latency.median == pytest.approx(0.012)  # the one slow pass moves the median not at all
    assert latency.spread == pytest.approx((0.013 - 0.011) / 0.012)  # quartiles of 10..13, 50 ms: 11 and 13 ms


def test_a_latency_slowed_in_half_its_passes_has_a_wide_spread():
    clock = _FakeClock()
    model = _Timed(clock, [0.010, 0.010, 0.468, 0.010, 0.464, 0.007])  # another process held the core, twice
    latency = measure_latency(model, torch.zeros(1), warmup=1, repeats=5, clock=clock)
    assert latency.median == pytest.approx(0.010)
    assert latency.spread == pytest.approx((0.464 - 0.010) / 0.010)
    assert measure_latency(_Timed(_FakeClock(), [1.0, 2.0]), torch.zeros(1), warmup=1, repeats=1).spread is None


def test_ensemble_of_one_is_its_softmax_and_of_two_the_hand_average():
    a = tiny_model("vit", labels=["cat", "dog", "fox"], seed=1)
    b = tiny_model("vit", 2, labels=["fox", "owl"], seed=2)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        pa, pb = a(pixel_values=x).logits.softmax(-1), b(pixel_values=x).logits.softmax(-1)
        alone = Ensemble([a])(x)
        both = Ensemble([a, b])(x)
    assert torch.allclose(alone.probabilities, pa, atol=1e-6)
    assert torch.allclose(alone.logits.softmax(-1), pa, atol=1e-6)
    assert Ensemble([a, b]).config.id2label == {0: "cat", 1: "dog", 2: "fox", 3: "owl"}
    expected = torch.stack([pa[:, 0] / 2, pa[:, 1] / 2, (pa[:, 2] + pb[:, 0]) / 2, pb[:, 1] / 2], dim=1)
    assert torch.allclose(both.probabilities, expected, atol=1e-6)
    assert torch.allclose(both.probabilities.sum(-1), torch.ones(3), atol=1e-6)
    assert count_parameters(Ensemble([a, b])) == count_parameters(a) + count_parameters(b)
