"""Merge plans: for every output tensor, its inputs, its operation and its dtype.

A plan is made before any tensor is read, from checkpoint headers and configs
only. It is what ``--dry-run`` prints and what the engine streams through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfmerge.adapters.layout import ModelLayout, TensorInfo
from hfmerge.engine.ops import Copy, MergeOp, TensorRef, normalise
from hfmerge.errors import IncompatibleModelsError


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made.

    Attributes:
        key: its name in the output checkpoint (the anchor's checkpoint name).
        name: its in-memory name.
        shape: its output shape.
        dtype: the dtype of the anchor's tensor; the engine casts to it unless
            the recipe asks for another float dtype.
        op: the operation producing it.
    """

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: MergeOp


@dataclass
class OutputSpec:
    """A merge whose output is a model of its own, not the anchor's architecture.

    Most methods write the anchor's architecture with its config updated
    (:attr:`MergePlan.config_updates`). A method whose output is another model
    (gating's per-source gated layers and N classifiers; a fused network whose
    widths match no source) declares it here, and the pipeline, the card and
    :func:`hfmerge.load` follow:

    Attributes:
        config: the output's config (a ``PretrainedConfig``), saved as ``config.json``; a
            model class outside transformers names its code in ``config.auto_map``.
        architecture: the model class's name, for the card.
        task: the pipeline task (``image-classification``).
        files: extra files written beside the weights (a modeling file for ``trust_remote_code``,
            a picture the card shows), name -> text or bytes.
        loads_with_transformers: whether plain ``transformers`` loads it with no remote code;
            when not, the card shows how it loads (``hfmerge.load``, ``trust_remote_code=True``).
        auto_class: the transformers Auto class that loads it with remote code, where it is not the one of
            its task (``None``: the task's).
        task_argument: for an output that holds one model per task (EMR): the argument that picks one in the
            card's usage, as written in Python (``task="org/a"``), given to ``hfmerge.load`` and to the remote
            model's forward; ``None``: the output is one model.
        processor_from: the folder whose processor files (image processor, tokenizer) go beside the output;
            ``None``: the anchor's.
    """

    config: Any
    architecture: str
    task: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    loads_with_transformers: bool = False
    auto_class: str | None = None
    task_argument: str | None = None
    processor_from: Path | None = None


@dataclass
class MergePlan:
    """A method's decisions, ready to execute.

    ``config_updates`` are applied to the anchor's config (e.g. fusion's label
    union); ``details`` are method facts for the card (e.g. per-layer weights);
    ``output`` declares an output model of the method's own (:class:`OutputSpec`),
    in place of the anchor's architecture.
    """

    tensors: list[TensorPlan]
    config_updates: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    output: OutputSpec | None = None

    def summary(self) -> list[tuple[str, int, int]]:
        """(group, number of tensors, number of parameters) per kind of operation."""
        counts: Counter[str] = Counter()
        params: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.op.group] += 1
            n = 1
            for d in t.shape:
                n *= d
            params[t.op.group] += n
        return [(g, counts[g], params[g]) for g in counts]


@dataclass
class MergeContext:
    """The inspected models a method plans over.

    Models are indexed 0..M-1 for the sources, and M for the base model when
    there is one; the tables the stages make are named (each source's
    statistics :meth:`statistics_index`, a stage's table by the stage's name);
    :data:`TensorRef` pairs use these indices and names. ``heads`` is the
    recipe's head policy (``None``: the method's automatic choice, see
    :mod:`hfmerge.methods.heads`); ``seed`` seeds methods that draw random numbers.
    """

    sources: list[ModelLayout]
    anchor_index: int = 0
    weights: list[float] | None = None
    base: ModelLayout | None = None
    params: dict[str, Any] = field(default_factory=dict)
    heads: str | None = None
    seed: int | None = None
    data: list[Any] | None = None
    """Per source, the :class:`~hfmerge.data.spec.DataSpec` of its data (data methods), else ``None``."""
    evaluating: bool = False
    """The merge will be evaluated (``--eval-data``): a method may ask for what its comparison rows need."""
    auxiliary: dict[str, ModelLayout] = field(default_factory=dict)
    """Models a method uses besides the sources (gating's gate network), inspected like them, by role."""
    analysis: dict[str, Any] | None = None
    """What the method's analysis stage computed from the weights before planning
    (:meth:`~hfmerge.methods.base.MergeMethod.analyse`); ``None`` when it could not run (a dry run over
    Hub sources, whose weights are not downloaded)."""

    @property
    def anchor(self) -> ModelLayout:
        return self.sources[self.anchor_index]

    @property
    def base_index(self) -> int:
        return len(self.sources)

    @property
    def models(self) -> list[ModelLayout]:
        return self.sources + ([self.base] if self.base is not None else [])

    def statistics_index(self, source: int) -> str:
        """The table of source ``source``'s statistics in a :data:`~hfmerge.engine.ops.TensorRef`.

        A plan names ``(statistics_index(i), "gram/<module>")`` before the statistics exist, and the engine
        reads them once the statistics stage (:class:`~hfmerge.methods.stages.Statistics`) has run.
        """
        return f"statistics/{source}"

    def normalised_weights(self) -> tuple[float, ...]:
        """The recipe's weights normalised to sum to one; uniform when none were given."""
        return normalise(self.weights or [1.0] * len(self.sources))

    def refs(self, name: str) -> tuple[TensorRef, ...]:
        """The tensor called ``name`` (in memory) in every source, as references."""
        return tuple((i, layout.tensors[name].key) for i, layout in enumerate(self.sources))

    def is_shared(self, name: str, models: list[ModelLayout] | None = None) -> bool:
        """Whether every model has a tensor ``name`` of the anchor's shape."""
        shape = self.anchor.tensors[name].shape
        for layout in models or self.sources:
            other = layout.tensors.get(name)
            if other is None or other.shape != shape:
                return False
        return True

    def differing(self, models: list[ModelLayout] | None = None) -> list[str]:
        """Names of the anchor's tensors some model lacks or shapes differently, plus tensors the anchor lacks."""
        models = models or self.sources
        names = [n for n in self.anchor.tensors if not self.is_shared(n, models)]
        for layout in models:
            names.extend(n for n in layout.tensors if n not in self.anchor.tensors and n not in names)
        return names

    def plan_entry(self, info: TensorInfo, op: MergeOp, *, shape: tuple[int, ...] | None = None) -> TensorPlan:
        """A :class:`TensorPlan` writing under the anchor's checkpoint key and dtype."""
        if info.is_integer:
            # Integer buffers (BatchNorm's num_batches_tracked) count, they do not average.
            op = Copy((self.anchor_index, info.key), group="copied (integer buffer)")
        return TensorPlan(info.key, info.name, shape or info.shape, info.dtype, op)


def require_all_shared(ctx: MergeContext, method: str, models: list[ModelLayout] | None = None, *,
                       except_names: Collection[str] = ()) -> None:
    """Raise unless every tensor (but ``except_names``, left to the head policy) has one name and shape in every model."""
    differing = [n for n in ctx.differing(models) if n not in except_names]
    if differing:
        example = differing[0]
        shapes = ", ".join(
            f"{m.source.name}: {list(m.tensors[example].shape) if example in m.tensors else 'missing'}"
            for m in (models or ctx.sources)
        )
        raise IncompatibleModelsError(
            f"'{method}' needs every parameter in every model with one shape, but {len(differing)} differ "
            f"(e.g. {example} — {shapes}); use 'layerwise' to keep the anchor's"
        )
