"""The demo's CLIP models (:mod:`hfmerge.testing.digit_clip`), made smaller: each tower learns its task under the
base's frozen zero-shot head, and is scored the same by the demo's helper and by ``hfmerge evaluate --base``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import run_cli

from hfmerge.testing.digit_clip import TOWERS, DigitCLIP, train_digit_clip, zero_shot_accuracy

SMALL = DigitCLIP(hidden_size=32, layers=2, heads=2, text_hidden_size=16, projection_dim=16, base_epochs=4,
                  finetune_epochs=3)


@pytest.fixture(scope="module")
def digit_clip(tmp_path_factory):
    return train_digit_clip(tmp_path_factory.mktemp("digit-clip"), SMALL)


def test_each_tower_learns_its_task_under_the_base_zero_shot_head(digit_clip):
    base = transformers.CLIPModel.from_pretrained(digit_clip["base"])
    for name, task in TOWERS.items():
        tower = transformers.CLIPVisionModel.from_pretrained(digit_clip[name])
        moved = [key for key, value in tower.state_dict().items()
                 if not torch.equal(value, base.vision_model.state_dict()[key])]
        assert moved, f"the {name} tower is the base's encoder"
        before = zero_shot_accuracy(base, digit_clip["base"], task)
        after = zero_shot_accuracy(tower, digit_clip["base"], task)
        assert after > before + 0.05, (name, before, after)


def test_the_towers_score_as_hfmerge_evaluate_scores_them(digit_clip, hub_api, tmp_path, capsys):
    """The helper scores the tensors the demo trains on; ``hfmerge evaluate`` reads the pushed dataset through the
    tower's saved image processor: the same accuracy means the processor makes those tensors."""
    from hfmerge.testing.tasks import push_digit_datasets

    datasets = push_digit_datasets(hub_api, "org", tuple(TOWERS.values()))
    for name, task in TOWERS.items():
        report = tmp_path / f"{name}.json"
        code, _, err = run_cli(["evaluate", digit_clip[name], "--data", f"{datasets[task]}:test", "--base",
                                digit_clip["base"], "--json", report, "-q"], capsys)
        assert code == 0, err
        result = json.loads(report.read_text())["models"][0]["tasks"][0]
        tower = transformers.CLIPVisionModel.from_pretrained(digit_clip[name])
        assert result["metrics"]["accuracy"] == pytest.approx(zero_shot_accuracy(tower, digit_clip["base"], task),
                                                              abs=1e-9)
