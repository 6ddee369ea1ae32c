"""The evaluation report: JSON round trip, the Markdown table, model-index through huggingface_hub, the SVG chart."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from huggingface_hub import ModelCard, ModelCardData

from hfmerge.eval.report import EvaluationReport, ModelEvaluation, TaskResult


def _tasks(digits: float, mirrored: float | None) -> list[TaskResult]:
    tasks = [TaskResult("digits", "org/digits", "test", {"accuracy": digits, "f1": digits - 0.01}, 90,
                        revision="a" * 40)]
    if mirrored is not None:
        tasks.append(TaskResult("mirrored", "org/mirrored", "validation", {"accuracy": mirrored, "f1": 0.5}, 60))
    return tasks


def make_report() -> EvaluationReport:
    return EvaluationReport(models=[
        ModelEvaluation("org/vit-a", "source", _tasks(0.95, 0.40), 1000, 2_500_000, 1.5, 32, "cpu"),
        ModelEvaluation("merged", "merged", _tasks(0.90, 0.70), 1000, 2_500_000, 1.25, 32, "cpu"),
        ModelEvaluation("ensemble", "ensemble", _tasks(0.93, 0.80), 2000, 5_000_000, 3.0, 32, "cpu"),
        ModelEvaluation("org/vit-b", "source", _tasks(0.50, None), 1000, 2_500_000, 1.5, 32, "cpu"),
    ])


def test_json_round_trip():
    report = make_report()
    again = EvaluationReport.from_json(report.to_json())
    assert again == report
    assert again.models[1].tasks[0].revision == "a" * 40


def _table(markdown: str) -> list[list[str]]:
    lines = markdown.split("\n\n")[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_markdown_table_rows_are_models_columns_main_metric_mean_and_cost():
    markdown = make_report().markdown()
    header, _, *rows = _table(markdown)
    assert header == ["model", "role", "digits (accuracy)", "mirrored (accuracy)", "mean", "parameters",
                      "FLOPs / image", "latency (ms, batch 32)"]
    assert [row[:2] for row in rows] == [["merged", "merged"], ["org/vit-a", "source"], ["org/vit-b", "source"],
                                         ["ensemble", "ensemble"]]
    assert rows[0][2:] == ["0.9000", "0.7000", "0.8000", "1,000", "2.5 M", "1.25"]  # mean (0.90 + 0.70) / 2
    assert rows[2][3:5] == ["—", "—"]  # no result on a task: no mean either
    assert "### mirrored" in markdown and "org/mirrored, split validation, 60 samples." in markdown
    assert "| merged | 0.7000 | 0.5000 |" in markdown  # the per-task detail table: accuracy, F1
    assert "not a merged model" in markdown  # the ensemble is said to be a reference


def test_model_index_written_by_huggingface_hub_parses_back_with_the_same_values():
    results = make_report().eval_results("org/vit-merged")  # not a model of the report: the merged one
    data = ModelCardData(model_name="org/vit-merged", eval_results=results, library_name="transformers")
    text = str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# card\n"))
    assert "model-index" in text
    parsed = ModelCard(text).data
    assert parsed.model_name == "org/vit-merged"
    got = {(r.task_name, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in parsed.eval_results}
    assert got == {
        ("digits", "org/digits", "test", "accuracy"): 0.90, ("digits", "org/digits", "test", "f1"): 0.89,
        ("mirrored", "org/mirrored", "validation", "accuracy"): 0.70,
        ("mirrored", "org/mirrored", "validation", "f1"): 0.5,
    }
    assert {r.task_type for r in parsed.eval_results} == {"image-classification"}
    assert {r.dataset_revision for r in parsed.eval_results if r.task_name == "digits"} == {"a" * 40}
    report = make_report()
    report.models[1].tasks[0].metrics["f1"] = 0.3333333432674408  # float32's 1/3, as torchmetrics gives it
    assert {r.metric_value for r in report.eval_results() if r.metric_type == "f1"} == {0.333333, 0.5}
    by_name = make_report().eval_results("org/vit-a")  # a model of the report by its name
    assert {r.metric_value for r in by_name if r.metric_type == "accuracy"} == {0.95, 0.40}


def test_bar_chart_is_svg_with_one_bar_per_model_and_task_a_legend_and_axis_labels():
    svg = make_report().bar_chart_svg()
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    bars = [r for r in root.iter(f"{ns}rect") if r.get("class") == "bar"]
    assert sorted((b.get("data-model"), b.get("data-task")) for b in bars) == sorted(
        [(m, t) for m in ("merged", "org/vit-a", "ensemble") for t in ("digits", "mirrored")]
        + [("org/vit-b", "digits")])
    heights = {(b.get("data-model"), b.get("data-task")): float(b.get("height")) for b in bars}
    # heights in proportion to the values, 0.9 and 0.5
    assert heights[("merged", "digits")] / heights[("org/vit-b", "digits")] == pytest.approx(0.9 / 0.5, rel=1e-3)
    texts = [t.text for t in root.iter(f"{ns}text")]
    legend = [t.text for t in next(g for g in root.iter(f"{ns}g") if g.get("class") == "legend").iter(f"{ns}text")]
    assert legend == ["merged (merged)", "org/vit-a (source)", "org/vit-b (source)", "ensemble (ensemble)"]
    assert "task" in texts and "accuracy" in texts  # the axis labels


def test_latency_cells_state_their_batch_when_the_models_used_different_ones():
    report = make_report()
    report.models[0].batch_size, report.models[0].latency_ms = 8, 1234.5
    header, _, *rows = _table(report.markdown())
    assert header[-1] == "latency (ms)"
    assert [row[-1] for row in rows] == ["1.25 (batch 32)", "1,234 (batch 8)", "1.5 (batch 32)", "3 (batch 32)"]


def _latency_cells(report: EvaluationReport) -> dict[str, str]:
    _, _, *rows = _table(report.markdown())
    return {row[0]: row[-1] for row in rows}


def test_a_latency_whose_passes_spread_widely_is_flagged_in_the_table_and_the_card():
    from hfmerge.publish.card import update_card

    report = make_report()
    report.models[1].latency_spread = 0.40  # merged: quartiles 40% of the median apart
    report.models[0].latency_spread = 0.05  # a source: steady
    cells = _latency_cells(report)
    assert cells == {"merged": "1.25 (unstable)", "org/vit-a": "1.5", "org/vit-b": "1.5", "ensemble": "3"}
    assert "merged: the interquartile range of its timed passes is 40% of their median" in report.markdown()
    card = update_card("", report, "org/vit-merged")
    assert "| merged | merged |" in card and "1.25 (unstable)" in card and "not to be compared" in card
    assert EvaluationReport.from_json(report.to_json()).models[1].latency_spread == 0.40


def test_models_of_one_size_whose_latencies_disagree_are_all_flagged():
    report = make_report()
    for model, milliseconds in zip(report.models, (468.0, 7.2, None, 464.0)):
        model.latency_ms, model.latency_spread = milliseconds, 0.02  # each steady on its own
    report.models[2].latency_ms = 900.0  # the ensemble: twice the work, so not compared with them
    cells = _latency_cells(report)
    assert cells == {"merged": "7.2 (unstable)", "org/vit-a": "468 (unstable)", "org/vit-b": "464 (unstable)",
                     "ensemble": "900"}
    assert "merged, org/vit-a, org/vit-b do the same work, yet their latencies differ 65×" in report.markdown()
    report.models[1].latency_ms = 300.0  # within 2× of the others: nothing to flag
    assert "unstable" not in report.markdown()


def test_a_report_written_before_the_spread_was_recorded_reads_back_unflagged():
    data = json.loads(make_report().to_json())
    for model in data["models"]:
        del model["latency_spread"]
    again = EvaluationReport.from_json(json.dumps(data))
    assert [m.latency_spread for m in again.models] == [None] * 4
    assert "unstable" not in again.markdown()


def test_every_public_name_of_hfmerge_eval_resolves():
    import hfmerge.eval

    assert sorted(hfmerge.eval.__all__) == sorted(hfmerge.eval._LAZY)
    for name in hfmerge.eval.__all__:
        assert getattr(hfmerge.eval, name).__name__ == name


def zero_shot_report() -> EvaluationReport:
    """A CLIPModel merge scored with its own text tower and two towers scored with the base's, by given prompts."""
    from hfmerge.eval.report import ZeroShotScoring

    prompts = ["a photo of a {}.", "a sketch of a {}."]
    rows = [ModelEvaluation(name, role, _tasks(accuracy, None), 1000, 2_500_000, 1.5, 32, "cpu",
                            zero_shot=ZeroShotScoring(text, prompts))
            for name, role, accuracy, text in (("org/clip-merged", "merged", 0.8, "org/clip-merged"),
                                               ("org/tower-a", "source", 0.7, "org/clip-base"),
                                               ("org/tower-b", "source", 0.6, "org/clip-base"))]
    for row in rows:
        row.tasks[0].kind = "zero-shot-image-classification"
    return EvaluationReport(models=rows)


