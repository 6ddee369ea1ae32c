"""What every table of the suite shares: the local Hub, the cache, merges by repo id, and task-given accuracy.

A table module gets one :class:`Bench` and uses it the way a user uses
hfmerge: datasets and models are pushed to the (local) Hub and named by repo
id, merges run through :func:`hfmerge.merge` (the public API behind the CLI),
and the merged model is read back from its output folder with plain
transformers (or :func:`hfmerge.load` for a gated model).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import HfApi

    from hfmerge.publish.result import MergeResult

logger = logging.getLogger("benchmarks.suite")

MODES = ("smoke", "quick", "full")
"""smoke: the CI test's size (seconds per table); quick: under 10 minutes in all; full: under 60 minutes."""


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of ``parts`` (JSON), for cache keys: a change of size or recipe builds anew."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Bench:
    """One run of the suite: its mode, its folders, and the Hub it pushes to and merges from."""

    mode: str
    cache: Path
    """Built datasets and trained models, kept between runs (keyed by :func:`fingerprint` of what built them)."""
    work: Path
    """This run's merge outputs (removed at the end)."""
    out: Path
    """Where RESULTS.md and the plots go."""
    api: HfApi
    namespace: str = "bench"
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the merges' random parts (DARE's drops, the gate's training, fine-tuning's order)."""
    log: Callable[[str], None] = print
    pushed: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    # -- cache ------------------------------------------------------------------------------
    def cached(self, name: str, key: str, build: Callable[[Path], None]) -> Path:
        """``cache/<name>-<key>``, built by ``build(folder)`` into a temporary folder renamed at the end.

        A build that fails leaves nothing behind, so the next run builds it again.
        """
        folder = self.cache / f"{name}-{key}"
        if folder.is_dir():
            return folder
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = self.cache / f".{name}-{key}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        started = time.perf_counter()
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(folder)
        self.log(f"  built {name} ({time.perf_counter() - started:.1f} s)")
        return folder

    # -- the Hub ----------------------------------------------------------------------------
    def repo_id(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def push_folder(self, name: str, folder: Path, repo_type: str = "model") -> str:
        """Upload ``folder`` as repo ``namespace/name`` (once per run); returns the repo id."""
        repo_id = self.repo_id(name)
        if self.pushed.get(f"{repo_type}:{repo_id}") == str(folder):
            return repo_id
        self.api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        self.api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                               commit_message=f"{name}: built by benchmarks.suite")
        self.pushed[f"{repo_type}:{repo_id}"] = str(folder)
        return repo_id

    def push_dataset(self, name: str, build: Callable[[], datasets.DatasetDict], key: str,
                     description: str) -> str:
        """Build (or take from the cache) a ``DatasetDict`` and push it as dataset repo ``namespace/name``."""
        from hfmerge.testing.tasks import write_parquet_repo

        def write(folder: Path) -> None:
            task = build()
            write_parquet_repo(folder, name, task)
            card = (folder / "README.md").read_text()
            card = card.replace("scikit-learn's handwritten digits at 16x16 px, made by hfmerge's tests.", description)
            (folder / "README.md").write_text(card)

        return self.push_folder(name, self.cached(f"data-{name}", key, write), repo_type="dataset")

    def push_model(self, name: str, key: str, build: Callable[[Path], None]) -> str:
        """Train (or take from the cache) a model saved by ``build(folder)`` and push it as ``namespace/name``."""
        return self.push_folder(name, self.cached(f"model-{name}", key, build))

    # -- merging ----------------------------------------------------------------------------
    def merge(self, label: str, sources: Sequence[str], method: str, **kwargs: Any) -> MergeResult:
        """:func:`hfmerge.merge` by repo id, saved to ``work/<label>``; its wall time goes to ``timings``."""
        import hfmerge

        output = self.work / label.replace("/", "_").replace(" ", "_")
        started = time.perf_counter()
        result = hfmerge.merge(list(sources), method, output=output, overwrite=True, progress=False, **kwargs)
        self.timings[label] = time.perf_counter() - started
        self.log(f"    {label}: {method} in {self.timings[label]:.1f} s")
        return result

    # -- evaluation -------------------------------------------------------------------------
    def split(self, dataset: str, split: str) -> datasets.Dataset:
        """A split of a pushed dataset, read by dataset id with ``datasets.load_dataset`` as a user would."""
        return _load_split(dataset, split)

    def task_accuracy(self, model: torch.nn.Module, processor: Any, dataset: str, split: str = "test",
                      labels: Sequence[str] | None = None) -> float:
        """Top-1 accuracy on ``dataset:split``, matching labels by name, the task given.

        ``labels`` (default: the dataset's own) restricts the prediction to those of the
        model's labels — the classifier of the image's task chosen by hand, as the
        papers evaluate a merged multi-task model's baselines. A label of the dataset
        the model lacks is an error, not a silent zero.
        """
        data = self.split(dataset, split)
        names = data.features["label"].names
        wanted = list(labels) if labels is not None else names
        label2id = {str(v): int(k) for k, v in model.config.id2label.items()}
        missing = [name for name in wanted if name not in label2id]
        if missing:
            raise ValueError(f"{dataset}: the model has no label {missing[0]!r}")
        columns = torch.tensor([label2id[name] for name in wanted])
        pixels = _pixels(dataset, split, _processor_key(processor), processor)
        targets = torch.tensor([wanted.index(names[t]) for t in data["label"]])
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(targets), 256):
                logits = model(pixel_values=pixels[start:start + 256]).logits
                correct += int((logits[:, columns].argmax(-1) == targets[start:start + 256]).sum())
        return correct / len(targets)


def _processor_key(processor: Any) -> str:
    return json.dumps(processor.to_dict(), sort_keys=True, default=repr)


@functools.lru_cache(maxsize=64)
def _load_split(dataset: str, split: str) -> datasets.Dataset:
    import datasets

    return datasets.load_dataset(dataset, split=split)


_PIXELS: dict[tuple[str, str, str], torch.Tensor] = {}


def _pixels(dataset: str, split: str, key: str, processor: Any) -> torch.Tensor:
    """The split's images through ``processor``, once per (dataset, split, processor settings)."""
    cache_key = (dataset, split, key)
    if cache_key not in _PIXELS:
        images = [image.convert("RGB") for image in _load_split(dataset, split)["image"]]
        _PIXELS[cache_key] = processor(images=images, return_tensors="pt")["pixel_values"]
    return _PIXELS[cache_key]


def load_classifier(folder: Path) -> tuple[torch.nn.Module, Any]:
    """A saved classifier and its image processor, with plain transformers (hfmerge's own families too)."""
    from transformers import AutoImageProcessor

    import hfmerge

    model = hfmerge.load(str(folder)).eval()
    return model, AutoImageProcessor.from_pretrained(str(folder))

