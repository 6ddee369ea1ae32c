"""Reading the selected images of one dataset split, decoded, and feeding them through an image processor.

A Hub dataset is resolved to a commit sha first (``HfApi.dataset_info``) and
read at *that* sha, so the sha recorded in ``hfmerge.yaml`` reproduces the
same rows. With ``samples`` given, only that many are read from a split whose
files are larger than ``sources.STREAM_MIN_BYTES`` (or of unknown size): streamed
(``IterableDataset.shuffle(seed, buffer_size).take(samples)``, which reads
about ``samples + buffer_size`` rows). A smaller split, or any split when
``HF_HUB_OFFLINE`` is set, is downloaded (or read from the cache) and a seeded
subset taken: cheaper than a stream for small files, and the cached copy then
serves offline runs with the same selection. Both are deterministic for a given
seed and spec; they are different selections, and the fingerprint, a digest of
the selected images' pixels and labels, tells them apart.

Local folders are read with ``datasets`` too: a ``save_to_disk`` folder with
``load_from_disk``, any other folder as ``imagefolder`` reads it (flat:
unlabeled; one subfolder per class: labeled). Images are decoded here, not by
``datasets``, so that an image that fails to decode is skipped and counted
instead of ending the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import constants as hf_constants

from hfmerge.data.reading import hub_errors, named_files, no_images_error, open_folder, open_hub, saved_to_disk
from hfmerge.data.spec import DataSpec
from hfmerge.errors import DataError

if TYPE_CHECKING:
    from pathlib import Path

    import datasets
    from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels")
STREAM_BUFFER = 1000  # rows held by the streaming shuffle: the selection is a seeded draw from a window this wide


@dataclass
class ImageData:
    """The selected samples of one dataset split, decoded, ready for an image processor.

    Attributes:
        spec: what the user named.
        name: shown to users and in cards: ``org/ds:split``, or the folder's name (never its path).
        split: the split read.
        commit_sha: the resolved commit sha of a Hub dataset.
        image_column, label_column: the columns read.
        label_names: class names when labeled (``ClassLabel`` names, or imagefolder's folder names).
        images: RGB images, the selected samples in order.
        labels: index into ``label_names``, one per image, when labeled.
        skipped: samples whose image failed to decode.
        fingerprint: hex digest of (commit sha or ``folder``, split, columns, label names, and each
            selected image's pixels and label): equal fingerprints mean equal data.
    """

    spec: DataSpec
    name: str
    split: str
    commit_sha: str | None
    image_column: str
    label_column: str | None
    label_names: list[str] | None
    images: list[Image.Image]
    labels: list[int] | None
    skipped: int
    fingerprint: str
    streamed: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pinned(self) -> DataSpec:
        """The spec that reads exactly this split again: its split named, and a Hub dataset's commit pinned."""
        return replace(self.spec, split=self.split, commit=self.commit_sha or self.spec.commit)

    def subset(self, indices: Iterable[int]) -> ImageData:
        """The samples at ``indices`` (in that order), as data of their own: a held-out part, or the rest."""
        chosen = list(indices)
        images = [self.images[i] for i in chosen]
        labels = [self.labels[i] for i in chosen] if self.labels is not None else None
        return replace(self, images=images, labels=labels, skipped=0, fingerprint=_fingerprint(
            self.commit_sha, self.split, self.image_column, self.label_column, self.label_names, images, labels))


def load_image_data(
    spec: DataSpec | str, *, samples: int | None = None, seed: int = 0, image_column: str | None = None,
    label_column: str | None = None, token: str | bool | None = None, labeled: bool = False,
    streaming: bool | None = None,
) -> ImageData:
    """Read and decode the selected samples of one dataset split.

    Args:
        spec: the dataset (see :mod:`hfmerge.data.spec`).
        samples: how many samples to select, seeded by ``seed``; ``None`` reads the whole split.
            Fewer available: a warning, and all are used.
        image_column, label_column: override the detected columns.
        token: for private or gated Hub datasets; never printed or stored.
        labeled: a label column is required.
        streaming: stream instead of downloading the split; ``None`` streams when ``samples``
            is given, the Hub is reachable (``HF_HUB_OFFLINE`` unset) and the split's files
            are larger than ``sources.STREAM_MIN_BYTES`` or of unknown size.

    Raises:
        DataError: the dataset, revision, split or a column does not exist; no samples, or none decodes.
        HubUnreachableError: the Hub cannot be reached.
    """
    spec = DataSpec.parse(spec)
    if samples is not None and samples < 1:
        raise DataError(f"samples must be a positive number, got {samples}; ask for at least 1")
    if spec.is_local:
        table, split, name, commit_sha = open_folder(spec)
        streamed = False
    else:
        if streaming is None and (samples is None or hf_constants.HF_HUB_OFFLINE):
            streaming = False
        table, split, name, commit_sha, streamed = open_hub(spec, token=token, streaming=streaming)
    # a stream talks to the Hub while it is read
    reading = nullcontext() if spec.is_local else hub_errors(spec.dataset, spec.commit or spec.revision, opening=False)
    # An image folder's labels are its images' subfolders: whether it has labels is asked once its images are
    # read, so that a folder of files that are not images is told so, not that it lacks a label column.
    image_folder = spec.is_local and not saved_to_disk(spec.path)
    with reading:
        features = _features(table)
        image_col = _image_column(features, image_column, name)
        label_col, label_names = _label_column(features, label_column, name, labeled and not image_folder)
        table = _undecoded(table, features, image_col)
        rows = _select(table, samples, seed, name, streamed)
        images, raw_labels, unreadable = _decode_rows(rows, image_col, label_col)
    skipped = len(unreadable)
    if not images:
        if image_folder:
            raise no_images_error(spec)
        raise DataError(f"{name}: none of its {skipped} images could be decoded; check the files")
    if skipped:
        files = [_shown_path(path, spec.path if image_folder else None) for path in unreadable if path]
        logger.warning("%s: %d of %d images failed to decode and were skipped%s", name, skipped,
                       skipped + len(images), f" ({named_files(files)})" if files else "")
    read = skipped + len(images)
    if samples is not None and read < samples:
        logger.warning("%s has %d samples, fewer than the %d asked; using all %d", name, read, samples, read)
    if labeled and label_col is None:
        raise _no_label_column(features, name)
    labels = None
    if label_col is not None:
        labels, label_names = _label_indices(raw_labels, label_names)
    return ImageData(
        spec=spec, name=name, split=split, commit_sha=commit_sha, image_column=image_col, label_column=label_col,
        label_names=label_names, images=images, labels=labels, skipped=skipped,
        fingerprint=_fingerprint(commit_sha, split, image_col, label_col, label_names, images, labels),
        streamed=streamed,
    )


class ProcessedImages(torch.utils.data.Dataset):
    """Items ``{"pixel_values": FloatTensor[C, H, W]}``, plus ``"labels"`` when the data is labeled.

    Each image goes through ``processor`` (a transformers image processor, the
    source model's own) when it is read. ``label_map`` maps dataset label
    indices to the model's (see :func:`label_map_for`); without it labels are
    the dataset's indices.
    """

    def __init__(self, data: ImageData, processor: Any, label_map: dict[int, int] | None = None) -> None:
        self.data = data
        self.processor = processor
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixel_values = self.processor(images=self.data.images[index], return_tensors="pt")["pixel_values"][0]
        item: dict[str, Any] = {"pixel_values": pixel_values}
        if self.data.labels is not None:
            label = self.data.labels[index]
            item["labels"] = self.label_map[label] if self.label_map is not None else label
        return item


def label_map_for(data: ImageData, id2label: dict[int, str] | dict[str, str]) -> dict[int, int]:
    """Dataset label index -> model label index, matched by label name.

    Every label that occurs in the selected samples must be one of the
    model's; the map also covers the dataset's other names the model has.

    Raises:
        DataError: the data is unlabeled, or some of its labels are not the model's (named).
    """
    if data.label_names is None or data.labels is None:
        raise DataError(f"{data.name} has no labels; give a labeled dataset (a label column, or one folder per class)")
    model_index = {str(name): int(index) for index, name in id2label.items()}
    used = sorted(set(data.labels))
    missing = [data.label_names[i] for i in used if data.label_names[i] not in model_index]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:10]) + (f" and {len(missing) - 10} more"
                                                                   if len(missing) > 10 else "")
        known = ", ".join(repr(name) for name in list(model_index)[:10])
        raise DataError(f"{data.name} has labels the model does not know: {shown}; the model's labels are "
                        f"{known}{' ...' if len(model_index) > 10 else ''}: give data of the model's task")
    return {i: model_index[name] for i, name in enumerate(data.label_names) if name in model_index}


