"""evaluate_classifier over labeled tasks, and --metric modules loaded only when asked.

The tasks are ``hfmerge.data.ImageData`` built in memory; images go through ``ProcessedImages`` and
labels through ``label_map_for``, as in a real evaluation.
"""

from __future__ import annotations

import sys

import PIL.Image
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from hfmerge.errors import EvaluationError, HfMergeError
from hfmerge.eval.cost import count_parameters
from hfmerge.eval.ensemble import Ensemble
from hfmerge.eval.evaluate import evaluate_classifier, load_metric
from hfmerge.testing.tiny import image_processor, tiny_model


@pytest.fixture
def data_api():
    import hfmerge.data

    return hfmerge.data


def make_task(data_api, labels: list[int], label_names: list[str], *, seed: int, name: str = "org/ds:test"):
    generator = torch.Generator().manual_seed(seed)
    images = [PIL.Image.fromarray((torch.rand(16, 16, 3, generator=generator) * 255).byte().numpy())
              for _ in labels]
    return data_api.ImageData(
        spec=data_api.DataSpec(name.split(":")[0], split="test"), name=name, split="test", commit_sha="c" * 40,
        image_column="image", label_column="label", label_names=label_names, images=images, labels=labels,
        skipped=0, fingerprint=f"fp{seed}")


