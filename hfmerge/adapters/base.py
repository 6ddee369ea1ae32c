"""Model families described as data, and the inspection that uses them.

An adapter says, for one family of transformers models, which classes hfmerge
accepts, which task each serves, and which parameters form the classifier head
(as regular expressions over in-memory parameter names). Everything else —
the parameter names in memory, their depth order, shapes — is read from the
model class instantiated on the meta device, never from the checkpoint's key
order: safetensors files list keys alphabetically, and transformers 5 renames
many parameters between the checkpoint and the in-memory module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # base imports no module of the package that imports it back (tests/test_import_graph.py)
    from hfmerge.adapters.depth import DepthSpec
    from hfmerge.adapters.forward_order import ForwardOrder
    from hfmerge.adapters.neurons import LayoutView, NeuronGroup


ZERO_SHOT_LABELS = "classes named at inference, through a text tower"
"""Why a zero-shot family's model has no labels, where others' labels are counted or listed."""


@dataclass(frozen=True)
class HeadSpec:
    """A classifier layer whose output dimension (dim 0) is the label space.

    ``null_rows`` counts extra trailing outputs that are not labels, such as
    Mask2Former's "no object" class, which fusion averages instead of stacking.
    """

    pattern: str
    null_rows: int = 0

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class SharedInput:
    """Linear layers that read one input tensor, so one Gram matrix serves them all (RegMean).

    Every ``nn.Linear`` whose in-memory name fullmatches ``pattern`` joins a
    group; linears matched with equal values of the pattern's named groups
    (``(?P<block>...)``) share one group, so one pattern covers every layer.
    ``unless`` names a module (``{block}``-style fields filled from the match)
    whose presence means the rule does not apply there: SegFormer's queries
    read the hidden states, but where a block has a ``sequence_reduction``
    its keys and values read the spatially reduced ones. The first rule that
    applies to a linear decides its group; a linear no rule names is alone.
    """

    pattern: str
    unless: str | None = None

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class OutputFormat:
    """Another architecture of the family that a merge can be written as (``--output-format``).

    The output is a model of ``architecture``, which the base must be: every tensor the merge planned goes
    in under the base's name for it (the anchor's name, or ``<prefix>.`` and the anchor's name), and every
    base tensor the merge did not plan is the base's. CLIP towers become a ``CLIPModel`` with the base's
    text tower, which ``pipeline("zero-shot-image-classification")`` loads.
    """

    architecture: str
    prefix: str


@dataclass(frozen=True)
class TinyVariant:
    """A tiny model of a family, for tests, fixtures and demos (:mod:`hfmerge.testing.tiny`).

    Attributes:
        config: ``config(**labels)`` with ``id2label``/``label2id`` keyword arguments: a config small
            enough for a unit test (widths of 8–32, one or two layers per stage) and the architecture
            to build from it. It imports transformers itself, so that declaring it costs nothing.
        image_size: the images the tiny model reads (height and width).
        processor: ``processor(size)``: an image processor for images of ``size``; ``None``: a plain
            resize-and-normalise one (``ViTImageProcessorPil``).
    """

    config: Callable[..., tuple[Any, str]]
    image_size: int
    processor: Callable[[int], Any] | None = None


@dataclass(frozen=True)
class FamilyAdapter:
    """What hfmerge needs to know about one model family.

    Attributes:
        name: short family name shown to users.
        model_types: ``config.model_type`` values of the family.
        architectures: accepted transformers class names, each with its pipeline task.
        heads: classifier layers per architecture; fusion concatenates these.
        default_architecture: used when a config names no architecture.
        backbone_prefix: the in-memory name prefix of the backbone inside the task
            models (``vit``, ``resnet``, ``backbone``...). A headless base model
            (``ViTModel``) names the same tensors without it; layerwise refuses
            a merge whose shared layers do not include the anchor's backbone.
        not_layers: modules (regular expressions fullmatched against in-memory
            module names) whose output never reaches the model's main output,
            such as an auxiliary head that only feeds a training loss. They are
            not layers: layerwise leaves them out of Np and takes them from the anchor.
        trace_config: for a family whose forward cannot run on the meta device, a
            shrunk copy of a config that keeps every module name; the forward
            order is traced on a tiny CPU instance of it (see ``forward_order``).
        explicit_order: where tracing cannot work, the order given outright.
        blocks: (pattern, kind) pairs naming the attention and MLP blocks, kind
            ``"attention"`` or ``"mlp"``, patterns fullmatched against in-memory
            module names (see :attr:`~hfmerge.adapters.layout.ModelLayout.module_kinds`).
        shared_inputs: which linear layers read one input (see :class:`SharedInput`
            and :attr:`~hfmerge.adapters.layout.ModelLayout.linear_groups`).
        classes: for a family whose model classes are not transformers' own (hfmerge's MLP and
            VGG classifiers), the module that defines them, by import path; the architectures name
            classes in it. ``None``: transformers' classes.
        files: files written beside the weights of every model of the family, name -> the import
            path of the module whose source text it is (the self-contained modeling file that
            ``auto_map`` names for ``trust_remote_code``).
        neurons: the family's neuron groups, declared with a
            :class:`~hfmerge.adapters.neurons.GroupBuilder` over an inspected layout
            (see :attr:`~hfmerge.adapters.layout.ModelLayout.neuron_groups`); ``None``: the family
            cannot be aligned neuron by neuron (OTFusion, CLAFusion refuse it).
        depth: the family's hidden layers in alignable segments and how to add or merge layers
            (:class:`~hfmerge.adapters.depth.DepthSpec`); ``None``: models of the family are fused
            at one depth only (CLAFusion refuses it).
        gating_source: the architecture whose models the gating merge takes as sources (an image
            classifier with attention and MLP blocks, which it gates, and one classifier); ``None``:
            the gating merge refuses models of the family.
        gating_refusal: for a family whose models the gating merge refuses, why, in a few words that finish its
            one-line refusal: what its layers have that the gated model, a ViT's, lacks, or lack that it gates
            (attention and MLP blocks).
        gating_gate: the architecture whose models can serve as the gating merge's gate network (an image
            classifier whose backbone gets a new head); ``None``: no model of the family can.
        auto_classes: the transformers Auto class that loads an architecture, where it is not the one of
            its task (Mask2Former: ``AutoModelForUniversalSegmentation``); model cards name it.
        register_classes: for a family whose classes transformers does not know (``classes``), a function
            that registers them with transformers' Auto classes, so that its configs load without remote
            code. Called once, when the family is first looked up by model type
            (:func:`family_for_model_type`), not when the adapter is declared: importing the classes means
            importing transformers' modeling code, which a merge of another family never needs.
        not_merged: tensors no method merges (regular expressions fullmatched against in-memory names): a
            ``CLIPModel``'s text tower. Inspection sets them apart (:attr:`~hfmerge.adapters.layout.ModelLayout.carried`)
            and the output takes the base's, or the anchor's when there is no base.
        not_merged_name: what ``not_merged`` names, in a few words for the card (``"text tower"``), which says
            that it was carried rather than merged; empty: the card says "the tensors no method merges".
        image_encoder: per architecture whose forward needs more than images (a ``CLIPModel`` also reads text),
            the name of the model's method that encodes images (``get_image_features``): what a pass over
            images calls.
        output_formats: the architectures a merge can be written as, by the name ``--output-format`` takes.
        zero_shot: the architecture whose text tower scores this family's image encoders by zero-shot
            classification (:mod:`hfmerge.eval.zero_shot`): the model's own, else the base's; ``None``: the
            family's models are scored by their own heads. A zero-shot family's models have no labels
            of their own (their configs' ``id2label`` is transformers' default, ``LABEL_0``, ``LABEL_1``): inspection,
            plans and cards say so (:meth:`labels_text`) instead of counting those.
        usage: per architecture, the card's usage snippet where loading the model alone does not use it (a CLIP
            image encoder, which classifies only beside a text tower): Python code as a Jinja template of
            ``model_ref`` (the merged model), ``base_ref`` (the model that completes it: the base, or a
            placeholder) and ``architecture``. Other architectures get the snippet of their task.
        tiny: the family's tiny test models by name (``"vit"``, ``"mobilenet_v2-seg"``): a name says the
            family and, where a family has several, the variant (:class:`TinyVariant`,
            :mod:`hfmerge.testing.tiny`). Names are unique across families.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]
    heads: dict[str, tuple[HeadSpec, ...]] = field(default_factory=dict)
    default_architecture: str | None = None
    backbone_prefix: str = ""
    not_layers: tuple[str, ...] = ()
    trace_config: Callable[[Any], Any] | None = None
    explicit_order: Callable[[str, Any], ForwardOrder] | None = None
    blocks: tuple[tuple[str, str], ...] = ()
    shared_inputs: tuple[SharedInput, ...] = ()
    neurons: Callable[[LayoutView], list[NeuronGroup]] | None = None
    classes: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    depth: DepthSpec | None = None
    gating_source: str | None = None
    gating_refusal: str | None = None
    gating_gate: str | None = None
    auto_classes: dict[str, str] = field(default_factory=dict)
    not_merged: tuple[str, ...] = ()
    not_merged_name: str = ""
    image_encoder: dict[str, str] = field(default_factory=dict)
    output_formats: dict[str, OutputFormat] = field(default_factory=dict)
    zero_shot: str | None = None
    usage: dict[str, str] = field(default_factory=dict)
    tiny: dict[str, TinyVariant] = field(default_factory=dict)
    register_classes: Callable[[], None] | None = None

    def model_class(self, architecture: str) -> type[torch.nn.Module]:
        """The class for ``architecture`` (only classes this adapter lists): transformers', or ``classes``'."""
        import importlib

        return getattr(importlib.import_module(self.classes or "transformers"), architecture)

    def file_texts(self) -> dict[str, str]:
        """The text of each file in :attr:`files`: the source of the module it names."""
        import importlib
        import inspect

        return {name: inspect.getsource(importlib.import_module(module)) for name, module in self.files.items()}

    def head_of(self, architecture: str, memory_name: str) -> HeadSpec | None:
        """The head spec that ``memory_name`` belongs to, if any."""
        for spec in self.heads.get(architecture, ()):
            if spec.regex.fullmatch(memory_name):
                return spec
        return None

    def labels_text(self, id2label: dict[Any, str]) -> str:
        """A model's labels in words, for plans and cards: ``"3 labels"``; a zero-shot family's model has none of its
        own, whatever its config's ``id2label`` holds (:data:`ZERO_SHOT_LABELS`)."""
        if self.zero_shot is not None:
            return ZERO_SHOT_LABELS
        return f"{len(id2label)} labels"

    def is_merged(self, name: str) -> bool:
        """Whether the tensor ``name`` (in memory) is one a merge combines, i.e. not named in ``not_merged``."""
        return not any(re.fullmatch(pattern, name) for pattern in self.not_merged)

    def is_layer(self, module: str) -> bool:
        """Whether ``module`` (an in-memory module name) is a layer, i.e. not named in ``not_layers``."""
        return not any(re.fullmatch(pattern, module) for pattern in self.not_layers)

    def block_kind(self, module: str) -> str | None:
        """``"attention"`` or ``"mlp"`` when ``module`` is one of the declared blocks, else None."""
        for pattern, kind in self.blocks:
            if re.fullmatch(pattern, module):
                return kind
        return None

    def build_meta_model(self, architecture: str, config: Any) -> torch.nn.Module:
        """Instantiate the model on the meta device: names, shapes and order, no memory."""
        with torch.device("meta"):
            return self.model_class(architecture)(config)