def test_zero_shot_rows_name_their_prompts_and_whose_text_tower_scored_them():
    report = zero_shot_report()
    again = EvaluationReport.from_json(report.to_json())
    assert again == report
    assert json.loads(report.to_json())["models"][1]["zero_shot"] == {
        "text_tower": "org/clip-base", "prompts": ["a photo of a {}.", "a sketch of a {}."], "default_prompts": False}
    note = again.markdown().split("\n\n")[1]
    assert ("each name is written into the prompt templates `a photo of a {}.`, `a sketch of a {}.` and embedded by "
            "the model's own text tower (org/clip-merged) and by the text tower of org/clip-base (org/tower-a, "
            "org/tower-b);") in note
    assert "hfmerge's defaults" not in note

    for row in report.models:  # one text tower and hfmerge's prompts for every row: said once, rows not listed
        assert row.zero_shot is not None
        row.zero_shot.text_tower, row.zero_shot.default_prompts = "org/clip-base", True
    note = report.markdown().split("\n\n")[1]
    assert "`a sketch of a {}.` (hfmerge's defaults) and embedded by the text tower of org/clip-base;" in note
    assert "(org/tower-a" not in note and "own text tower" not in note


def test_a_zero_shot_report_written_before_prompts_were_recorded_reads_back():
    """Format 1 as hfmerge wrote it before the zero-shot fields: it loads, and its note claims no prompts."""
    old = {"format": 1, "models": [{
        "name": "tower", "role": "merged", "parameters": 10, "flops": 20, "latency_ms": 1.0, "batch_size": 8,
        "device": "cpu", "latency_spread": 0.1,
        "tasks": [{"task": "pets", "dataset": "pets", "split": "train", "metrics": {"accuracy": 0.5}, "samples": 8,
                   "kind": "zero-shot-image-classification", "revision": None}]}]}
    report = EvaluationReport.from_json(json.dumps(old))
    assert report.models[0].zero_shot is None and report.models[0].tasks[0].metrics == {"accuracy": 0.5}
    note = report.markdown().split("\n\n")[1]
    assert note.endswith("Zero-shot rows classify each task's images among that task's class names, written into "
                         "prompt templates and embedded by a text tower.")
