"""Loading a merged (or any supported) model by repo id or folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source


def load(ref: str, *, token: str | bool | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load the model at ``ref`` (``org/name[@revision]`` or a folder) with its class.

    Static merges are ordinary transformers checkpoints; this picks the class
    from the config's architecture among the families hfmerge supports. A
    gated merge (:mod:`hfmerge.methods.gating.model`) loads with hfmerge's own class.
    Remote code is never enabled.
    """
    return load_folder(resolve_source(ref, token=token).path, name=ref, **kwargs)


def load_folder(path: Path, *, name: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load the model saved in folder ``path`` (see :func:`load`); ``name`` is what errors call it.

    Raises:
        SourceError: an unsupported model, or weights that do not match the config.
    """
    from hfmerge.methods.gating.model import is_gated_folder, load_gated

    if is_gated_folder(path):
        return load_gated(path, name=name, **kwargs)
    layout = inspect_source(resolve_source(str(path)))
    return layout.family.model_class(layout.architecture).from_pretrained(path, **kwargs)  # type: ignore[attr-defined]
