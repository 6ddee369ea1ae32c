"""Loading a merged (or any supported) model by repo id or folder."""

from __future__ import annotations

from typing import Any

import torch

from hfmerge.adapters import inspect_source
from hfmerge.hub.resolve import resolve_source


def load(ref: str, *, token: str | bool | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load the model at ``ref`` (``org/name[@revision]`` or a folder) with its transformers class.

    Static merges are ordinary transformers checkpoints; this picks the class
    from the config's architecture among the families hfmerge supports and
    never enables remote code.
    """
    source = resolve_source(ref, token=token)
    layout = inspect_source(source)
    model_class = layout.family.model_class(layout.architecture)
    return model_class.from_pretrained(source.path, **kwargs)  # type: ignore[attr-defined]
