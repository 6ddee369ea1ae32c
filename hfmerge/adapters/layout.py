"""Inspecting a resolved source: family, task, tensors in depth order, head, labels."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import torch

from hfmerge.adapters.base import (
    FamilyAdapter,
    HeadSpec,
    alignable_families,
    family_for_model_type,
    is_built_in,
    supported_families,
)
from hfmerge.adapters.class_facts import ClassFacts, FactsCache, facts_key
from hfmerge.adapters.forward_order import forward_order
from hfmerge.adapters.neurons import NeuronGroup
from hfmerge.errors import IncompatibleModelsError, SourceError
from hfmerge.hub.resolve import ResolvedSource
from hfmerge.io.checkpoint import CheckpointReader, TensorTable
from hfmerge.io.renaming import ConvertedOnLoadError, checkpoint_to_memory_names


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint.

    ``key`` is its name in the checkpoint file, ``name`` its name in the
    instantiated transformers module (they differ for renamed parameters),
    ``module`` the in-memory module that owns it. ``is_layer`` is false for
    tensors of modules whose output never reaches the model's main output (an
    auxiliary head, a loss criterion, as each adapter names them; in
    :attr:`ModelLayout.forward` also modules the traced pass never runs):
    layer-wise methods take those from the anchor. A tensor can be a head
    (fusion concatenates it) and not a layer.
    """

    key: str
    name: str
    module: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    head: HeadSpec | None
    is_layer: bool = True

    @property
    def is_integer(self) -> bool:
        return not (self.dtype.is_floating_point or self.dtype.is_complex)


@dataclass
class ModelLayout:
    """What hfmerge knows about one source after inspection.

    ``tensors`` maps in-memory names to :class:`TensorInfo` in the model
    class's registration order, which is all most methods need. ``forward``
    is the same tensors in the order a traced forward pass first calls their
    modules (:mod:`hfmerge.adapters.forward_order`), a module's tensors in
    registration order, modules that are not layers last; it is traced on
    first use (layerwise, ``hfmerge inspect``), so methods that do not number
    layers never pay for the trace. ``modules`` lists the owning modules in
    that order; ``layers`` only those that are layers.
    """

    source: ResolvedSource
    family: FamilyAdapter
    architecture: str
    task: str
    config: Any
    reader: TensorTable
    tensors: dict[str, TensorInfo]
    ignored: dict[str, TensorInfo] = field(default_factory=dict)
    """Checkpoint tensors that transformers does not load (stale or non-persistent buffers,
    such as Swin's ``relative_position_index`` in files saved by 4.x), by in-memory name.
    No method merges them; the pipeline carries the anchor's into the output."""
    carried: dict[str, TensorInfo] = field(default_factory=dict)
    """Tensors of the checkpoint that no method merges (a ``CLIPModel``'s text tower: the adapter's
    ``not_merged``), by in-memory name; the pipeline carries the base's, or the anchor's, into the output."""
    absent: tuple[str, ...] = ()
    """In-memory names of the class's tensors that the checkpoint lacks, which transformers
    initialises on load (``swin.layernorm`` in UperNet-Swin and Mask2Former files saved by 4.x).
    No method plans them: the output lacks them too, as the sources do."""
    module_classes: Mapping[str, type] = field(default_factory=dict, repr=False)
    """Every in-memory module name (the root is ``""``) and its class, from the meta model (read from the
    inspection cache, a class is imported when first asked for: :class:`~hfmerge.adapters.class_facts.ModuleClasses`)."""
    parameter_names: frozenset[str] = frozenset()
    """The in-memory names of the model's parameters (trainable tensors; the rest of ``tensors`` are buffers)."""

    @cached_property
    def forward(self) -> dict[str, TensorInfo]:
        """The tensors in forward order, layers first; a module that never runs is no layer."""
        run_order = forward_order(self.family, self.architecture, self.config)
        depth = {module: i for i, module in enumerate(run_order.modules)}
        registered = {name: i for i, name in enumerate(self.tensors)}
        infos = [replace(t, is_layer=False) if t.module in run_order.not_run else t for t in self.tensors.values()]
        infos.sort(key=lambda t: (not t.is_layer, depth.get(t.module, len(depth)), registered[t.name]))
        return {t.name: t for t in infos}

    @cached_property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(t.module for t in self.forward.values()))

    @cached_property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(t.module for t in self.forward.values() if t.is_layer))

    @cached_property
    def module_kinds(self) -> dict[str, str]:
        """In-memory module name -> ``"linear"``, ``"conv"``, ``"norm"``, ``"embedding"``, ``"attention"`` or ``"mlp"``.

        Attention and MLP blocks are those the adapter declares (``blocks``);
        the others follow the module's class (:func:`module_kind`). Modules of
        no kind (containers, activations, dropout, whole models) are left out.
        Computed on first use: static methods never ask.
        """
        owners = {t.module for t in self.tensors.values()}
        kinds: dict[str, str] = {}
        for name, cls in self.module_classes.items():
            kind = self.family.block_kind(name) or module_kind(cls, owns_tensors=name in owners)
            if kind is not None:
                kinds[name] = kind
        return kinds

    @cached_property
    def linear_groups(self) -> list[tuple[str, ...]]:
        """The ``nn.Linear`` modules grouped by the input tensor they read, one Gram matrix per group.

        q, k and v of one attention block are one group (as each adapter
        declares in ``shared_inputs``); every other linear is a group of its
        own. Groups are in registration order of their first member. Linears
        that ``nn.MultiheadAttention`` owns are left out: it uses their weights
        without calling them, so no forward hook ever sees their input. Linears whose weights no method merges
        (:attr:`carried`: a ``CLIPModel``'s text tower) are left out too.
        """
        groups = (tuple(m for m in group if f"{m}.weight" not in self.carried)
                  for group in linear_groups(self.family, self.module_classes))
        return [group for group in groups if group]

    @cached_property
    def neuron_groups(self) -> list[NeuronGroup]:
        """The model's neuron groups in forward order, as its adapter declares them (:mod:`hfmerge.adapters.neurons`).

        Optional groups (a transformer's residual stream) are left out: :meth:`neuron_groups_with` adds them.

        Raises:
            IncompatibleModelsError: the family declares none.
        """
        return [g for g in self.all_neuron_groups if not g.optional]

    def neuron_groups_with(self, optional: bool) -> list[NeuronGroup]:
        """The neuron groups, optional ones included when ``optional``."""
        return self.all_neuron_groups if optional else self.neuron_groups

    @cached_property
    def all_neuron_groups(self) -> list[NeuronGroup]:
        """Every neuron group the adapter declares, optional ones included."""
        if self.family.neurons is None:
            raise IncompatibleModelsError(
                f"{self.source.name} is a {self.family.name} model, whose neurons hfmerge cannot align; "
                f"neuron alignment supports {', '.join(alignable_families())}"
            )
        return self.family.neurons(self)

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (getattr(self.config, "id2label", None) or {}).items()}

    @property
    def head_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.head is not None]

    @property
    def num_parameters(self) -> int:
        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total