# -- columns -----------------------------------------------------------------------


def _features(table: Any) -> datasets.Features:
    features = table.features
    if features is None:  # an IterableDataset whose features are only known from its first rows
        table = table._resolve_features()
        features = table.features
    return features


def _image_column(features: datasets.Features, override: str | None, name: str) -> str:
    import datasets

    columns = list(features)
    if override is not None:
        if override not in features:
            raise DataError(f"{name} has no column {override!r}; its columns are: {', '.join(columns)}")
        return override
    typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if typed:
        if len(typed) > 1:
            logger.info("%s: several image columns (%s); reading %r (choose with --data-column)",
                        name, ", ".join(typed), typed[0])
        return typed[0]
    for candidate in IMAGE_COLUMN_NAMES:
        if candidate in features:
            logger.info("%s: no column has the Image type; reading images from column %r by its name",
                        name, candidate)
            return candidate
    raise DataError(f"{name} has no image column; its columns are: {', '.join(columns)}; "
                    "name the image column with --data-column")


def _label_column(features: datasets.Features, override: str | None, name: str,
                  labeled: bool) -> tuple[str | None, list[str] | None]:
    import datasets

    columns = list(features)
    column = None
    if override is not None:
        if override not in features:
            raise DataError(f"{name} has no column {override!r}; its columns are: {', '.join(columns)}")
        column = override
    else:
        typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        named = [c for c in LABEL_COLUMN_NAMES if c in features]
        column = (typed or named or [None])[0]
    if column is None:
        if labeled:
            raise _no_label_column(features, name)
        return None, None
    feature = features[column]
    return column, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _no_label_column(features: datasets.Features, name: str) -> DataError:
    return DataError(f"{name} has no label column; its columns are: {', '.join(features)}; "
                     "name it with --label-column, or give one folder per class")


