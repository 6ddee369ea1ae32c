"""The gating merge's test data: the inverted digit task and model, and the tiny pre-trained MobileNetV2 gate."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hfmerge.testing.digit_models import accuracy
from hfmerge.testing.tasks import digit_task


def test_inverted_digits_are_the_upright_digits_with_255_minus_grey():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()  # 8x8 in 0..16; the tasks show each pixel as a 2x2 block in 0..255
    _, x_test, _, y_test = train_test_split(raw.images, raw.target, test_size=0.3, random_state=0, stratify=raw.target)
    upright, inverted = digit_task("digits")["test"], digit_task("digits-inverted")["test"]
    assert inverted.features["label"].names == [str(d) for d in range(10)] and len(inverted) == len(upright) == 540
    for row in (0, 7, 539):
        image = np.asarray(inverted[row]["image"])  # RGB, grey in every channel
        assert image.shape == (16, 16, 3) and inverted[row]["label"] == y_test[row] == upright[row]["label"]
        for r, c in ((0, 0), (5, 9), (8, 6), (15, 15)):
            assert (image[r, c] == 255 - round(x_test[row][r // 2, c // 2] / 16 * 255)).all()
        assert image[0, 0, 0] == 255  # the digits' corners are empty: a white background
    up = np.stack([np.asarray(upright[i]["image"]) for i in range(len(upright))]).astype(float)
    inv = np.stack([np.asarray(inverted[i]["image"]) for i in range(len(inverted))]).astype(float)
    assert (up + inv == 255).all()
    # trivially separable: every inverted image is brighter on average than any upright one
    assert inv.mean(axis=(1, 2, 3)).min() > up.mean(axis=(1, 2, 3)).max() + 40


def test_the_inverted_model_is_a_competent_source_that_no_other_source_covers(digit_hub):
    from transformers import AutoModelForImageClassification

    assert digit_hub["datasets"]["digits-inverted"] == "org/digits-inverted"
    inverted = AutoModelForImageClassification.from_pretrained(digit_hub["models"]["inverted"])
    upright = AutoModelForImageClassification.from_pretrained(digit_hub["folders"]["upright"])
    base = AutoModelForImageClassification.from_pretrained(digit_hub["folders"]["base"])
    assert (inverted.state_dict()["vit.embeddings.cls_token"] != base.state_dict()["vit.embeddings.cls_token"]).any()
    assert accuracy(inverted, "digits-inverted") > 0.75
    assert accuracy(upright, "digits-inverted") < 0.3 and accuracy(inverted, "digits") < 0.3


def test_the_tiny_gate_loads_by_folder_and_repo_id_as_a_pretrained_mobilenet_v2(digit_hub):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, MobileNetV2ForImageClassification

    assert digit_hub["gate"] == "org/tiny-mobilenet-gate"
    by_folder = AutoModelForImageClassification.from_pretrained(digit_hub["gate_folder"])
    by_id = AutoModelForImageClassification.from_pretrained(digit_hub["gate"])
    assert isinstance(by_folder, MobileNetV2ForImageClassification)
    assert isinstance(by_id, MobileNetV2ForImageClassification)
    assert by_folder.config.image_size <= 32 and by_folder.config.depth_multiplier == 0.35
    for key, value in by_folder.state_dict().items():
        assert torch.equal(value, by_id.state_dict()[key])
    processor = AutoImageProcessor.from_pretrained(digit_hub["gate"])
    images = digit_task("digits")["test"]["image"]
    pixels = processor(list(images), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (540, 3, by_folder.config.image_size, by_folder.config.image_size)
    white = processor(Image.new("RGB", (16, 16), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    assert torch.allclose(white, torch.ones_like(white))  # rescaled to [0, 1], then (x - 0.5) / 0.5
    with torch.no_grad():
        predicted = by_id.eval()(pixel_values=pixels).logits.argmax(-1)
    labels = torch.tensor(digit_task("digits")["test"]["label"])
    assert (predicted == labels).float().mean() > 0.4  # pre-trained, not random (0.1)
