"""Naming a union label space: every source's labels side by side, each name distinct.

One home for the rule that parameter fusion's concatenated heads
(:func:`hfmerge.methods.heads.union_labels`) and the gated merge's union
logits (:func:`hfmerge.methods.gating.model.assemble_gated`) both follow, so the two name
the same sources' labels alike. Pure functions on names: no models, no files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence


def distinct_prefixes(short: Sequence[str], full: Sequence[str]) -> list[str]:
    """A distinct name per source: its short name where no other source has it, else its full name,
    else ``source<i>`` by position (also when a short name equals another source's full name)."""
    short_counts, full_counts = Counter(short), Counter(full)
    prefixes = []
    for i, (s, f) in enumerate(zip(short, full)):
        if s and short_counts[s] == 1:
            prefixes.append(s)
        elif f and full_counts[f] == 1:
            prefixes.append(f)
        else:
            prefixes.append(f"source{i + 1}")
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"source{i + 1}" for i in range(len(short))]
    return prefixes


def union_label_names(label_sets: Sequence[Mapping[int, str]], prefixes: Sequence[str]) -> list[str]:
    """The labels of all sources in source order (each source's in id order), every one distinct.

    A label that appears in more than one source becomes ``<prefix>/<label>``
    in each of them, so no two outputs share a name, each says which model it
    came from, and ``label2id`` inverts ``id2label``.
    """
    counts = Counter(label for labels in label_sets for label in labels.values())
    names = []
    for labels, prefix in zip(label_sets, prefixes):
        for i in range(len(labels)):
            label = labels[i]
            names.append(f"{prefix}/{label}" if counts[label] > 1 else label)
    if len(set(names)) < len(names):
        # A source's own label is literally another's prefixed name: number every output instead.
        seen: Counter[str] = Counter(names)
        names = [f"{label}#{i}" if seen[label] > 1 else label for i, label in enumerate(names)]
    return names