def _undecoded(table: Any, features: datasets.Features, column: str) -> Any:
    """The table with its Image column left encoded, so that a bad image can be skipped here."""
    import datasets

    if isinstance(features[column], datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table


# -- selection and decoding --------------------------------------------------------


def _select(table: Any, samples: int | None, seed: int, name: str, streamed: bool) -> Iterable[dict[str, Any]]:
    if streamed:
        if samples is None:
            return table
        return _not_empty(table.shuffle(seed=seed, buffer_size=STREAM_BUFFER).take(samples), name)
    available = len(table)
    if available == 0:
        raise DataError(f"{name} has no samples; give a split that has some")
    if samples is None or samples >= available:
        return table  # fewer than asked: said once the rows are decoded (load_image_data)
    chosen = sorted(random.Random(seed).sample(range(available), samples))
    return table.select(chosen)


def _not_empty(rows: Iterable[dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """The rows of a stream, which is known to be empty only once it is read."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(f"{name} has no samples; give a split that has some")


def _decode_rows(rows: Iterable[dict[str, Any]], image_col: str,
                 label_col: str | None) -> tuple[list[Image.Image], list[Any], list[str | None]]:
    """The images that decode and their labels, and, per image that does not, its file's path where it has one."""
    images: list[Image.Image] = []
    labels: list[Any] = []
    unreadable: list[str | None] = []
    for row in rows:
        value = row[image_col]
        image = _decode(value)
        if image is None:
            unreadable.append(value.get("path") if isinstance(value, dict) else value if isinstance(value, str)
                              else None)
            continue
        images.append(image)
        if label_col is not None:
            labels.append(row[label_col])
    return images, labels, unreadable


def _decode(value: Any) -> Image.Image | None:
    """An RGB image from what a dataset holds (PIL image, {bytes, path}, bytes or a path); ``None`` if it fails."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            return None
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        logger.debug("an image failed to decode: %s", exc)
        return None


def _shown_path(path: str, folder: Path | None) -> str:
    """A file as a message names it: relative to the user's folder, else by its name (not a cache's path)."""
    if folder is None:
        return os.path.basename(path)
    return os.path.relpath(path, folder.resolve()).replace(os.sep, "/")


def _label_indices(raw: list[Any], names: list[str] | None) -> tuple[list[int], list[str]]:
    """Labels as indices into names: ``ClassLabel`` indices as they are; else strings or ints named by value."""
    if names is not None:
        return [int(v) for v in raw], names
    if all(isinstance(v, (int, bool)) for v in raw):
        values = sorted({int(v) for v in raw})
        names = [str(v) for v in range(values[-1] + 1)] if values and values[0] >= 0 else [str(v) for v in values]
        index = {int(n): i for i, n in enumerate(names)}
        return [index[int(v)] for v in raw], names
    names = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in raw], names


def _fingerprint(commit_sha: str | None, split: str, image_col: str, label_col: str | None,
                 label_names: list[str] | None, images: list[Image.Image], labels: list[int] | None) -> str:
    digest = hashlib.sha256(json.dumps({
        "source": commit_sha or "folder", "split": split, "image_column": image_col, "label_column": label_col,
        "label_names": label_names, "samples": len(images),
    }, sort_keys=True).encode())
    for i, image in enumerate(images):
        digest.update(f"{image.size[0]}x{image.size[1]}:".encode())
        digest.update(hashlib.sha256(image.tobytes()).digest())
        if labels is not None:
            digest.update(f":{labels[i]};".encode())
    return digest.hexdigest()
