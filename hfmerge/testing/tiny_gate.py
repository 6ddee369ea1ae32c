"""A tiny pre-trained MobileNetV2 image classifier: the tests' stand-in for ``google/mobilenet_v2_1.0_224``.

The gating merge (paper §3.2) fine-tunes a MobileNetV2 image classifier, with
a new head of one output per source, to say which source an image belongs to;
Table 8 shows that starting from a pre-trained gate matters. Tests cannot
download the real one, so :func:`save_tiny_gate` writes a folder of the same
kind (config, safetensors, and a ``MobileNetV2ImageProcessor`` that resizes and
centre-crops as Google's does) at 32 px and depth multiplier 0.35, pre-trained
for a few seconds on the upright digits' ten classes (a generic task, not the
gate's), so its features are not random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GATE_IMAGE_SIZE = 32
GATE_REPO_NAME = "tiny-mobilenet-gate"


def gate_processor() -> Any:
    """The gate's image processor, Google's recipe at 32 px.

    ``google/mobilenet_v2_1.0_224`` resizes the shortest edge to 256 and crops
    224 (a crop fraction of 0.875), rescales to [0, 1] and normalises with mean
    and std 0.5; here the shortest edge goes to 37 and the crop is 32.
    """
    from transformers import MobileNetV2ImageProcessorPil

    edge = round(GATE_IMAGE_SIZE / 0.875)
    return MobileNetV2ImageProcessorPil(size={"shortest_edge": edge},
                                        crop_size={"height": GATE_IMAGE_SIZE, "width": GATE_IMAGE_SIZE},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)


def tiny_gate(*, epochs: int = 1, learning_rate: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    """A ``MobileNetV2ForImageClassification`` (32 px, depth multiplier 0.35) pre-trained on upright digits.

    Deterministic: seeded initialisation and batch order, trained on one CPU
    thread (the same weights on every run). The images go through
    :func:`gate_processor`, as a user's data would.
    """
    from PIL import Image
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from hfmerge.testing.digit_models import fit
    from hfmerge.testing.tasks import digit_split

    images, targets, names = digit_split("digits", "train")
    pixels = gate_processor()([Image.fromarray(image).convert("RGB") for image in images],
                              return_tensors="pt")["pixel_values"]
    config = MobileNetV2Config(image_size=GATE_IMAGE_SIZE, depth_multiplier=0.35, id2label=dict(enumerate(names)),
                               label2id={name: i for i, name in enumerate(names)})
    config.architectures = ["MobileNetV2ForImageClassification"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread gains little, and on a busy machine costs much
    try:
        torch.manual_seed(seed)
        model = MobileNetV2ForImageClassification(config)
        fit(model, pixels, torch.from_numpy(targets).long(), epochs, learning_rate)
    finally:
        torch.set_num_threads(threads)
    return model


def save_tiny_gate(folder: str | Path, *, epochs: int = 1, seed: int = 0) -> Path:
    """Write :func:`tiny_gate` to ``folder`` as a Hub model repo: weights, config, image processor, license card."""
    folder = Path(folder)
    tiny_gate(epochs=epochs, seed=seed).save_pretrained(folder)
    gate_processor().save_pretrained(folder)
    (folder / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n---\n"
        f"# {GATE_REPO_NAME}\n\nA tiny MobileNetV2 pre-trained briefly on scikit-learn's digits by hfmerge's tests: "
        "a stand-in for google/mobilenet_v2_1.0_224 as the gating merge's gate.\n")
    return folder