_FAMILIES: dict[str, FamilyAdapter] = {}
_BUILT_IN: list[FamilyAdapter] = []
_CLASSES_REGISTERED: list[FamilyAdapter] = []


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register ``adapter`` for its model types; a second adapter for one type, or a second tiny model
    of one name, is an error (and registers none)."""
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"{adapter!r} is not a FamilyAdapter")
    if isinstance(adapter.model_types, str) or not adapter.model_types:
        raise TypeError(f"family {adapter.name!r} needs a tuple of model types, got {adapter.model_types!r}")
    for model_type in adapter.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model type {model_type!r} already has the adapter {_FAMILIES[model_type].name!r}")
    for other in registered_families():
        if clash := sorted(set(other.tiny) & set(adapter.tiny)):
            raise ValueError(f"the tiny model {clash[0]!r} is already declared by the adapter {other.name!r}")
    for model_type in adapter.model_types:
        _FAMILIES[model_type] = adapter
    return adapter


def registered_families() -> list[FamilyAdapter]:
    """Every registered adapter, once, in registration order."""
    return list({id(a): a for a in _FAMILIES.values()}.values())


def mark_built_in() -> None:
    """Mark every family registered so far as hfmerge's own.

    :mod:`hfmerge.adapters` calls it once it has imported its family files, before any plug-in can
    register (plug-ins load on the first look-up by model type). The inspection caches on disk what
    the model classes of built-in families say, whose code is hfmerge's and transformers' own.
    """
    _BUILT_IN.extend(a for a in registered_families() if not is_built_in(a))


def is_built_in(adapter: FamilyAdapter) -> bool:
    """Whether ``adapter`` is one of hfmerge's own families (see :func:`mark_built_in`), not a plug-in's."""
    return any(a is adapter for a in _BUILT_IN)


def _register_plugin(loaded: Any) -> list[str]:
    """Register what an ``hfmerge.families`` entry point names: a FamilyAdapter instance."""
    if not isinstance(loaded, FamilyAdapter):
        raise TypeError(f"it names {loaded!r}, not a FamilyAdapter instance")
    if loaded.model_types and all(_FAMILIES.get(t) is loaded for t in loaded.model_types):
        return list(loaded.model_types)  # its module registered it as it was imported
    register_family(loaded)
    return list(loaded.model_types)


def _load_plugins() -> None:
    from hfmerge.plugins import FAMILIES_GROUP, load_entry_points

    load_entry_points(FAMILIES_GROUP, _register_plugin)


def family_for_model_type(model_type: str) -> FamilyAdapter | None:
    """The adapter of ``model_type`` (hfmerge's own, or a plug-in's), or ``None``.

    The first look-up of a family registers its classes with transformers' Auto classes
    (:attr:`FamilyAdapter.register_classes`).
    """
    _load_plugins()
    adapter = _FAMILIES.get(model_type)
    if adapter is not None and adapter.register_classes is not None and not any(
        a is adapter for a in _CLASSES_REGISTERED
    ):
        adapter.register_classes()
        _CLASSES_REGISTERED.append(adapter)
    return adapter


def supported_families() -> list[str]:
    _load_plugins()
    return sorted({a.name for a in _FAMILIES.values()})


def balanceable_families() -> list[str]:
    """The families whose depth CLAFusion can balance (they declare depth segments and neuron groups)."""
    _load_plugins()
    return sorted({a.name for a in _FAMILIES.values() if a.depth is not None and a.neurons is not None})


def alignable_families() -> list[str]:
    """The families that declare neuron groups (OTFusion and CLAFusion can align them)."""
    _load_plugins()
    return sorted({a.name for a in _FAMILIES.values() if a.neurons is not None})