def _predictions(model, data, processor):
    pixel_values = processor(images=data.images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits.argmax(-1), pixel_values


def test_classifier_metrics_equal_scikit_learn_on_labels_mapped_by_name(data_api):
    model = tiny_model("vit", labels=["zero", "one", "two"], seed=3)
    processor = image_processor("vit")
    # the dataset numbers its classes in another order: its 0 is the model's "two", its 1 the model's "zero"
    task_a = make_task(data_api, [0, 1, 1, 0, 1, 0, 0], ["two", "zero"], seed=1)
    task_b = make_task(data_api, [0, 1, 2, 2, 1], ["zero", "one", "two"], seed=2, name="org/other:test")
    evaluation = evaluate_classifier(model, [("a", task_a), ("b", task_b)], processor, batch_size=3,
                                     progress=False, name="merged", warmup=1, repeats=2)
    assert [t.task for t in evaluation.tasks] == ["a", "b"]
    for result, data, to_model in ((evaluation.tasks[0], task_a, {0: 2, 1: 0}),
                                   (evaluation.tasks[1], task_b, {0: 0, 1: 1, 2: 2})):
        preds, _ = _predictions(model, data, processor)
        truth = [to_model[label] for label in data.labels]
        precision, recall, f1, _ = precision_recall_fscore_support(truth, preds, average="weighted", zero_division=0)
        assert result.metrics == pytest.approx({"accuracy": accuracy_score(truth, preds), "precision": precision,
                                                "recall": recall, "f1": f1}, abs=1e-6)
        assert result.samples == len(data.labels) and result.split == "test" and result.revision == "c" * 40
    assert evaluation.tasks[0].dataset == "org/ds" and evaluation.tasks[1].dataset == "org/other"
    assert evaluation.parameters == sum(p.numel() for p in model.parameters())
    assert evaluation.batch_size == 3  # latency is measured on one batch of the stated size
    assert evaluation.latency_ms > 0 and evaluation.flops > 0
    assert (evaluation.name, evaluation.role) == ("merged", "merged")


def test_a_latency_timed_while_the_machine_was_busy_is_flagged_in_the_printed_table_and_the_card(
        data_api, monkeypatch):
    import functools

    import hfmerge.eval.evaluate
    from hfmerge.eval.cost import measure_latency
    from hfmerge.eval.report import EvaluationReport
    from hfmerge.publish.card import update_card

    passes = iter([0.010, 0.010, 0.468, 0.464, 0.010])  # seconds of the timed passes: two slowed by a busy core
    readings = iter(reading for seconds in passes for reading in (0.0, seconds))  # (start, end) of each pass
    monkeypatch.setattr(hfmerge.eval.evaluate, "measure_latency",
                        functools.partial(measure_latency, clock=lambda: next(readings)))
    model = tiny_model("vit", labels=["zero", "one", "two"], seed=3)
    task = make_task(data_api, [0, 1, 2], ["zero", "one", "two"], seed=1)
    evaluation = evaluate_classifier(model, [("a", task)], image_processor("vit"), progress=False, name="merged",
                                     warmup=2, repeats=5)
    assert evaluation.latency_ms == pytest.approx(10.0)  # the median, in milliseconds
    assert evaluation.latency_spread == pytest.approx((0.464 - 0.010) / 0.010)
    report = EvaluationReport(models=[evaluation])
    assert "| 10 (unstable) |" in report.markdown()  # what `hfmerge evaluate` prints
    assert "| 10 (unstable) |" in update_card("", report, "merged")


def test_a_label_the_model_lacks_is_named(data_api):
    model = tiny_model("vit", labels=["zero", "one", "two"])
    task = make_task(data_api, [0, 1], ["zero", "seven"], seed=1)
    with pytest.raises(HfMergeError, match="seven"):
        evaluate_classifier(model, [("a", task)], image_processor("vit"), progress=False)


def test_unlabeled_data_is_refused(data_api):
    task = make_task(data_api, [0, 1], ["zero", "one"], seed=1)
    task.labels = None
    with pytest.raises(EvaluationError, match="no labels"):
        evaluate_classifier(tiny_model("vit"), [("a", task)], image_processor("vit"), progress=False)


def test_the_ensemble_is_evaluated_over_the_union_labels(data_api):
    a = tiny_model("vit", 2, labels=["zero", "one"], seed=1)
    b = tiny_model("vit", 2, labels=["two", "three"], seed=2)
    ensemble = Ensemble([a, b])
    task = make_task(data_api, [0, 1, 2, 0], ["three", "zero", "one"], seed=4)
    evaluation = evaluate_classifier(ensemble, [("digits", task)], image_processor("vit"), progress=False,
                                     name="ensemble", role="ensemble", measure_cost=False)
    preds, _ = _predictions(ensemble, task, image_processor("vit"))
    truth = [[3, 0, 1][label] for label in task.labels]  # union: zero, one, two, three
    assert evaluation.tasks[0].metrics["accuracy"] == pytest.approx(accuracy_score(truth, preds))
    assert evaluation.parameters == count_parameters(a) + count_parameters(b)
    assert evaluation.flops is None and evaluation.latency_ms is None


METRIC_FILE = '''
def compute(predictions, references):
    agree = sum(p == r for p, r in zip(predictions, references))
    return {"exact": agree / len(references), "accuracy": -1.0, "note": "not a number"}
'''


def test_a_local_metric_file_adds_its_numbers(data_api, tmp_path):
    path = tmp_path / "exact.py"
    path.write_text(METRIC_FILE)
    metric = load_metric(str(path))
    model = tiny_model("vit", labels=["zero", "one", "two"], seed=3)
    task = make_task(data_api, [0, 1, 2, 2, 1, 0], ["zero", "one", "two"], seed=5)
    evaluation = evaluate_classifier(model, [("a", task)], image_processor("vit"), progress=False, metrics=[metric],
                                     measure_cost=False)
    scores = evaluation.tasks[0].metrics
    preds, _ = _predictions(model, task, image_processor("vit"))
    assert scores["exact"] == pytest.approx(accuracy_score(task.labels, preds))
    assert scores["exact:accuracy"] == -1.0  # a name hfmerge already computed is not overwritten
    assert scores["accuracy"] == pytest.approx(scores["exact"])
    assert "note" not in scores


def test_metric_modules_import_evaluate_only_when_asked(tmp_path, monkeypatch):
    (tmp_path / "exact.py").write_text(METRIC_FILE)
    monkeypatch.setitem(sys.modules, "evaluate", None)  # any `import evaluate` now fails, installed or not
    metric = load_metric(str(tmp_path / "exact.py"))  # a local compute() file needs no evaluate
    assert metric([1, 2], [1, 3])["exact"] == 0.5
    with pytest.raises(EvaluationError, match=r"pip install 'hfmerge\[eval\]'"):
        load_metric("accuracy")  # a Hub metric by name does
    with pytest.raises(EvaluationError, match="does not exist"):
        load_metric(str(tmp_path / "missing.py"))


def test_segmenter_mean_iou_equals_scikit_learn_on_upsampled_predictions():
    import transformers
    from sklearn.metrics import jaccard_score

    from hfmerge.eval.evaluate import SegmentationSamples, evaluate_segmenter
    from hfmerge.testing.tiny import spread_weights

    model = spread_weights(tiny_model("segformer", 4, seed=1), seed=1)
    processor = transformers.SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_reduce_labels=False)
    rng = torch.Generator().manual_seed(6)
    images = [PIL.Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    maps = []
    for _ in images:
        labels = torch.randint(0, 4, (40, 48), generator=rng)
        labels[:5] = 255  # void rows
        maps.append(PIL.Image.fromarray(labels.byte().numpy()))
    samples = SegmentationSamples(images, maps, processor, dataset="org/scenes", split="validation")
    evaluation = evaluate_segmenter(model, [("scenes", samples)], batch_size=2, progress=False, name="seg",
                                    measure_cost=False)
    result = evaluation.tasks[0]
    # by hand: the processor's maps, logits resized to them, argmax, IoU over the pixels that are not void
    encoded = processor(images=images, segmentation_maps=maps, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=encoded["pixel_values"]).logits
    preds = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    truth = encoded["labels"].long()
    keep = truth != 255
    assert keep.any() and not keep.all() and len(preds[keep].unique()) > 1
    assert result.metrics["mean_iou"] == pytest.approx(jaccard_score(truth[keep], preds[keep], average="macro"),
                                                       abs=1e-6)
    assert (result.samples, result.kind, result.dataset, result.split) == (3, "image-segmentation", "org/scenes",
                                                                           "validation")
    assert result.main_metric == "mean_iou"


def test_through_an_accelerator_the_numbers_are_the_same(data_api):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = tiny_model("vit", labels=["zero", "one", "two"], seed=3)
    task = make_task(data_api, [0, 1, 2, 2, 1, 0, 1], ["zero", "one", "two"], seed=7)
    plain = evaluate_classifier(model, [("a", task)], image_processor("vit"), batch_size=3, progress=False,
                                measure_cost=False)
    try:
        accelerated = evaluate_classifier(model, [("a", task)], image_processor("vit"), batch_size=3,
                                          progress=False, measure_cost=False, accelerator=Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert accelerated.tasks == plain.tasks and accelerated.tasks[0].samples == 7
