"""Synthetic street-like scenes for semantic segmentation, in a source and a shifted target domain.

The layer-wise merging paper (layerwise-uda-merge, §4.1) adapts segmenters
from a synthetic source (GTA, Synthia) to a real target (Cityscapes) without
target labels. This module is that setting in miniature, deterministic and
seeded, with no download:

- every scene is a "road" background with "building" rectangles, round
  "vegetation", triangular "sign"s and striped "fence" bands, drawn in random
  order (later shapes occlude earlier ones), each pixel labelled by the class
  drawn last on it;
- the **source** domain renders them clean: flat class colours with a small
  jitter, a fence of sharp vertical stripes, little noise (the game engine);
- the **target** domain renders the same kind of scene as a camera might:
  other textures (a noisy road, windowed buildings, speckled vegetation,
  blurred fence stripes at another period), shifted class colours, a per-image
  colour cast, lower contrast, brightness changes and sensor noise.

A domain is a ``datasets.DatasetDict`` (``train``, ``validation``, ``test``)
with an ``image`` column (RGB) and an ``annotation`` column (the label map as a
greyscale PNG, one class index per pixel), the layout of Hub segmentation sets
such as ``scene_parse_150``. :func:`push_segmentation_dataset` writes it as a
parquet dataset repo with a card of its own (the digit tasks' card assumes a
``label`` class column).

The second half is the model zoo: tiny SegFormers trained with a plain seeded
PyTorch loop — a source-only model, then unsupervised domain adaptation (UDA)
from it with source labels and unlabeled target images only:
class-balanced self-training, class-balanced entropy minimisation and
IW-MaxSquare (:func:`adapt`, :data:`UDA_METHODS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

    from benchmarks.suite.bench import Bench

CLASSES = ("road", "building", "vegetation", "sign", "fence")
"""Label index → name; index 0 is the background every scene starts from."""
DOMAINS = ("source", "target")
SPLITS = ("train", "validation", "test")
SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_029}
"""Added to a split's seed so the splits of one domain never draw the same scene."""
DOMAIN_OFFSET = {"source": 0, "target": 5_000_011}
VERSION = 2
"""Part of every cache key: raise it when the scenes or the training change, so cached zoos are rebuilt."""
CONSTRUCTION = {4: 1}
"""Fence merged into building: Cityscapes' "construction" category (building, wall, fence) as one class."""
CONSTRUCTION_CLASSES = ("road", "construction", "vegetation", "sign")


@dataclass(frozen=True)
class SceneSpec:
    """The size of the scene sets: image side in pixels and images per split."""

    size: int = 32
    train: int = 512
    validation: int = 64
    test: int = 128

    def count(self, split: str) -> int:
        return {"train": self.train, "validation": self.validation, "test": self.test}[split]


# -- the layout of a scene (the same for both domains) ----------------------------------------
def scene_labels(rng: np.random.Generator, size: int) -> np.ndarray:
    """One scene's label map (``size``×``size``, uint8 class indices), shapes drawn in random order."""
    ys, xs = np.mgrid[0:size, 0:size]
    shapes = ([(1, _rectangle)] * int(rng.integers(1, 4)) + [(2, _disc)] * int(rng.integers(1, 3))
              + [(3, _triangle)] * int(rng.integers(0, 3)) + [(4, _band)] * int(rng.integers(0, 2)))
    labels = np.zeros((size, size), dtype=np.uint8)
    for i in rng.permutation(len(shapes)):
        kind, draw = shapes[i]
        labels[draw(rng, size, ys, xs)] = kind
    return labels


