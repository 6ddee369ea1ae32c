"""Models that hfmerge defines itself: the gated merge of ViTs (§3.2 of the gating paper).

:mod:`hfmerge.methods.gating.gated_vit` is self-contained (it is copied into a merged
repo as :data:`MODELING_FILE` for ``trust_remote_code``); this module is the
hfmerge side: the file's text, recognising a gated folder, saving one, and
assembling a gated model in memory from loaded ViT sources (tests, benchmark).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PreTrainedModel,
    ViTForImageClassification,
)

from hfmerge.errors import IncompatibleModelsError, SourceError
from hfmerge.io.checkpoint import CheckpointReader
from hfmerge.io.renaming import checkpoint_to_memory_names
from hfmerge.methods.gating.gated_vit import (
    MODEL_TYPE,
    MODELING_FILE,
    GatedImageClassifierOutput,
    GatedMergedConfig,
    GatedMergedForImageClassification,
)
from hfmerge.methods.labels import distinct_prefixes, union_label_names

__all__ = [
    "AUTO_MAP", "MODELING_FILE", "MODEL_TYPE", "GatedImageClassifierOutput", "GatedMergedConfig",
    "GatedMergedForImageClassification", "assemble_gated", "is_gated_folder", "load_gated", "modeling_source",
    "save_gated",
]

_MODULE = MODELING_FILE.removesuffix(".py")
AUTO_MAP = {
    "AutoConfig": f"{_MODULE}.GatedMergedConfig",
    "AutoModelForImageClassification": f"{_MODULE}.GatedMergedForImageClassification",
}

# With hfmerge imported, transformers' Auto classes know the gated model type too, without remote code
# (AutoConfig.from_pretrained on a gated folder would otherwise refuse it for want of trust_remote_code).
AutoConfig.register(MODEL_TYPE, GatedMergedConfig, exist_ok=True)
AutoModelForImageClassification.register(GatedMergedConfig, GatedMergedForImageClassification, exist_ok=True)

# The ViT hyper-parameters that must agree between sources for their tensors to be stacked.
_ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                        "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias")


def modeling_source() -> str:
    """The text of :mod:`hfmerge.methods.gating.gated_vit`, written into a gated repo as :data:`MODELING_FILE`."""
    return (Path(__file__).parent / "gated_vit.py").read_text(encoding="utf-8")


def is_gated_folder(path: Path) -> bool:
    """Whether ``path`` holds a gated merge: a ``config.json`` whose ``model_type`` is :data:`MODEL_TYPE`."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def save_gated(model: GatedMergedForImageClassification, folder: Path) -> None:
    """Save ``model`` so that it loads both ways: ``auto_map`` in its config and :data:`MODELING_FILE` beside it.

    ``hfmerge.load`` reads it with the class itself; ``trust_remote_code=True``
    reads it through the copied file, without hfmerge.
    """
    folder = Path(folder)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder)
    (folder / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")


def assemble_gated(
    sources: list[PreTrainedModel],
    gate: PreTrainedModel | None,
    gated: Collection[str],
    *,
    static: dict[str, Tensor] | None = None,
    gate_labels: list[str] | None = None,
    routing: str = "soft",
    vit_processor: Any = None,
    gate_processor: Any = None,
) -> GatedMergedForImageClassification:
    """A gated merge of loaded ViT classifiers, in memory (tests, benchmark).

    Tensors are paired by checkpoint key: the gated model's ViT parameter names
    are the checkpoint keys, mapped to each source's in-memory names the way
    ``from_pretrained`` maps them (:func:`~hfmerge.io.renaming.checkpoint_to_memory_names`,
    transformers' own conversion rules), so no file is written.

    Args:
        sources: N ``ViTForImageClassification`` of one architecture (their labels may differ).
        gate: a ``MobileNetV2ForImageClassification`` whose backbone becomes the gate, with a new,
            randomly initialised head of N outputs; ``None``: a random tiny MobileNetV2.
        gated: checkpoint keys stored once per source (stacked on a new leading dimension, Eq. 2).
        static: checkpoint key -> tensor for the other ViT tensors; the sources' average where not given.
        gate_labels: a name per task; default the sources' names (``name_or_path``), else ``task <i>``.
        routing: ``"soft"`` or ``"top1"``.
        vit_processor: the sources' image processor (its ``image_mean``/``image_std`` are undone for the gate).
        gate_processor: the gate's image processor (mean, std and input size); default the gate config's size
            with mean = std = 0.5.

    Raises:
        IncompatibleModelsError: a source is not a ViT classifier, the sources differ in shape, the gate is not a
            MobileNetV2 image classifier, or ``gated``/``static`` name tensors the ViT does not have.
    """
    if not sources:
        raise IncompatibleModelsError("a gated merge needs at least one source model")
    _check_sources(sources)
    if gate is not None and not isinstance(gate, MobileNetV2ForImageClassification):
        raise IncompatibleModelsError(
            f"the gate must be a MobileNetV2 image classifier (MobileNetV2ForImageClassification), "
            f"not {type(gate).__name__}"
        )
    n = len(sources)
    names = [_source_name(s) for s in sources]
    prefixes = distinct_prefixes([name.rstrip("/").rsplit("/", 1)[-1] for name in names], names)
    labels = union_label_names([_id2label(s) for s in sources], prefixes)
    if gate_labels is None:
        gate_labels = prefixes if all(names) else [f"task {i}" for i in range(n)]
    source_labels, start = [], 0
    for source in sources:
        count = len(_id2label(source))
        source_labels.append(list(range(start, start + count)))
        start += count
    vit_config = sources[0].config.to_dict()
    for key in ("id2label", "label2id", "architectures", "_name_or_path"):
        vit_config.pop(key, None)
    gate_config = _gate_config(gate, n, gate_labels, int(sources[0].config.image_size))
    mean, std, size = _gate_preprocessing(gate_processor, gate_config)
    config = GatedMergedConfig(
        vit=vit_config, gate=gate_config.to_dict(), num_sources=n, gate_labels=list(gate_labels),
        gated=sorted(gated), source_labels=source_labels, routing=routing,
        vit_image_mean=list(getattr(vit_processor, "image_mean", None) or (0.5, 0.5, 0.5)),
        vit_image_std=list(getattr(vit_processor, "image_std", None) or (0.5, 0.5, 0.5)),
        gate_image_mean=mean, gate_image_std=std, gate_image_size=size,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        architectures=[GatedMergedForImageClassification.__name__],
    )
    try:
        model = GatedMergedForImageClassification(config)
    except ValueError as exc:
        raise IncompatibleModelsError(str(exc)) from None
    _fill(model, sources, set(gated), static or {})
    if gate is not None:
        backbone = {k: v for k, v in gate.state_dict().items() if not k.startswith("classifier.")}
        model.gate.load_state_dict(backbone, strict=False)
    return model.to(sources[0].dtype).eval()


def _check_sources(sources: list[PreTrainedModel]) -> None:
    for i, source in enumerate(sources):
        if not isinstance(source, ViTForImageClassification):
            raise IncompatibleModelsError(
                f"source {i + 1} is a {type(source).__name__}; a gated merge takes ViTForImageClassification models"
            )
    first = sources[0].config
    for i, source in enumerate(sources[1:], start=2):
        for field in _ARCHITECTURE_FIELDS:
            mine, theirs = getattr(first, field, None), getattr(source.config, field, None)
            if mine != theirs:
                raise IncompatibleModelsError(
                    f"the sources are not ViTs of one shape: source 1 has {field}={mine!r}, source {i} has {theirs!r}"
                )


def _source_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _id2label(model: PreTrainedModel) -> dict[int, str]:
    return {int(k): str(v) for k, v in model.config.id2label.items()}


def _gate_config(gate: PreTrainedModel | None, n: int, gate_labels: list[str], image_size: int) -> MobileNetV2Config:
    """The gate's config with a head of ``n`` outputs named ``gate_labels``."""
    labels = {"id2label": dict(enumerate(gate_labels)), "label2id": {name: i for i, name in enumerate(gate_labels)}}
    if gate is None:
        return MobileNetV2Config(depth_multiplier=0.35, image_size=image_size, **labels)
    values = gate.config.to_dict()
    for key in ("id2label", "label2id", "num_labels", "_name_or_path", "architectures"):
        values.pop(key, None)
    return MobileNetV2Config(**values, **labels)


def _gate_preprocessing(processor: Any, gate_config: MobileNetV2Config) -> tuple[list[float], list[float], Any]:
    """The gate's normalisation and input size, from its processor (crop size, else size) or its config."""
    mean = list(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = list(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    size: Any = int(gate_config.image_size)
    if processor is not None:
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        target = dict(crop or getattr(processor, "size", None) or {})
        if "height" in target and "width" in target:
            size = [int(target["height"]), int(target["width"])]
        elif "shortest_edge" in target:
            size = int(target["shortest_edge"])
    return mean, std, size


@torch.no_grad()
def _fill(model: GatedMergedForImageClassification, sources: list[PreTrainedModel], gated: set[str],
          static: dict[str, Tensor]) -> None:
    """Copy the sources' tensors into ``model`` by checkpoint key: gated ones stacked, the rest ``static``
    (default the average), each source's classifier into ``classifiers.<i>``."""
    parameters = dict(model.named_parameters())
    keys = [name for name in parameters if name.startswith("vit.")]
    unknown = sorted(set(static) - set(keys))
    if unknown:
        raise IncompatibleModelsError(f"static names tensors this ViT does not have: {', '.join(unknown)}")
    states = []
    for source in sources:
        state = source.state_dict()
        names = checkpoint_to_memory_names(source, [*keys, "classifier.weight", "classifier.bias"], state)
        states.append({key: state[name] for key, name in names.items()})
    for key in keys:
        target = parameters[key]
        if key in gated:
            target.copy_(torch.stack([state[key] for state in states]))
        elif key in static:
            target.copy_(static[key])
        else:
            target.copy_(torch.stack([state[key].float() for state in states]).mean(dim=0))
    for i, state in enumerate(states):
        model.classifiers[i].weight.copy_(state["classifier.weight"])
        model.classifiers[i].bias.copy_(state["classifier.bias"])


def load_gated(path: Path, *, name: str | None = None, **kwargs: Any) -> GatedMergedForImageClassification:
    """Load the gated merge saved in folder ``path`` with the class itself, never with remote code.

    The stored tensors are checked against the config first (names and shapes
    from the safetensors headers), so a repo whose sources do not match its
    config gets one line naming the first difference.

    Raises:
        SourceError: the config cannot describe a gated model, or a tensor is missing, left over, or of another
            shape than the config implies.
    """
    label = name or str(path)
    try:
        config = GatedMergedConfig.from_pretrained(path)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in GatedMergedForImageClassification(config).state_dict().items()}
    except (ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{label}: its config.json does not describe a gated model ({first})") from None
    reader = CheckpointReader(path, label=label)
    try:
        stored = {key: reader.shape(key) for key in reader.keys()}  # noqa: SIM118 - a TensorTable, not a dict
    finally:
        reader.close()
    problem = next(
        (f"{key} is missing" for key in expected if key not in stored),
        next((f"{key} is not in the model" for key in stored if key not in expected),
             next((f"{key} has shape {list(stored[key])} but the config implies {list(shape)}"
                   for key, shape in expected.items() if stored[key] != shape), None)),
    )
    if problem is not None:
        raise SourceError(f"{label}: the stored tensors do not match its config.json ({problem}); "
                          "re-save the gated merge with hfmerge")
    return GatedMergedForImageClassification.from_pretrained(path, **kwargs).eval()


class TaskGiven(torch.nn.Module):
    """A gated merge told the task: its gate is bypassed, p = the one-hot vector of source ``task``.

    The paper's baselines (AvgMean, RegMean, task arithmetic) select the classifier of the input's task by
    hand (vit-gating-merge §4.2); this is how they are evaluated beside the gate's own choice.
    """

    def __init__(self, model: torch.nn.Module, task: int) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.config = model.config

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        probs = torch.zeros(pixel_values.shape[0], self.config.num_sources, device=pixel_values.device)
        probs[:, self.task] = 1.0
        return self.model(pixel_values=pixel_values, gate_probs=probs, **kwargs)
