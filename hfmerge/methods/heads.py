"""One head policy for every method: what becomes of the tensors a method does not merge itself.

A method merges what the sources share (the backbone) its own way and hands
the rest — classifier heads, and tensors a base model lacks such as a
segmentation decoder — to :func:`plan_heads`, under one of three policies:

- ``concat``: the union head of parameter fusion (Guo & Zhang, §III): each
  classifier layer (an adapter's :class:`~hfmerge.adapters.base.HeadSpec`) is
  stacked along its output dimension, ``id2label`` becomes the union of the
  sources' labels; other tensors handed over are averaged.
- ``average``: every tensor handed over is averaged; the sources must have one
  label set (the same ``id2label``), since row i of each head must mean the
  same class.
- ``anchor``: every tensor handed over is the anchor's, labels included (the
  layer-wise paper's choice for layers that are not shared).

The automatic choice (:func:`head_policy`) is ``concat`` when the sources'
label sets differ and ``average`` when they are equal; a method may give
another default (layerwise: ``anchor``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from hfmerge.adapters.layout import ModelLayout
from hfmerge.engine.ops import Copy, LinearCombination, Loader, TensorRef
from hfmerge.engine.plan import MergeContext, TensorPlan
from hfmerge.errors import IncompatibleModelsError
from hfmerge.methods.base import HEAD_POLICIES
from hfmerge.methods.labels import distinct_prefixes, union_label_names

__all__ = ["HEAD_POLICIES", "ConcatHeads", "HeadsPlan", "head_policy", "labels_agree", "plan_heads", "source_prefixes",
           "union_labels"]


def labels_agree(sources: list[ModelLayout]) -> bool:
    """Whether every source has the same ``id2label`` (same labels at the same indices)."""
    first = sources[0].id2label
    return all(s.id2label == first for s in sources[1:])


def head_policy(ctx: MergeContext, default: str | None = None) -> str:
    """The policy in force: the recipe's ``heads``, else the method's ``default``, else automatic.

    Automatic: ``concat`` when the sources' label sets differ, ``average`` when equal.
    """
    if ctx.heads is not None:
        return ctx.heads
    if default is not None:
        return default
    return "average" if labels_agree(ctx.sources) else "concat"


@dataclass
class HeadsPlan:
    """The plan entries of the tensors handed to the head policy, and the config they imply."""

    policy: str
    entries: list[TensorPlan]
    config_updates: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConcatHeads:
    """Stack classifier heads along the output dimension (parameter fusion, §III).

    Rows ``[0, n_i)`` of source i are its label rows and are stacked in source
    order; ``null_rows`` trailing rows (a "no object" class) exist once in the
    result and are the weighted average of the sources' null rows.
    """

    sources: tuple[TensorRef, ...]
    label_rows: tuple[int, ...]
    null_rows: int = 0
    null_weights: tuple[float, ...] | None = None
    group: str = "concatenated"

    def apply(self, load: Loader) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        null: torch.Tensor | None = None
        weights = self.null_weights or tuple(1.0 / len(self.sources) for _ in self.sources)
        for ref, rows, weight in zip(self.sources, self.label_rows, weights):
            tensor = load(ref).to(torch.float32)
            parts.append(tensor[:rows].clone())
            if self.null_rows:
                tail = tensor[rows : rows + self.null_rows] * weight
                null = tail if null is None else null + tail
        if null is not None:
            parts.append(null)
        return torch.cat(parts, dim=0)


def plan_heads(ctx: MergeContext, names: Iterable[str], policy: str) -> HeadsPlan:
    """Plan the anchor's tensors ``names`` (in-memory names) under ``policy``.

    Raises:
        IncompatibleModelsError: ``average`` over different label sets, or a
            tensor that cannot be averaged or concatenated because the sources
            shape it differently (``anchor`` always works).
    """
    if policy not in HEAD_POLICIES:
        raise ValueError(f"unknown head policy {policy!r}; expected one of {HEAD_POLICIES}")
    infos = [ctx.anchor.tensors[name] for name in names]
    has_classifier = any(info.head is not None for info in infos)
    if policy == "anchor":
        entries = [ctx.plan_entry(info, Copy((ctx.anchor_index, info.key))) for info in infos]
        return HeadsPlan(policy, entries, details={"heads": "anchor"})
    if policy == "average" and has_classifier and not labels_agree(ctx.sources):
        differing = next(s for s in ctx.sources if s.id2label != ctx.anchor.id2label)
        raise IncompatibleModelsError(
            f"--heads average needs one label set, but {ctx.anchor.source.name} has {len(ctx.anchor.id2label)} labels "
            f"({_preview(ctx.anchor)}) and {differing.source.name} has {len(differing.id2label)} ({_preview(differing)}); "
            "use --heads concat for the union of labels, or --heads anchor to keep the anchor's head"
        )
    weights = ctx.normalised_weights()
    label_rows = _label_rows(ctx) if policy == "concat" and has_classifier else ()
    entries = []
    for info in infos:
        if policy == "concat" and info.head is not None:
            for source, rows in zip(ctx.sources, label_rows):
                shape = source.tensors[info.name].shape if info.name in source.tensors else None
                if shape is None or shape[0] != rows + info.head.null_rows or shape[1:] != info.shape[1:]:
                    raise IncompatibleModelsError(
                        f"{source.source.name}: head tensor {info.key} has shape {list(shape) if shape else 'missing'}, "
                        f"which does not match its {rows} labels or the other sources' heads; it cannot be concatenated"
                    )
            out_shape = (sum(label_rows) + info.head.null_rows, *info.shape[1:])
            op = ConcatHeads(ctx.refs(info.name), tuple(label_rows), info.head.null_rows, weights)
            entries.append(ctx.plan_entry(info, op, shape=out_shape))
            continue
        if not ctx.is_shared(info.name):
            shapes = ", ".join(
                f"{s.source.name}: {list(s.tensors[info.name].shape) if info.name in s.tensors else 'missing'}"
                for s in ctx.sources
            )
            raise IncompatibleModelsError(
                f"--heads {policy} averages {info.name}, but the sources shape it differently ({shapes}); "
                "use --heads anchor to keep the anchor's"
            )
        group = "heads averaged" if info.head is not None else "averaged"
        entries.append(ctx.plan_entry(info, LinearCombination(ctx.refs(info.name), weights, group=group)))
    if policy == "average" or not has_classifier:
        return HeadsPlan(policy, entries, details={"heads": policy})
    labels = union_labels(ctx.sources)
    id2label = dict(enumerate(labels))
    return HeadsPlan(
        policy,
        entries,
        config_updates={"id2label": id2label, "label2id": {label: i for i, label in id2label.items()}},
        details={"heads": policy, "num_labels": len(labels),
                 "labels_per_source": {s.source.name: n for s, n in zip(ctx.sources, label_rows)}},
    )


def _label_rows(ctx: MergeContext) -> tuple[int, ...]:
    rows = []
    for source in ctx.sources:
        if not source.id2label:
            raise IncompatibleModelsError(
                f"{source.source.name} has no id2label in its config; concatenating heads needs label names"
            )
        rows.append(len(source.id2label))
    return tuple(rows)


def _preview(layout: ModelLayout, count: int = 3) -> str:
    labels = list(layout.id2label.values())
    return ", ".join(labels[:count]) + (", ..." if len(labels) > count else "")


def source_prefixes(sources: list[ModelLayout]) -> list[str]:
    """A distinct name per source to prefix its clashing labels with.

    The short name (``checkpoint-500``, ``x``) where no other source has it;
    otherwise the repo id (``orgA/x``, with its ``@revision``), or for a
    folder its parent and its name (``run1/checkpoint-500``: never a path of
    the machine that merged); where even that repeats (one source given
    twice), ``source<i>`` by position.
    """
    return distinct_prefixes([s.source.short_name for s in sources], [_long_name(s) for s in sources])


def _long_name(layout: ModelLayout) -> str:
    source = layout.source
    if source.repo_id:
        return f"{source.repo_id}@{source.revision}" if source.revision else source.repo_id
    return f"{source.path.parent.name}/{source.path.name}"


def union_labels(sources: list[ModelLayout]) -> list[str]:
    """The labels of all sources in source order, every one distinct.

    A label that appears in more than one source becomes ``<prefix>/<label>``
    in each of them (:func:`source_prefixes`), so no two outputs share a name,
    each says which model it came from, and ``label2id`` inverts ``id2label``.
    """
    return union_label_names([s.id2label for s in sources], source_prefixes(sources))