def _rectangle(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    height, width = rng.integers(size // 4, size * 3 // 5, endpoint=True), rng.integers(size // 6, size // 2)
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    return (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)


def _disc(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    radius = rng.uniform(size / 10, size / 5)
    cy, cx = rng.uniform(0, size, 2)
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2


def _triangle(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """An upright isosceles triangle (a warning sign)."""
    half, height = rng.uniform(size / 10, size / 5), rng.uniform(size / 6, size / 3)
    cx, base = rng.uniform(0, size), rng.uniform(height, size)
    inside_height = (ys <= base) & (ys >= base - height)
    return inside_height & (np.abs(xs - cx) <= half * (ys - (base - height)) / height)


def _band(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A horizontal band across part of the image (a fence)."""
    height = rng.integers(size // 8, size // 4, endpoint=True)
    top = rng.integers(size // 3, size - height + 1)
    left = rng.integers(0, size // 2)
    right = rng.integers(left + size // 3, size + 1)
    return (ys >= top) & (ys < top + height) & (xs >= left) & (xs < right)


# -- rendering ------------------------------------------------------------------------------
SOURCE_COLOURS = np.array([[110, 110, 115], [150, 85, 60], [55, 150, 60], [225, 200, 40], [200, 200, 200]], float)
TARGET_COLOURS = np.array([[105, 105, 100], [140, 95, 75], [65, 135, 60], [220, 180, 50], [185, 185, 175]], float)
"""Class colours of the target: muted and shifted, as real materials are against a game's."""


def render(labels: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The RGB image (uint8 ``H×W×3``) of a label map in ``domain`` (see the module docstring)."""
    if domain == "source":
        return _render_source(labels, rng)
    if domain == "target":
        return _render_target(labels, rng)
    raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, not {domain!r}")


def _render_source(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = labels.shape[0]
    colours = SOURCE_COLOURS + rng.normal(0, 8, SOURCE_COLOURS.shape)
    image = colours[labels]
    xs = np.arange(size)[None, :]
    stripes = ((xs + rng.integers(0, 4)) // 2) % 2 == 0  # sharp vertical stripes, period 4
    fence = labels == 4
    image[fence & np.broadcast_to(stripes, labels.shape)] = colours[0] * 0.5
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _render_target(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = labels.shape[0]
    colours = TARGET_COLOURS + rng.normal(0, 12, TARGET_COLOURS.shape)
    image = colours[labels]
    ys, xs = np.mgrid[0:size, 0:size]
    texture = np.zeros((size, size))
    texture += (labels == 0) * rng.normal(0, 14, (size, size))  # asphalt grain
    windows = ((ys % 4) < 2) & ((xs % 4) < 2)
    texture += (labels == 1) * windows * -45.0  # windows on facades
    texture += (labels == 2) * rng.choice([-30.0, 0.0, 25.0], (size, size))  # foliage speckle
    stripes = np.where(((xs + rng.integers(0, 6)) // 3) % 2 == 0, -135.0, 0.0)  # period 6, not 4
    texture += (labels == 4) * stripes
    image += texture[..., None]
    image = _soft_blur(image)  # optics: no pixel-sharp edges
    cast = rng.uniform(0.85, 1.15, 3)  # white balance
    contrast = rng.uniform(0.7, 0.95)
    brightness = rng.uniform(-20, 20)
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = (mean + (image - mean) * contrast) * cast + brightness
    image += rng.normal(0, 8, image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _soft_blur(image: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur with edge padding (a soft lens)."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:])[:h, :w] / 4


# -- splits as arrays and as datasets --------------------------------------------------------
def scene_arrays(domain: str, split: str, spec: SceneSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes of ``domain``: images (N×H×W×3 uint8) and label maps (N×H×W uint8), deterministic.

    The two domains draw different scenes (their seeds differ), as GTA's and
    Cityscapes' images show different streets.
    """
    rng = np.random.default_rng(seed + SPLIT_OFFSET[split] + DOMAIN_OFFSET[domain])
    maps = np.stack([scene_labels(rng, spec.size) for _ in range(spec.count(split))])
    images = np.stack([render(m, domain, rng) for m in maps])
    return images, maps


def fuse_classes(maps: np.ndarray, fused: dict[int, int]) -> np.ndarray:
    """Label maps with classes merged: ``fused`` maps an old index to a new one, the rest renumbered in order."""
    table = fused_table(len(CLASSES), fused)
    return table[maps]


def fused_table(num_classes: int, fused: dict[int, int]) -> np.ndarray:
    """Old class index → new index when ``fused`` classes are merged into others (kept classes stay in order)."""
    kept = [c for c in range(num_classes) if c not in fused]
    new = {c: kept.index(c) for c in kept}
    return np.array([new[fused.get(c, c)] for c in range(num_classes)], dtype=np.uint8)


def segmentation_dataset(images: np.ndarray, maps: np.ndarray) -> datasets.Dataset:
    """Rows of ``image`` (RGB PNG) and ``annotation`` (greyscale PNG of class indices)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    rows = {"image": [Image.fromarray(i, mode="RGB") for i in images],
            "annotation": [Image.fromarray(m, mode="L") for m in maps]}
    return datasets.Dataset.from_dict(rows, features=features)


def domain_dataset(domain: str, spec: SceneSpec, *, fused: dict[int, int] | None = None,
                   splits: Sequence[str] = SPLITS, seed: int = 0) -> datasets.DatasetDict:
    """A domain's ``splits`` as a ``DatasetDict`` (labels with ``fused`` classes merged, when given)."""
    import datasets

    built = {}
    for split in splits:
        images, maps = scene_arrays(domain, split, spec, seed)
        built[split] = segmentation_dataset(images, fuse_classes(maps, fused) if fused else maps)
    return datasets.DatasetDict(built)


def dataset_card(name: str, task: datasets.DatasetDict, class_names: Sequence[str], description: str) -> str:
    """A dataset card for a segmentation repo: configs, features, splits, the classes, and how it was made."""
    lines = ["---", "license: cc0-1.0", "task_categories:", "- image-segmentation",
             "task_ids:", "- semantic-segmentation", "configs:", "- config_name: default", "  data_files:"]
    for split in task:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["dataset_info:", "  features:", "  - name: image", "    dtype: image", "  - name: annotation",
              "    dtype: image", "  splits:"]
    lines += [f"  - name: {split}\n    num_bytes: {task[split].data.nbytes}\n    num_examples: {len(task[split])}"
              for split in task]
    lines += ["---", f"# {name}", "", description, "",
              "`annotation` is a greyscale PNG whose pixel values are class indices:", "",
              "| index | class |", "|---|---|"]
    lines += [f"| {i} | {label} |" for i, label in enumerate(class_names)]
    return "\n".join(lines) + "\n"


def push_segmentation_dataset(bench: Bench, name: str, build: Callable[[], datasets.DatasetDict], key: str,
                              class_names: Sequence[str], description: str) -> str:
    """Build (or take from the cache) a segmentation ``DatasetDict`` and push it as dataset repo ``namespace/name``.

    The parquet files are written as :func:`hfmerge.testing.tasks.write_parquet_repo`
    writes them (pyarrow, one file per split); its card assumes a ``label`` class column, so
    the card here is :func:`dataset_card`.
    """
    def write(folder: Path) -> None:
        task = build()
        _write_parquet(folder, task)
        (folder / "README.md").write_text(dataset_card(name, task, class_names, description))

    return bench.push_folder(name, bench.cached(f"data-{name}", key, write), repo_type="dataset")


def _write_parquet(folder: Path, task: datasets.DatasetDict) -> None:
    import pyarrow.parquet as pq

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, dataset in task.items():
        pq.write_table(dataset.flatten_indices().data.table, data / f"{split}-00000-of-00001.parquet")


# -- the model zoo ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Training:
    """How a model of the zoo is trained: the SegFormer's widths, steps, batch, learning rates, UDA weights."""

    hidden_sizes: tuple[int, ...] = (16, 32, 64)
    source_steps: int = 600
    uda_steps: int = 300
    batch: int = 16
    learning_rate: float = 3e-3
    uda_learning_rate: float = 5e-4
    checkpoints: int = 3
    methods: tuple[str, ...] = ("self-training", "entropy")
    """The UDA strategies trained (:data:`UDA_METHODS`), each from the source-only model."""
    self_training_weight: float = 1.0
    entropy_weight: float = 0.1
    maxsquare_weight: float = 0.1
    confidence: float = 0.9


UDA_METHODS = {
    "self-training": "class-balanced self-training: pseudo-labels from the model's own target prediction, "
                     "kept where the confidence reaches min(0.9, the batch median of the class) (CBST)",
    "entropy": "entropy minimisation (MinEnt) with each pixel weighted by the inverse batch frequency of its "
               "predicted class",
    "maxsquare": "MaxSquare loss with image-wise class balancing (IW-MaxSquare, α = 0.2)",
}
"""The UDA strategies of the zoo, as the table describes them."""


def segformer_config(labels: Sequence[str], hidden_sizes: Sequence[int]) -> object:
    """A small ``SegformerConfig``: one block per stage, a 7×7 stride-4 stem as in the real MiT encoders."""
    from transformers import SegformerConfig

    n = len(hidden_sizes)
    config = SegformerConfig(
        num_encoder_blocks=n, depths=[1] * n, sr_ratios=[2] * (n - 1) + [1], hidden_sizes=list(hidden_sizes),
        num_attention_heads=[1] + [2] * (n - 1), decoder_hidden_size=2 * hidden_sizes[0],
        patch_sizes=[7] + [3] * (n - 1), strides=[4] + [2] * (n - 1), mlp_ratios=[2] * n,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    config.architectures = ["SegformerForSemanticSegmentation"]
    return config


def new_segformer(labels: Sequence[str], hidden_sizes: Sequence[int], seed: int) -> torch.nn.Module:
    """A freshly initialised SegFormer, its initialisation drawn from ``seed`` (not from whatever ran before)."""
    from transformers import SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(segformer_config(labels, hidden_sizes))


def image_processor(size: int) -> object:
    """The processor every model of the zoo saves: ``size`` px, ImageNet normalisation, labels kept as they are."""
    from transformers import SegformerImageProcessorPil

    return SegformerImageProcessorPil(size={"height": size, "width": size}, do_reduce_labels=False)


def unit_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×3`` images as float ``N×3×H×W`` in [0, 1] (the processor's rescaling, before normalising)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def normalise(pixels: torch.Tensor, processor: object) -> torch.Tensor:
    """``pixels`` in [0, 1] normalised as ``processor`` does (the images are already its size, so no resize)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def photometric_jitter(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image channel gains (±30 %), contrast (60–100 %), brightness (±0.15) and noise on [0, 1] pixels.

    The colour augmentation UDA frameworks apply to source images (DACS, DAFormer);
    without it the source-only model learns the source's exact colours.
    """
    n = pixels.shape[0]
    gain = 1 + 0.3 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    contrast = 1 - 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    mean = pixels.mean(dim=(2, 3), keepdim=True)
    jittered = (mean + (pixels - mean) * contrast) * gain + brightness
    return (jittered + 0.04 * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)


def full_size_logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's logits resized (bilinear) to the input size, as the evaluation resizes them to the maps."""
    logits = model(pixel_values=pixel_values).logits
    return torch.nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear",
                                           align_corners=False)


def train_source(model: torch.nn.Module, images: np.ndarray, maps: np.ndarray, processor: object,
                 training: Training, seed: int) -> torch.nn.Module:
    """Supervised training on the labelled source domain (the "source-only" model of UDA papers)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels, labels = unit_pixels(images), torch.from_numpy(maps).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate)
    model.train()
    for _ in range(training.source_steps):
        batch = torch.randint(0, len(pixels), (training.batch,), generator=generator)
        inputs = normalise(photometric_jitter(pixels[batch], generator), processor)
        loss = torch.nn.functional.cross_entropy(full_size_logits(model, inputs), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def self_training_loss(logits: torch.Tensor, confidence: float) -> torch.Tensor:
    """Cross-entropy against the model's own class-balanced pseudo-labels (CBST, Zou et al., ECCV 2018).

    A pixel predicted as class c is kept when its confidence reaches min(``confidence``,
    the batch median of class c): a single threshold keeps only the easy, frequent
    classes, and self-training then erases the rare ones (the fence did, in our runs).
    """
    with torch.no_grad():
        confidence_map, pseudo = logits.softmax(dim=1).max(dim=1)
        keep = torch.zeros_like(pseudo, dtype=torch.bool)
        for c in pseudo.unique():
            predicted = pseudo == c
            threshold = min(confidence, float(confidence_map[predicted].median()))
            keep |= predicted & (confidence_map >= threshold)
        pseudo[~keep] = 255
    return torch.nn.functional.cross_entropy(logits, pseudo, ignore_index=255)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy (MinEnt, Vu et al., ADVENT, CVPR 2019, Eq. 2), class-balanced.

    Each pixel is weighted by the inverse batch frequency of its predicted class
    (normalised to mean one), the image-wise class balancing of MaxSquare (Chen et al.,
    ICCV 2019): plain entropy minimisation collapses the rare fence into road.
    """
    log_p = logits.log_softmax(dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    with torch.no_grad():
        predicted = logits.argmax(dim=1)
        frequency = torch.bincount(predicted.flatten(), minlength=logits.shape[1]).float() / predicted.numel()
        weight = 1.0 / (frequency[predicted] + 1e-3)
        weight = weight / weight.mean()
    return (weight * entropy).mean()


def maxsquare_loss(logits: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """IW-MaxSquare (Chen et al., ICCV 2019, Eq. 8 and §3.3): −½ Σ_c p_c², pixel weights (N / N_c)^α per image.

    N_c counts the image's pixels predicted as class c: the image-wise class
    balancing that keeps the frequent classes from dominating the gradient.
    """
    p = logits.softmax(dim=1)
    square = -0.5 * (p * p).sum(dim=1)
    with torch.no_grad():
        predicted = p.argmax(dim=1).flatten(1)
        counts = torch.stack([torch.bincount(row, minlength=logits.shape[1]) for row in predicted]).float()
        per_pixel = counts.gather(1, predicted).view_as(square)
        weight = (predicted.shape[1] / per_pixel) ** alpha
        weight = weight / weight.mean()
    return (weight * square).mean()


TARGET_LOSSES = {"self-training": "self_training_weight", "entropy": "entropy_weight", "maxsquare": "maxsquare_weight"}


def target_loss(method: str, logits: torch.Tensor, training: Training) -> torch.Tensor:
    """λ·L_target of a UDA ``method`` on the target half of a batch."""
    weight = getattr(training, TARGET_LOSSES[method])
    if method == "self-training":
        return weight * self_training_loss(logits, training.confidence)
    if method == "entropy":
        return weight * entropy_loss(logits)
    return weight * maxsquare_loss(logits)


def adapt(model: torch.nn.Module, method: str, source: tuple[np.ndarray, np.ndarray], target_images: np.ndarray,
          processor: object, training: Training, seed: int) -> list[dict[str, torch.Tensor]]:
    """Unsupervised domain adaptation of ``model`` (in place): labelled source and unlabelled target batches.

    Each step: a source batch (photometric jitter) and a target batch in one forward
    pass; loss = CE(source) + λ·L_target, L_target by ``method`` (:data:`UDA_METHODS`).
    Returns ``training.checkpoints`` state dicts taken at evenly spaced steps, the last
    the final model (the paper's checkpoints, §4.2: "evenly spaced intervals").
    """
    if method not in UDA_METHODS:
        raise ValueError(f"UDA method must be one of {', '.join(UDA_METHODS)}, not {method!r}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels, labels = unit_pixels(source[0]), torch.from_numpy(source[1]).long()
    target = unit_pixels(target_images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.uda_learning_rate)
    saves = {round(training.uda_steps * (k + 1) / training.checkpoints) for k in range(training.checkpoints)}
    checkpoints = []
    model.train()
    for step in range(1, training.uda_steps + 1):
        s = torch.randint(0, len(pixels), (training.batch,), generator=generator)
        t = torch.randint(0, len(target), (training.batch,), generator=generator)
        inputs = normalise(torch.cat([photometric_jitter(pixels[s], generator), target[t]]), processor)
        logits = full_size_logits(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits[:training.batch], labels[s])
        loss = loss + target_loss(method, logits[training.batch:], training)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in saves:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    return checkpoints


def with_fused_head(model: torch.nn.Module, labels: Sequence[str], fused: dict[int, int],
                    hidden_sizes: Sequence[int]) -> torch.nn.Module:
    """A copy of ``model`` whose classifier has the fused label set: kept classes keep their rows.

    A class merged into another takes that one's row (its logit was the larger
    of the two's where they overlap), so the copy starts from the same segmentation.
    """
    from transformers import SegformerForSemanticSegmentation

    copy = SegformerForSemanticSegmentation(segformer_config(labels, hidden_sizes))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decode_head.classifier.")}
    copy.load_state_dict(state, strict=False)
    kept = [c for c in range(model.config.num_labels) if c not in fused]
    with torch.no_grad():
        copy.decode_head.classifier.weight.copy_(model.decode_head.classifier.weight[kept])
        copy.decode_head.classifier.bias.copy_(model.decode_head.classifier.bias[kept])
    return copy.eval()


def save_segmenter(folder: Path, model: torch.nn.Module, processor: object, title: str, description: str) -> Path:
    """Save a model of the zoo as a Hub repo folder: weights, config, processor and a license card."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-segmentation\n"
        f"tags:\n- segformer\n- domain-adaptation\n---\n# {title}\n\n{description}\n")
    return folder
