"""Loading a merged (or any supported) model by repo id or folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hfmerge.adapters import inspect_source
from hfmerge.errors import SourceError
from hfmerge.hub.resolve import resolve_source


def load(ref: str, *, task: int | str | None = None, token: str | bool | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load the model at ``ref`` (``org/name[@revision]`` or a folder) with its class.

    Static merges are ordinary transformers checkpoints; this picks the class
    from the config's architecture among the families hfmerge supports. A
    gated merge (:mod:`hfmerge.methods.gating.model`) loads with hfmerge's own class.
    An EMR merge (:mod:`hfmerge.methods.emr`) holds one model per task: ``task``
    (a source's repo id as it was given, or its index) says which, and the result is
    an ordinary model of the sources' class. Remote code is never enabled.
    """
    return load_folder(resolve_source(ref, token=token).path, name=ref, task=task, **kwargs)


def load_folder(path: Path, *, name: str | None = None, task: int | str | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load the model saved in folder ``path`` (see :func:`load`); ``name`` is what errors call it.

    Raises:
        SourceError: an unsupported model, weights that do not match the config, ``task`` given for a
            merge that is not an EMR merge, or an EMR merge's ``task`` missing or unknown.
    """
    from hfmerge.methods.emr.model import is_emr_folder, load_emr_task
    from hfmerge.methods.gating.model import is_gated_folder, load_gated

    if is_emr_folder(path):
        return load_emr_task(path, task, name=name, **kwargs)
    if task is not None:
        raise SourceError(f"{name or path}: task= selects a task of an EMR merge, and this is not one; "
                          "load it without task=")
    if is_gated_folder(path):
        return load_gated(path, name=name, **kwargs)
    layout = inspect_source(resolve_source(str(path)))
    return layout.family.model_class(layout.architecture).from_pretrained(path, **kwargs)  # type: ignore[attr-defined]
