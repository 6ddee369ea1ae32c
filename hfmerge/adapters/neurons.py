"""Neuron groups: which tensor dimensions carry one set of neurons, for permutation-based merging.

Two networks trained from different seeds compute the same functions with
their hidden units in another order. A merge that aligns units first
(OTFusion, Singh & Jaggi 2020; CLAFusion §2.3) must move every tensor
dimension that indexes the same units together: a convolution's output
channels, its BatchNorm's weight, bias, running mean and running variance,
and the next layer's input channels; in a residual stage, every block's
output and the shortcut, which add into one stream. Such a set is a
:class:`NeuronGroup`.

Each adapter declares its family's groups (``FamilyAdapter.neurons``) with a
:class:`GroupBuilder`: it names channel sets by key, attaches (tensor, dim)
pairs to them, and says which sets are the same (a residual addition, an
identity shortcut); the builder joins them (union-find) and checks that every
dimension of a group has one size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hfmerge.errors import IncompatibleModelsError


class _Tensor(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


class LayoutView(Protocol):
    """What a neuron-group declaration reads of an inspected model: a
    :class:`~hfmerge.adapters.layout.ModelLayout` is one. Declared here, so that this module, which
    the adapters and ``ModelLayout`` import, imports none of them (``tests/test_import_graph.py``).
    """

    @property
    def source(self) -> Any: ...  # its ``name`` names the model in errors

    @property
    def config(self) -> Any: ...

    @property
    def tensors(self) -> Mapping[str, _Tensor]: ...  # in-memory name -> shape, registration order

    @property
    def module_classes(self) -> Mapping[str, type]: ...

    @property
    def forward(self) -> Mapping[str, Any]: ...  # the tensors' names in forward order

    @property
    def modules(self) -> Sequence[str]: ...  # the tensors' modules in forward order


@dataclass(frozen=True)
class NeuronGroup:
    """One set of units and every tensor dimension that indexes it.

    Attributes:
        name: a readable, stable name (``resnet.encoder.stages.0 (residual)``), shown in the card.
        members: (in-memory tensor name, dimension) pairs; each such dimension has ``size * unit`` entries.
        size: the number of units.
        unit: entries per unit along each member dimension: 1 for neurons and channels, ``head_dim``
            for attention heads, which move as wholes (a permutation within a head would have to be
            the same for queries and keys).
        producers: tensors whose dimension 0 is this group (the incoming weights and biases of its
            units), in forward order: the weight-based cost compares their rows.
        activations: modules whose outputs carry the units (pre-activations where a module gives them),
            in forward order: the activation-based cost compares them over samples. ``<module>#input``
            names what the module receives instead (a ResNet block's stream after its addition, before
            its ReLU, is the input of the block's activation module).
        activation_dim: the dimension of those outputs that indexes the units (1 for ``[B, C, H, W]``,
            -1 for ``[B, tokens, features]`` or ``[B, features]``).
        optional: aligned only when asked (a transformer's residual stream, which runs through every
            layer norm and embedding of the model); :attr:`~hfmerge.adapters.layout.ModelLayout.neuron_groups`
            leaves it out.
        per_unit: members (also in ``members``) with one entry per unit however many ``unit`` says: Swin's
            relative position bias table has one column per attention head, whose queries and keys are
            ``head_dim`` rows each.
    """

    name: str
    members: tuple[tuple[str, int], ...]
    size: int
    unit: int = 1
    producers: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    activation_dim: int = 1
    optional: bool = False
    per_unit: tuple[tuple[str, int], ...] = ()

    def unit_of(self, tensor: str, dim: int) -> int:
        """Entries per unit on dimension ``dim`` of the member ``tensor``: ``unit``, or 1 for a :attr:`per_unit` one."""
        return 1 if (tensor, dim) in self.per_unit else self.unit


class GroupBuilder:
    """Collect channel sets of one model and join them into :class:`NeuronGroup` s.

    Keys are any strings the adapter chooses (``"stage0.residual"``). Tensors the
    model lacks (a convolution without bias) are skipped, so one declaration
    serves every config of a family.
    """

    def __init__(self, layout: LayoutView) -> None:
        self.layout = layout
        self._parent: dict[str, str] = {}
        self._members: dict[str, list[tuple[str, int]]] = {}
        self._producers: dict[str, list[str]] = {}
        self._activations: dict[str, list[str]] = {}
        self._activation_dim: dict[str, int] = {}
        self._unit: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._optional: set[str] = set()
        self._per_unit: set[tuple[str, int]] = set()

    def _find(self, key: str) -> str:
        self._parent.setdefault(key, key)
        while self._parent[key] != key:
            self._parent[key] = self._parent[self._parent[key]]
            key = self._parent[key]
        return key

    def channels(self, key: str, *members: tuple[str, int], unit: int = 1, name: str | None = None,
                 optional: bool = False, per_unit: bool = False) -> GroupBuilder:
        """Attach (tensor, dim) pairs to the channel set ``key``; ``name`` labels the group for users.

        ``optional`` marks the set as aligned only on request (:attr:`NeuronGroup.optional`);
        ``per_unit`` says that these members have one entry per unit (:attr:`NeuronGroup.per_unit`).
        """
        self._find(key)
        if optional:
            self._optional.add(key)
        present = [(t, d) for t, d in members if t in self.layout.tensors]
        self._members.setdefault(key, []).extend(present)
        if per_unit:
            self._per_unit.update(present)
        if unit != 1:
            self._unit[key] = unit
        if name is not None:
            self._names.setdefault(key, name)
        return self

    def produced_by(self, key: str, *tensors: str) -> GroupBuilder:
        """``tensors`` (dim 0) are incoming weights of the set's units (also attached as members)."""
        self.channels(key, *((t, 0) for t in tensors))
        self._producers.setdefault(key, []).extend(t for t in tensors if t in self.layout.tensors)
        return self

    def observed_at(self, key: str, *modules: str, dim: int = 1) -> GroupBuilder:
        """The outputs of ``modules`` carry the set's units on dimension ``dim`` (activation-based cost)."""
        self._find(key)
        present = [m for m in modules if m.removesuffix("#input") in self.layout.module_classes]
        self._activations.setdefault(key, []).extend(present)
        self._activation_dim.setdefault(key, dim)
        return self

    def same(self, *keys: str) -> GroupBuilder:
        """The sets ``keys`` are one set of units (a residual addition, an identity shortcut)."""
        roots = [self._find(k) for k in keys]
        for root in roots[1:]:
            if root != roots[0]:
                self._parent[root] = roots[0]
        return self

    def build(self) -> list[NeuronGroup]:
        """The groups, ordered by the forward position of their first producer (or member).

        Raises:
            IncompatibleModelsError: a group whose dimensions differ in size (an adapter mistake
                or a checkpoint that is not what its config says).
        """
        keys = list(self._parent)
        by_root: dict[str, list[str]] = {}
        for key in keys:
            by_root.setdefault(self._find(key), []).append(key)
        order = {name: i for i, name in enumerate(self.layout.forward)}
        module_order = {module: i for i, module in enumerate(self.layout.modules)}
        groups: list[tuple[float, NeuronGroup]] = []
        for root, members_keys in by_root.items():
            members = list(dict.fromkeys(m for k in members_keys for m in self._members.get(k, [])))
            if not members:
                continue
            unit = max((self._unit.get(k, 1) for k in members_keys), default=1)
            producers = list(dict.fromkeys(t for k in members_keys for t in self._producers.get(k, [])))
            producers.sort(key=lambda t: order.get(t, len(order)))
            activations = list(dict.fromkeys(m for k in members_keys for m in self._activations.get(k, [])))
            activations.sort(key=lambda m: _position(m.removesuffix("#input"), module_order))
            dim = next((self._activation_dim[k] for k in members_keys if k in self._activation_dim), 1)
            per_unit = tuple(m for m in members if m in self._per_unit)
            widths = {(t, d): self.layout.tensors[t].shape[d] for t, d in members}
            units = {m: 1 if m in per_unit else unit for m in members}
            sizes = {w // units[m] for m, w in widths.items()}
            if len(sizes) != 1 or any(w % units[m] for m, w in widths.items()):
                raise IncompatibleModelsError(
                    f"{self.layout.source.name}: the neuron group {root!r} joins dimensions of different sizes "
                    f"({', '.join(f'{t}[{d}]={widths[t, d]}' for t, d in members[:4])}...)"
                )
            name = next((self._names[k] for k in members_keys if k in self._names), root)
            first = min(order.get(t, len(order)) for t in (producers or [t for t, _ in members]))
            group = NeuronGroup(name, tuple(members), next(iter(sizes)), unit,
                                tuple(producers), tuple(activations), dim,
                                optional=any(k in self._optional for k in members_keys), per_unit=per_unit)
            groups.append((first, group))
        groups.sort(key=lambda item: item[0])
        return [g for _, g in groups]


NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
"""A BatchNorm's tensors indexed by its channels (``num_batches_tracked`` is a count, never a member)."""


def norm_members(module: str) -> tuple[tuple[str, int], ...]:
    """The (tensor, 0) pairs of the BatchNorm (or LayerNorm) ``module``: each indexes its channels."""
    return tuple((f"{module}.{tensor}", 0) for tensor in NORM_TENSORS)


def _position(module: str, module_order: dict[str, int]) -> int:
    """Where ``module`` first runs: its own position, or its first descendant's (a container owns no tensor)."""
    if module in module_order:
        return module_order[module]
    inside = [i for name, i in module_order.items() if name.startswith(f"{module}.")]
    return min(inside, default=len(module_order))
