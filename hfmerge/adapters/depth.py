"""Depth structure: a family's hidden layers in alignable segments, and how to add a layer that changes nothing.

CLAFusion (``clafusion.txt`` §3.1–3.2) fuses networks of one family but
different depth. It aligns the hidden layers of the shallower network to the
deeper one's *within segments*: never a convolution with a fully connected
layer; in a VGG-style CNN between max-poolings (the feature maps' size changes
there); in a ResNet the blocks of one stage, where the channel count holds.
Then it balances the depths by adding, to the shallower network, layers that
pass their input through unchanged: an identity matrix and a ReLU in an MLP,
identity (Dirac) kernels in a CNN, a block whose residual branch outputs zero
in a ResNet, so that its shortcut carries the input.

Each family that supports this declares a :class:`DepthSpec` in its adapter.
The declarations read module names, classes and tensor shapes only, so they
serve an inspected checkpoint (:class:`~hfmerge.adapters.layout.ModelLayout`)
and a model in memory alike (:class:`Structure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Structure:
    """What a depth declaration reads: module classes in registration order and tensor shapes, by in-memory name."""

    modules: Mapping[str, type]
    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def of_layout(cls, layout: Any) -> Structure:
        """From an inspected checkpoint (no tensor read)."""
        return cls(layout.module_classes, {name: info.shape for name, info in layout.tensors.items()})

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> Structure:
        """From a model in memory (or on the meta device)."""
        return cls({name: type(m) for name, m in model.named_modules() if name},
                   {name: tuple(t.shape) for name, t in model.state_dict().items()})


@dataclass(frozen=True)
class DepthLayer:
    """One hidden layer (a ResNet block counts as one).

    Attributes:
        modules: the layer's modules, its main one first (a linear layer; a convolution and its
            BatchNorm; a ResNet block). Two layers of one family list corresponding modules in
            the same positions, so a layer's tensors move by replacing one module name with another.
        width: its output units (neurons, channels).
        representation: the module whose output represents the layer (its pre-activation): the
            cost of cross-layer alignment compares these.
        output: the module whose output is the layer's output, after its activation function (what the
            next layer reads); ``None`` where no module gives it and ReLU(representation) is exact (an
            MLP's functional ReLU on unpooled features). Pooled activations need it: the ReLU of a
            pooled map is not the pooled ReLU.
    """

    modules: tuple[str, ...]
    width: int
    representation: str
    output: str | None = None


@dataclass(frozen=True)
class DepthSegment:
    """Consecutive hidden layers that may align with each other's (one stage; convolutions between two poolings).

    The alignment's a(1) = 1 keeps a segment's first layer matched, so it is never an added one (a
    ResNet stage opens with the block whose shortcut changes width and resolution).
    """

    name: str
    layers: tuple[DepthLayer, ...]


@dataclass(frozen=True)
class DepthSpec:
    """How a family's depth is read and balanced (CLAFusion).

    Attributes:
        segments: the hidden layers of a model, in forward order, split into segments. Layers in no
            segment (a stem, the classifier) are matched by name between models.
        deepen: a copy of a config whose segment ``s`` has ``len(plan[s])`` layers; ``plan[s][j]`` is
            the index of the original layer at position j, or ``None`` for an added layer, which takes
            the width of the layer before it.
        identity: make an added layer (a module of a freshly built model) compute the identity on
            non-negative inputs, which every hidden layer here receives (they follow a ReLU).
        added_representation: an added layer's activation at one of its observed modules, given
            ``(module, layer, previous layer, activation, model)``: ``activation(name)`` gives any
            activation of the deepened model (the previous layer's among them), ``model`` is the
            deepened model. An identity layer's pre-activation is the ReLU of the previous layer's
            representation; a zero residual branch outputs zeros, and its block passes its input on.
        merge: for MLPs, ``balance=merge`` (§3.2): the layer to drop folds into the next one,
            W' = W_{l+1} D W_l. ``None``: the family cannot merge layers (a CNN).
        segment_kind: what the layers of a segment are, for the card ("the blocks of each stage").
        identity_layer: what an added layer is, for the card ("a convolution with identity (Dirac) kernels").
        segment_plural: what the segments are called in messages ("stages").
    """

    segments: Callable[[Structure], list[DepthSegment]]
    deepen: Callable[[Any, list[list[int | None]]], Any]
    identity: Callable[[torch.nn.Module, DepthLayer], None]
    added_representation: Callable[[str, DepthLayer, DepthLayer, Callable[[str], torch.Tensor], torch.nn.Module],
                                   torch.Tensor]
    merge: Callable[[Any, list[list[int]]], Any] | None = None
    segment_kind: str = "segment by segment"
    identity_layer: str = "an identity layer"
    segment_plural: str = "segments"


def widths_with_added(widths: list[int], positions: list[int | None], *, why_not_first: str) -> list[int]:
    """The widths of a deepened segment: the original layer's at each kept position, and at an added
    (identity) layer the width of the layer before it. An added layer cannot open a segment
    (``why_not_first`` says why, for the family)."""
    out: list[int] = []
    for j, source in enumerate(positions):
        if source is None and j == 0:
            raise ValueError(why_not_first)
        out.append(widths[source] if source is not None else out[-1])
    return out


def layer_output(layer: DepthLayer, activation: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """A layer's output after its activation function, as recorded (or the ReLU of its pre-activation)."""
    if layer.output is not None:
        return activation(layer.output)
    return torch.relu(activation(layer.representation))


def relu_of_previous(module: str, layer: DepthLayer, previous: DepthLayer,
                     activation: Callable[[str], torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """Every output of an identity layer (pre-activation and output alike) is its input, the previous layer's output."""
    return layer_output(previous, activation)


def neutral_batch_norm(norm: torch.nn.Module) -> None:
    """A BatchNorm that outputs its input in eval mode: scale 1, shift 0, running mean 0, variance 1 − ε."""
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        norm.num_batches_tracked.zero_()