# Sources of one architecture and config (checkpoints of a run, fine-tunes of one model) share
# the meta model's names, shapes and order: build it once per (architecture, config, keys) in a process,
# and once per code version on a machine (FactsCache).
_MODEL_CLASS_FACTS: dict[tuple[str, bytes, tuple[str, ...]], ClassFacts] = {}


def inspect_reference(reference: str, *, token: str | bool | None = None, allow_pickle: bool = False) -> ModelLayout:
    """The model a reference names (``org/name[@revision]`` or a folder), resolved and inspected."""
    from hfmerge.hub.resolve import resolve_source

    return inspect_source(resolve_source(reference, token=token, allow_pickle=allow_pickle), allow_pickle=allow_pickle)


def inspect_source(
    source: ResolvedSource, *, allow_pickle: bool = False, reader: TensorTable | None = None
) -> ModelLayout:
    """Read config and checkpoint header of ``source``; no tensor data is loaded.

    ``reader`` gives the checkpoint's tensors when they are known otherwise
    (a :class:`~hfmerge.io.checkpoint.HeaderReader` from Hub headers);
    by default the weight files in ``source.path`` are opened.

    Raises:
        SourceError: unsupported family or architecture, a checkpoint whose
            names or shapes disagree with its config, or one with a tensor that
            transformers converts on load (:class:`~hfmerge.io.renaming.ConvertedOnLoadError`).
    """
    from transformers import AutoConfig

    _register_family_classes(source)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{source.name}: its config.json cannot be read by transformers ({first})") from None
    family = family_for_model_type(config.model_type)
    if family is None:
        raise SourceError(
            f"{source.name} is a {config.model_type!r} model; hfmerge supports {', '.join(supported_families())}"
        )
    architectures = getattr(config, "architectures", None) or [family.default_architecture]
    architecture = architectures[0]
    if architecture not in family.architectures:
        raise SourceError(
            f"{source.name}: architecture {architecture} is not supported; "
            f"{family.name} models may be {', '.join(family.architectures)}"
        )
    if reader is None:
        reader = CheckpointReader(source.path, allow_pickle=allow_pickle, label=source.name)
    try:
        facts = class_facts(family, architecture, config, (source.path / "config.json").read_bytes(), list(reader.keys()))
    except ConvertedOnLoadError as exc:
        raise SourceError(
            f"{source.name}: transformers converts the checkpoint tensor {exc.key} when it loads it (into "
            f"{' and '.join(exc.targets)}), and hfmerge merges only tensors that load as they are stored, so no "
            f"method can merge this model; merge {config.model_type} models whose config has no such layer"
        ) from None
    meta_shapes, names = facts.shapes, facts.names

    order = {name: i for i, name in enumerate(meta_shapes)}
    tensors: list[TensorInfo] = []
    ignored: dict[str, TensorInfo] = {}
    unknown = [k for k, n in names.items() if n not in order and n not in facts.ignored]
    if unknown:
        raise SourceError(
            f"{source.name}: the checkpoint has {len(unknown)} tensor(s) its config does not describe "
            f"(e.g. {unknown[0]}); the weights and config.json disagree — re-save the model with save_pretrained"
        )
    for key, name in names.items():
        if name in facts.ignored:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            ignored[name] = TensorInfo(key, name, owner, reader.shape(key), reader.dtype(key), None)
            continue
        expected = meta_shapes[name]
        shape = reader.shape(key)
        if shape != expected:
            raise SourceError(
                f"{source.name}: tensor {key} has shape {list(shape)} but its config implies {list(expected)}; "
                "the weights and config.json disagree — re-save the model with save_pretrained"
            )
        module = name.rsplit(".", 1)[0] if "." in name else ""
        is_layer = family.is_layer(module)
        tensors.append(
            TensorInfo(key, name, module, shape, reader.dtype(key), family.head_of(architecture, name), is_layer)
        )
    tensors.sort(key=lambda t: order[t.name])
    carried = {t.name: t for t in tensors if not family.is_merged(t.name)}
    return ModelLayout(
        source=source,
        family=family,
        architecture=architecture,
        task=family.architectures[architecture],
        config=config,
        reader=reader,
        tensors={t.name: t for t in tensors if t.name not in carried},
        ignored=ignored,
        carried=carried,
        absent=facts.absent,
        module_classes=facts.module_classes,
        parameter_names=facts.parameter_names,
    )


