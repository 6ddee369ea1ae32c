"""The hfmerge side of an EMR repository: the modeling file's text, recognising one, loading a task's model.

:mod:`hfmerge.methods.emr.emr_model` is self-contained (it is copied into the repository
as :data:`MODELING_FILE` for ``trust_remote_code``); :func:`load_emr_task` rebuilds one
task's model from the repository's safetensors, one tensor at a time, without running any
code from the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, AutoModel, PreTrainedModel

from hfmerge.errors import SourceError
from hfmerge.io.checkpoint import CheckpointReader
from hfmerge.methods.emr.emr_model import (
    MODEL_TYPE,
    MODELING_FILE,
    EmrMergedConfig,
    EmrMergedModel,
    build_task_model,
    gate_logits,
    task_state_dict,
)
from hfmerge.methods.gating.gate import GateInput

__all__ = ["AUTO_MAP", "MODELING_FILE", "MODEL_TYPE", "EmrGateInput", "EmrMergedConfig", "EmrMergedModel",
           "is_emr_folder", "load_emr_task", "modeling_source"]

_MODULE = MODELING_FILE.removesuffix(".py")
AUTO_MAP = {"AutoConfig": f"{_MODULE}.EmrMergedConfig", "AutoModel": f"{_MODULE}.EmrMergedModel"}
"""``AutoModel.from_pretrained(repo, trust_remote_code=True)`` loads :class:`EmrMergedModel`: its forward takes
``task=``, so it is no single task's classifier or segmenter, and no task-specific Auto class names it."""

# With hfmerge imported, transformers' Auto classes know the EMR model type without remote code.
AutoConfig.register(MODEL_TYPE, EmrMergedConfig, exist_ok=True)
AutoModel.register(EmrMergedConfig, EmrMergedModel, exist_ok=True)


def modeling_source() -> str:
    """The text of :mod:`hfmerge.methods.emr.emr_model`, written into an EMR repository as :data:`MODELING_FILE`."""
    return (Path(__file__).parent / "emr_model.py").read_text(encoding="utf-8")


def is_emr_folder(path: Path) -> bool:
    """Whether ``path`` holds an EMR merge: a ``config.json`` whose ``model_type`` is :data:`MODEL_TYPE`."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_emr_task(path: Path, task: int | str | None, *, name: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """Task ``task``'s model (an index, or a source's repo id as given) of the EMR merge in folder ``path``.

    An ordinary model of the sources' class, with that task's head and labels, whose
    weights are θ_base + λ_task · (M_task ⊙ τ_uni), read from the safetensors one tensor
    at a time: memory holds the task's model, not the merge. Without ``task``, a merge
    with a gate is loaded whole (:class:`EmrMergedModel`, hfmerge's own copy of the class:
    no code from the repository runs), and its forward lets the gate pick each image's task.

    Raises:
        SourceError: ``task`` missing where the merge has no gate, or not a task of this merge (the message
            lists them), or a repository whose config is not an EMR merge's.
    """
    from hfmerge.adapters.base import registered_families

    label = name or str(path)
    try:
        config = EmrMergedConfig.from_pretrained(path)
        if task is None and config.has_gate:
            return EmrMergedModel.from_pretrained(path, **kwargs).eval()
        index = config.task_index(task)
    except (ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{label}: {first}") from None
    model_type, architecture = config.source.get("model_type"), config.source["architectures"][0]
    family = next((f for f in registered_families() if model_type in f.model_types), None)
    if family is None or architecture not in family.architectures:
        raise SourceError(f"{label}: its sources are {architecture} ({model_type}), which hfmerge does not support")
    reader = CheckpointReader(path, label=label)
    try:
        state = task_state_dict(reader.get, config, index)
    finally:
        reader.close()
    return build_task_model(family.model_class(architecture), config.task_config(index), state, **kwargs)


class EmrGateInput(GateInput):
    """The gate as its training sees it, fed exactly as :class:`EmrMergedModel` feeds it.

    The gating merge's training stage (:class:`~hfmerge.methods.gating.training.TrainGate`)
    trains it, label = the source's index; its input is made by the modeling file's own
    :func:`~hfmerge.methods.emr.emr_model.gate_logits` from the merge's pixel values, so
    the gate trains on what it sees at inference.
    """

    def gate_logits(self, pixel_values: Tensor) -> Tensor:
        return gate_logits(self.gate, self.config, pixel_values)
