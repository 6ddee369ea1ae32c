"""Permute a model's neurons group by group: a copy that computes the same function with its units reordered.

Tests of neuron alignment need two models that are the same function with
their units in different orders, the situation OTFusion undoes: a model and
its copy through :func:`permute_groups`. When the neuron groups are declared
right (every tensor dimension that indexes a set of units is in that set's
group), the copy's outputs equal the original's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hfmerge.adapters.neurons import NeuronGroup


def random_permutation(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(size)`` that moves something whenever ``size > 1``.

    ``randperm`` returns the identity with probability ``1/size!``; a test that
    permutes a group must see it moved, so the identity is replaced by a shift.
    """
    perm = torch.randperm(size, generator=generator)
    if size > 1 and torch.equal(perm, torch.arange(size)):
        perm = torch.roll(perm, 1)
    return perm


def unit_index(perm: torch.Tensor, unit: int) -> torch.Tensor:
    """Entry indices moving whole units: entry ``j*unit + u`` of the result reads ``perm[j]*unit + u``."""
    return (perm[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def permute_groups(
    state: dict[str, torch.Tensor], groups: Iterable[NeuronGroup], seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reorder the units of every group along every member dimension, with one random permutation per group.

    Unit ``j`` of a group in the result is unit ``perm[j]`` of ``state``
    (``new.index_select(dim, ...)`` with whole units of ``group.unit``
    entries, or single entries on a member that has one per unit: ``group.unit_of``).
    Tensors no group names are returned as they are (the same objects).

    Args:
        state: in-memory tensor names to tensors (``model.state_dict()``).
        groups: the model's neuron groups (``ModelLayout.neuron_groups``).
        seed: seeds the permutations, drawn group after group in the given order.

    Returns:
        The permuted state and each group's permutation (a LongTensor of ``group.size``), by group name.

    Raises:
        KeyError: a group names a tensor that ``state`` lacks.
        ValueError: a member dimension whose length is not ``group.size`` units.
    """
    generator = torch.Generator().manual_seed(seed)
    new = dict(state)
    perms: dict[str, torch.Tensor] = {}
    for group in groups:
        perm = random_permutation(group.size, generator)
        perms[group.name] = perm
        for tensor, dim in group.members:
            index = unit_index(perm, group.unit_of(tensor, dim))
            if new[tensor].shape[dim] != index.numel():
                raise ValueError(
                    f"{tensor} has {new[tensor].shape[dim]} entries on dim {dim}, but the group {group.name!r} "
                    f"has {group.size} units of {group.unit_of(tensor, dim)}"
                )
            new[tensor] = new[tensor].index_select(dim, index)
    return new, perms