def _register_family_classes(source: ResolvedSource) -> None:
    """Look up the family that ``config.json`` declares, so that a family whose classes transformers does not
    know registers them (:attr:`FamilyAdapter.register_classes`) before transformers reads the config."""
    try:
        model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):  # transformers' own reading says what is wrong
        return
    if isinstance(model_type, str):
        family_for_model_type(model_type)


def class_facts(
    family: FamilyAdapter, architecture: str, config: Any, config_text: bytes, keys: list[str]
) -> ClassFacts:
    """What ``architecture``'s class, built from ``config``, says about a checkpoint of ``keys``.

    Read from this process's memory, else from the disk cache (hfmerge's own families), else
    computed from the model on the meta device and stored in both.

    Args:
        config_text: the bytes of the ``config.json`` that ``config`` was read from (the cache's key).
    """
    memory_key = (architecture, config_text, tuple(keys))
    if memory_key in _MODEL_CLASS_FACTS:
        return _MODEL_CLASS_FACTS[memory_key]
    cache = FactsCache() if is_built_in(family) else None
    disk_key = facts_key(family, architecture, config_text, keys) if cache is not None else {}
    facts = cache.load(disk_key) if cache is not None else None
    if facts is None:
        facts = _facts_of_meta_model(family, architecture, config, keys)
        if cache is not None:
            cache.save(disk_key, facts)
    _MODEL_CLASS_FACTS[memory_key] = facts
    return facts


