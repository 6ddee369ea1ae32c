"""The demo's digit tasks as ``datasets`` datasets, and pushing them to a (local) Hub as dataset repos.

scikit-learn's handwritten digits ship with the package, so tests and the
offline demo get real image tasks with no download. Each task is a
``DatasetDict`` with a ``train`` and a ``test`` split (70 / 30, stratified,
``random_state=0``: the split the demo trains on), an ``image`` column (16x16
RGB PIL images, the 8x8 digits scaled by nearest neighbour) and a ``label``
column (``ClassLabel``):

- ``digits``: upright digits, labels ``"0"`` .. ``"9"``;
- ``digits-mirrored``: the same digits mirrored left to right (another domain);
- ``digits-inverted``: the same upright digits with inverted intensities
  (``255 - grey``: dark strokes on a white background), labels ``"0"`` .. ``"9"``;
  a domain trivially told apart from the others by mean brightness, for gating;
- ``digits-low`` / ``digits-high``: digits 0-4 / 5-9 (two tasks), labels
  ``"0"`` .. ``"4"`` / ``"5"`` .. ``"9"`` (indices 0-4 in both).

Everything is deterministic: the same call gives the same rows, images and
parquet bytes, so pushed repos get the same commit shas on every run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import HfApi

SIZE = 16
DIGIT_NAMES = [str(d) for d in range(10)]
TASKS = ("digits", "digits-mirrored", "digits-low", "digits-high", "digits-inverted")


@functools.cache
def digit_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as uint8 16x16 grey images in [0, 255] and int targets, split into train and test.

    The split is the demo's: ``train_test_split(test_size=0.3, random_state=0, stratify=target)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    grey = np.rint(data.images / 16.0 * 255.0).astype(np.uint8)  # 0..16 -> 0..255
    grey = grey.repeat(SIZE // 8, axis=1).repeat(SIZE // 8, axis=2)  # nearest-neighbour upscaling
    x_train, x_test, y_train, y_test = train_test_split(
        grey, data.target, test_size=0.3, random_state=0, stratify=data.target)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def digit_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split of a digit task as arrays: uint8 grey images (N, 16, 16), targets, label names."""
    if name not in TASKS:
        raise ValueError(f"unknown digit task {name!r}; choose one of {', '.join(TASKS)}")
    images, targets = digit_arrays()[split]
    names = DIGIT_NAMES
    if name == "digits-mirrored":
        images = images[:, :, ::-1]
    elif name == "digits-inverted":
        images = 255 - images
    elif name in ("digits-low", "digits-high"):
        low = 0 if name == "digits-low" else 5
        keep = (targets >= low) & (targets < low + 5)
        images, targets, names = images[keep], targets[keep] - low, DIGIT_NAMES[low:low + 5]
    return np.ascontiguousarray(images), np.asarray(targets), names


def _dataset(images: np.ndarray, targets: np.ndarray, names: list[str]) -> datasets.Dataset:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    pil = [Image.fromarray(image, mode="L").convert("RGB") for image in images]
    return datasets.Dataset.from_dict({"image": pil, "label": [int(t) for t in targets]}, features=features)


@functools.cache
def digit_task(name: str) -> datasets.DatasetDict:
    """One digit task (see the module docstring) as a ``DatasetDict`` with ``train`` and ``test`` splits.

    Built once per process (encoding 1797 PNGs takes about a second); datasets are not changed in place.
    """
    import datasets

    return datasets.DatasetDict({split: _dataset(*digit_split(name, split)) for split in ("train", "test")})


def _card(name: str, task: datasets.DatasetDict) -> str:
    names = task["train"].features["label"].names
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in task:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["dataset_info:", "  features:", "  - name: image", "    dtype: image", "  - name: label",
              "    dtype:", "      class_label:", "        names:"]
    lines += [f"          '{i}': '{label}'" for i, label in enumerate(names)]
    lines += ["  splits:"]
    lines += [f"  - name: {split}\n    num_bytes: {task[split].data.nbytes}\n    num_examples: {len(task[split])}"
              for split in task]
    lines += ["---", f"# {name}", "", "scikit-learn's handwritten digits at 16x16 px, made by hfmerge's tests.", ""]
    return "\n".join(lines)


def write_parquet_repo(folder: Path, name: str, task: datasets.DatasetDict) -> Path:
    """Write ``task`` as a dataset repo folder: ``data/<split>-00000-of-00001.parquet`` and a README card."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, dataset in task.items():
        # pyarrow directly: the table's schema carries the features (ClassLabel names) as datasets writes them
        pq.write_table(dataset.flatten_indices().data.table, data / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(_card(name, task))
    return folder


def push_digit_datasets(api: HfApi, namespace: str, tasks: tuple[str, ...] = TASKS) -> dict[str, str]:
    """Push the digit tasks to the Hub that ``api`` talks to, as parquet dataset repos ``namespace/<task>``.

    Files are uploaded as regular (non-LFS) files, which the local test Hub
    takes. Returns task name -> repo id.
    """
    repos = {}
    with TemporaryDirectory(prefix="hfmerge-digits-") as tmp:
        for name in tasks:
            repo_id = f"{namespace}/{name}"
            folder = write_parquet_repo(Path(tmp) / name, name, digit_task(name))
            api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                              commit_message=f"{name}: scikit-learn digits at {SIZE} px")
            repos[name] = repo_id
    return repos
