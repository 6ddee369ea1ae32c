"""Parameters given as ``auto``, chosen on validation data, recorded in hfmerge.yaml, and shown in the card.

The expectation is a plain loop written here: merge once per grid point, run
each merged model (loaded with plain transformers) over the validation images,
count the right answers by label name, take the first point of best mean accuracy.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import transformers
import yaml
from helpers import assert_one_line_error, run_cli
from PIL import Image

import hfmerge
from hfmerge.methods.base import ParamSpec

LABELS = ["class_0", "class_1", "class_2"]


def labeled_folder(folder, *, splits=("validation", "test"), per_class=4, seed=0):
    """An image folder with one subfolder per split, then per class (random RGB images)."""
    generator = torch.Generator().manual_seed(seed)
    for split in splits:
        for label in LABELS:
            target = folder / split / label if split else folder / label
            target.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(target / f"{label}-{i}.png")
    return folder


def accuracy_by_hand(folder, images):
    """The share of ``images`` ((path, label name) pairs) the model in ``folder`` names right."""
    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    right = 0
    for path, label in images:
        pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            predicted = model(pixel_values=pixels).logits.argmax(-1).item()
        right += model.config.id2label[predicted] == label
    return right / len(images)


def split_images(folder, split):
    return sorted((path, path.parent.name) for path in (folder / split).glob("*/*.png"))


@pytest.fixture
def task_vector_sources(make_source):
    return make_source("vit", seed=0), [make_source("vit", seed=s) for s in (1, 2)]


def test_lambda_auto_picks_what_a_hand_loop_picks_and_the_recipe_reproduces_it(task_vector_sources, tmp_path, capsys):
    base, tasks = task_vector_sources
    data = [labeled_folder(tmp_path / f"task{i}", seed=i) for i in (1, 2)]
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *tasks, "-m", "task_arithmetic", "--base", base, "--lambda", "auto",
                            *(a for d in data for a in ("--eval-data", f"{d}:test")), "-o", out, "-q"], capsys)
    assert code == 0, err
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the TIES paper's code's task-vector grid
    means = []
    for lam in grid:
        folder = hfmerge.merge([str(t) for t in tasks], method="task_arithmetic", base=str(base), lambda_=lam,
                               progress=False).save(tmp_path / f"hand-{lam}")
        means.append(sum(accuracy_by_hand(folder, split_images(d, "validation")) for d in data) / len(data))
    best = grid[means.index(max(means))]  # the first of equal means
    recipe = (out / "hfmerge.yaml").read_text()
    assert yaml.safe_load(recipe)["parameters"]["lambda"] == best
    assert recipe.startswith(f"# lambda = {best:g}: chosen by hfmerge on validation data")
    card = (out / "README.md").read_text()
    section = card[card.index("## Parameter search"):]
    rows = re.findall(r"^\| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| (chosen)? ?\|$", section, re.M)
    assert [float(lam) for lam, _, _ in rows] == grid
    assert [float(mean) for _, mean, _ in rows] == pytest.approx(means, abs=5e-5)
    assert [float(lam) for lam, _, chosen in rows if chosen] == [best]
    assert "![Parameter search](search.svg)" in section and f"| `lambda` | {best} (chosen on validation data" in card
    assert card.index("## What was merged") < card.index("## Parameter search") < card.index("## Evaluation")
    circles = list(ET.parse(out / "search.svg").getroot().iter("{http://www.w3.org/2000/svg}circle"))
    assert len(circles) == len(grid) and sum(c.get("class") == "chosen" for c in circles) == 1
    evaluation = card[card.index("## Evaluation"):]
    for i in (1, 2):  # the test splits whole: each dataset has a validation split of its own, nothing is held out
        assert f"task{i}, split test, 12 samples." in evaluation
    again = tmp_path / "again"
    code, _, err = run_cli(["run", out / "hfmerge.yaml", "-o", again, "-q"], capsys)
    assert code == 0, err
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "## Parameter search" not in (again / "README.md").read_text()  # merged with the number, no search


def test_without_a_validation_split_part_of_the_eval_data_is_held_out_and_left_out_of_the_test(
        task_vector_sources, tmp_path):
    base, tasks = task_vector_sources
    flat = labeled_folder(tmp_path / "flat", splits=("",), per_class=5)  # 15 images, no splits
    result = hfmerge.merge([str(t) for t in tasks], method="ties", base=str(base), density="auto",
                           eval_data=[str(flat)], output=str(tmp_path / "out"), progress=False)
    search = result.record.results["search"]
    assert [p.parameters["density"] for p in search.points] == [0.1, 0.2, 0.3]
    assert search.held_out == [3]  # 20% of 15
    merged = result.evaluation.merged()
    assert merged.tasks[0].samples == 12
    card = (tmp_path / "out" / "README.md").read_text()
    assert "3 of `flat`" in card and "the evaluation below leaves them out" in card
    assert yaml.safe_load((tmp_path / "out" / "hfmerge.yaml").read_text())["parameters"]["density"] == \
        search.chosen["density"]


def test_auto_without_eval_data_is_refused_in_one_line(task_vector_sources, tmp_path, capsys):
    base, tasks = task_vector_sources
    code, _, err = run_cli(["merge", *tasks, "-m", "ties", "--base", base, "--lambda", "auto", "-o", tmp_path / "o"],
                           capsys)
    assert_one_line_error(code, err, "'lambda' = auto is chosen on validation data", "--eval-data")
    code, _, err = run_cli(["merge", *tasks, "-m", "ties", "--base", base, "--param", "trim=auto",
                            "--eval-data", tmp_path, "-o", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "'trim'", "cannot be auto", "density, lambda")
    assert not (tmp_path / "o").exists()


def test_dry_run_says_what_will_be_searched(task_vector_sources, tmp_path, capsys):
    base, tasks = task_vector_sources
    data = labeled_folder(tmp_path / "data")
    code, out, err = run_cli(["merge", *tasks, "-m", "ties", "--base", base, "--lambda", "auto", "--param",
                              "density=auto", "--eval-data", f"{data}:test", "--dry-run"], capsys)
    assert code == 0, err
    assert "search: density ∈ {0.1, 0.2, 0.3} × lambda ∈ {0.8, 0.9, 1, 1.1" in out and "2.5}: 54 merges" in out
    assert "validation split where it has one" in out


def test_every_float_lambda_is_searchable_and_a_grid_stays_in_range():
    assert ParamSpec("lambda", float, 0.3, "λ").grid == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert ParamSpec("lambda", float, 0.3, "λ", maximum=0.5).grid == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert ParamSpec("alpha", float, 0.3, "α").grid == ()
    assert hfmerge.Recipe(sources=["a", "b"], method="task_arithmetic", base="c", parameters={"lambda": "AUTO"},
                          eval_data=["d"]).search_space == {"lambda": ParamSpec("lambda", float, 0, "").grid}
