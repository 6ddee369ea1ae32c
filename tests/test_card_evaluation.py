"""The card's evaluation section: a table, the chart beside README.md, and model-index that huggingface_hub parses."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from huggingface_hub import ModelCard
from test_card import card_of, metadata, section

from hfmerge.eval.report import EvaluationReport, ModelEvaluation, TaskResult
from hfmerge.publish.card import update_card
from hfmerge.publish.result import write_metadata


def report_of(merged_accuracy: float, name: str = "merged") -> EvaluationReport:
    def tasks(accuracy):
        return [TaskResult("digits", "org/digits", "test", {"accuracy": accuracy, "f1": accuracy / 2}, 50),
                TaskResult("mirrored", "org/mirrored", "test", {"accuracy": accuracy / 4, "f1": 0.125}, 40)]

    return EvaluationReport(models=[
        ModelEvaluation(name, "merged", tasks(merged_accuracy), 123, 4567, 2.0, 8, "cpu"),
        ModelEvaluation("vit-1", "source", tasks(0.5), 123, 4567, 2.0, 8, "cpu"),
    ])


def model_index(text: str) -> dict:
    data = ModelCard(text).data
    return {"name": data.model_name,
            "results": {(r.task_name, r.metric_type): r.metric_value for r in data.eval_results or []}}


EXPECTED = {("digits", "accuracy"): 0.8, ("digits", "f1"): 0.4, ("mirrored", "accuracy"): 0.2,
            ("mirrored", "f1"): 0.125}


def test_an_evaluated_merge_has_the_table_the_chart_and_model_index(make_source, tmp_path):
    sources = make_source("vit", seed=1), make_source("vit", seed=2)
    result, card = card_of(sources, "average")
    assert "## Evaluation" not in card and "model-index" not in card
    assert "evaluation.svg" not in result.files
    result.evaluation = report_of(0.8)
    write_metadata(result)
    card = (result.staging / "README.md").read_text()
    evaluation = section(card, "Evaluation")
    assert "| merged | merged | 0.8000 | 0.2000 | 0.5000 | 123 |" in evaluation  # mean (0.8 + 0.2) / 2
    assert "![Evaluation](evaluation.svg)" in evaluation
    assert card.index("## What was merged") < card.index("## Evaluation") < card.index("## Usage")
    saved = result.save(tmp_path / "out")
    bars = [r for r in ET.parse(saved / "evaluation.svg").getroot().iter("{http://www.w3.org/2000/svg}rect")
            if r.get("class") == "bar"]
    assert len(bars) == 4  # 2 models × 2 tasks
    loaded = ModelCard.load(saved / "README.md")
    assert model_index(str(loaded)) == {"name": "merged", "results": EXPECTED}
    assert metadata(card)["tags"] == ["hfmerge", "merge", "average"]  # the rest of the metadata stays


def test_attach_evaluation_restages_the_card_and_chart_without_local_paths(make_source, tmp_path):
    a, b = make_source("vit", seed=1), make_source("vit", seed=2)
    result, before = card_of([a, b], "average")
    saved = result.save(tmp_path / "before")  # shares the staged files through hard links
    report = report_of(0.8)
    report.models[1].name = str(a)  # a source evaluated from its folder: the card names the folder only
    result.attach_evaluation(report)
    card = (result.staging / "README.md").read_text()
    svg = (result.staging / "evaluation.svg").read_text()
    assert f"| {a.name} | source | 0.5000 |" in section(card, "Evaluation")
    assert str(tmp_path) not in card and str(tmp_path) not in svg and f">{a.name} (source)<" in svg
    assert model_index(card) == {"name": "merged", "results": EXPECTED}
    assert (saved / "README.md").read_text() == before and not (saved / "evaluation.svg").exists()


def test_update_card_inserts_then_replaces_one_section(make_source):
    _, card = card_of([make_source("vit", seed=1), make_source("vit", seed=2)], "average")
    once = update_card(card, report_of(0.8), "org/vit-merged")
    assert model_index(once) == {"name": "org/vit-merged", "results": EXPECTED}
    assert once.index("## What was merged") < once.index("## Evaluation") < once.index("## Usage")
    assert update_card(once, report_of(0.8), "org/vit-merged") == once  # idempotent
    again = update_card(once, report_of(0.4), "org/vit-merged")
    assert len(re.findall(r"^## Evaluation$", again, re.M)) == 1
    assert "| merged | merged | 0.4000 | 0.1000 | 0.2500 |" in section(again, "Evaluation")
    assert model_index(again)["results"][("digits", "accuracy")] == 0.4
    for title in ("Method", "Sources", "What was merged", "Usage", "Reproduce"):
        assert section(again, title) == section(card, title)
    assert {k: v for k, v in metadata(again).items() if k not in ("model-index",)} == metadata(card)


def test_update_card_appends_to_a_card_without_usage():
    text = "---\nlicense: mit\n---\n# Someone's model\n\nIt classifies.\n"
    updated = update_card(text, report_of(0.8), "someone/model")
    assert updated.index("It classifies.") < updated.index("## Evaluation") < updated.index("### digits")
    assert "![Evaluation](evaluation.svg)" in section(updated, "Evaluation")
    assert "It classifies.\n" in updated and ModelCard(updated).data.license == "mit"
    assert update_card(updated, report_of(0.8), "someone/model") == updated