def _facts_of_meta_model(family: FamilyAdapter, architecture: str, config: Any, keys: list[str]) -> ClassFacts:
    meta_model = family.build_meta_model(architecture, config)
    meta_state = meta_model.state_dict()
    names = checkpoint_to_memory_names(meta_model, keys, meta_state)
    loaded = set(names.values())
    ignored = ignored_on_load(meta_model, {n for n in loaded if n not in meta_state})
    return ClassFacts(
        {n: tuple(t.shape) for n, t in meta_state.items()}, names, frozenset(ignored),
        tuple(n for n in meta_state if n not in loaded),
        {name: type(module) for name, module in meta_model.named_modules()},
        frozenset(name for name, _ in meta_model.named_parameters()),
    )


_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
          torch.nn.RMSNorm)


def module_kind(cls: type, *, owns_tensors: bool = False) -> str | None:
    """The kind of a module class: ``"linear"``, ``"conv"``, ``"norm"``, ``"embedding"``, or None.

    Besides torch's own classes, a transformers class whose name ends in
    ``LayerNorm``/``RMSNorm`` is a norm, and one ending in ``Embeddings`` that
    owns tensors itself (ViT's position embeddings and class token) an
    embedding; ResNet's ``ResNetEmbeddings``, a container of the stem
    convolution, is none.
    """
    if issubclass(cls, torch.nn.Linear):
        return "linear"
    if issubclass(cls, torch.nn.modules.conv._ConvNd):
        return "conv"
    if issubclass(cls, _NORMS) or cls.__name__.endswith(("LayerNorm", "RMSNorm")):
        return "norm"
    if issubclass(cls, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return "embedding"
    if owns_tensors and cls.__name__.endswith("Embeddings"):
        return "embedding"
    return None


def linear_groups(family: FamilyAdapter, module_classes: Mapping[str, type]) -> list[tuple[str, ...]]:
    """Group a model's ``nn.Linear`` modules by the input they read (see :attr:`ModelLayout.linear_groups`).

    Args:
        family: the adapter whose ``shared_inputs`` rules apply.
        module_classes: every module name of the model and its class, in registration order.
    """
    linears = [
        name for name, cls in module_classes.items()
        if issubclass(cls, torch.nn.Linear)
        and not issubclass(module_classes.get(name.rpartition(".")[0], object), torch.nn.MultiheadAttention)
    ]
    present = set(module_classes)
    groups: dict[tuple[object, ...], list[str]] = {}
    for name in linears:
        key: tuple[object, ...] = ("alone", name)
        for rule_index, rule in enumerate(family.shared_inputs):
            match = rule.regex.fullmatch(name)
            if match is None or (rule.unless and rule.unless.format(**match.groupdict()) in present):
                continue
            key = ("rule", rule_index, tuple(sorted(match.groupdict().items())))
            break
        groups.setdefault(key, []).append(name)
    return [tuple(members) for members in groups.values()]


def ignored_on_load(model: torch.nn.Module, unexpected: set[str]) -> set[str]:
    """The checkpoint tensors, among ``unexpected``, that ``from_pretrained`` skips by design.

    ``unexpected`` are the in-memory names of checkpoint tensors that are not in
    ``model.state_dict()`` (``model``: the class instantiated from the source's
    config). transformers loads only ``state_dict()`` names and skips these:

    - buffers of the model that are not persistent: the module computes them
      in ``__init__``, a checkpoint never overwrites them;
    - names matched by the ``_keys_to_ignore_on_load_unexpected`` patterns of
      the model or of a sub-model within it, each applied to names under that
      sub-model (transformers 5 gathers these patterns from direct children
      only, so Mask2Former's Swin backbone declares its stale
      ``relative_position_index`` ignorable yet the top model reports it);
    - names the model's own ``_adjust_missing_and_unexpected_keys`` drops
      (stale ``position_ids``, ``rotary_emb.inv_freq``).

    The rest — tensors of layers the config does not describe — are not returned.
    """
    buffers = {name for name, _ in model.named_buffers()}
    declared: list[tuple[str, re.Pattern[str]]] = []
    for prefix, module in model.named_modules():
        for pattern in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ():
            declared.append((f"{prefix}." if prefix else "", re.compile(pattern)))
    ignored = {
        name for name in unexpected
        if name in buffers or any(name.startswith(p) and regex.search(name) for p, regex in declared)
    }
    report = SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
    try:
        model._adjust_missing_and_unexpected_keys(report)  # type: ignore[operator]
    except (AttributeError, TypeError):  # a transformers whose method differs: the rules above still apply
        pass
    return ignored | (unexpected - set(report.unexpected_keys))
