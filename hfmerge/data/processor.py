"""The image processor saved beside a model: whether it has one, and the refusal where one is needed.

Every stage that feeds images to a model (statistics, training, the evaluation) runs them through the
model's own image processor, read from its folder by ``AutoImageProcessor.from_pretrained``. A folder
without one fails deep inside transformers with an ``OSError`` that names whatever folder it was given
(for a merge, a hidden staging folder); :func:`check_image_processor` says instead which model lacks it
and how to give it one, and the pipeline asks it before any stage runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from hfmerge.errors import SourceError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
"""Where ``save_pretrained`` writes an image processor's settings."""
PROCESSOR_CONFIG = "processor_config.json"
"""A multimodal processor's settings (``CLIPProcessor``): transformers 5 reads its ``image_processor`` entry."""


def has_image_processor(folder: Path) -> bool:
    """Whether ``AutoImageProcessor.from_pretrained(folder)`` finds an image processor's settings there.

    It reads ``preprocessor_config.json``, or the ``image_processor`` entry of ``processor_config.json``
    (the nested form transformers 5 writes for a processor of several parts).
    """
    if (folder / PREPROCESSOR_CONFIG).is_file():
        return True
    nested = folder / PROCESSOR_CONFIG
    if not nested.is_file():
        return False
    try:
        settings = json.loads(nested.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and "image_processor" in settings


def missing_processor_message(name: str) -> str:
    """What is wrong with model ``name``, which has no image processor (the start of every message about it)."""
    return f"{name} has no image processor ({PREPROCESSOR_CONFIG})"


def check_image_processor(folder: Path, name: str, *, reason: str, otherwise: str | None = None) -> None:
    """Refuse, in one line, a model whose folder holds no image processor though images must go through it.

    Args:
        folder: the model's resolved folder.
        name: how messages name the model (as the user wrote it, not the folder it resolved to).
        reason: why a processor is needed, e.g. ``"the evaluation (--eval-data) feeds it images through one"``.
        otherwise: a second way out, after saving a processor beside the weights (``"merge sources that
            have one"``).

    Raises:
        SourceError: the folder has no image processor.
    """
    if has_image_processor(folder):
        return
    alternative = f", or {otherwise}" if otherwise else ""
    raise SourceError(
        f"{missing_processor_message(name)}: {reason}; save one beside its weights with "
        f"AutoImageProcessor.save_pretrained(folder){alternative}"
    )
