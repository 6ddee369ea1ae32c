"""Layer balancing (CLAFusion §3.2): give two networks of one family the same depth before fusing them.

Given the cross-layer alignment a (:func:`hfmerge.methods.ot.cross_layer.cross_layer_alignment`)
of a shallower network B into a deeper network A, segment by segment:

- **adding layers** (:func:`deepen`): B gets, at every position of A that no
  layer of B matches, a layer that passes its input through unchanged
  (:class:`~hfmerge.adapters.depth.DepthSpec`'s ``identity``), so B computes
  exactly what it computed before, now with A's depth;
- **merging layers** (:func:`merge_linear` and :func:`relu_estimate`, MLPs only):
  A loses every layer that matches none of B's, folded into the next one,
  W' = W_{l+1} D W_l, where the diagonal D stands for the dropped layer's ReLU,
  estimated from its pre-activations on the data.

The fused network is then made layer by layer with OTFusion, which needs each
balanced network's activations: :func:`deepened_activations` computes a deepened
network's from the original network's, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hfmerge.adapters.depth import DepthSegment, DepthSpec, Structure

__all__ = ["Deepened", "deepen", "deepened_activations", "merge_linear", "relu_estimate", "RELU_ESTIMATES",
           "positions_of"]

RELU_ESTIMATES = ("sign_of_sum", "majority_vote", "average_of_sign")


def positions_of(mapping: list[int], length: int) -> list[int | None]:
    """For each of the deeper segment's ``length`` positions, the shallower layer aligned to it, or ``None``."""
    positions: list[int | None] = [None] * length
    for k, j in enumerate(mapping):
        positions[j] = k
    return positions


@dataclass
class Deepened:
    """A shallower network with identity layers added (§3.2, adding layers).

    Attributes:
        model: the deepened network, in memory (a new instance of the original's class).
        positions: per segment, per position, the original layer at that position or ``None`` (added).
        renamed: each module of a kept layer in the deepened network -> the same module in the original.
        added: the modules of the added layers, each with the (segment, position) of its layer.
        segments: the deepened network's segments.
    """

    model: torch.nn.Module
    positions: list[list[int | None]]
    renamed: dict[str, str]
    added: dict[str, tuple[int, int]]
    segments: list[DepthSegment]

    def layer_of(self, name: str) -> tuple[int, int]:
        """The (segment, position) of the added layer that holds the tensor or module ``name``."""
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.added:
                return self.added[prefix]
        raise KeyError(f"{name} is in no added layer")

    def original_name(self, name: str) -> str | None:
        """The original network's name of the deepened network's tensor or module ``name``; ``None``: added."""
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.renamed:
                return self.renamed[prefix] + name[len(prefix):]
            if prefix in self.added:
                return None
        return name


def deepen(model: torch.nn.Module, spec: DepthSpec, mappings: list[list[int]], lengths: list[int]) -> Deepened:
    """Add identity layers to ``model`` until segment s has ``lengths[s]`` layers, its own at ``mappings[s]``.

    ``mappings[s][k]`` is the position (0-based, strictly increasing) that the model's layer k of
    segment s takes. The new model is built from the deepened config (the family's ``deepen``),
    the added layers made identities (the family's ``identity``), and every other tensor copied from
    ``model``. In eval mode it computes what ``model`` computes (tested per family).
    """
    segments = spec.segments(Structure.of_model(model))
    if len(segments) != len(mappings) or len(lengths) != len(mappings):
        raise ValueError(f"the model has {len(segments)} segments; {len(mappings)} mappings given")
    positions = [positions_of(mapping, length) for mapping, length in zip(mappings, lengths)]
    config = spec.deepen(model.config, positions)  # type: ignore[attr-defined]
    deeper = type(model)(config).eval()
    deeper_segments = spec.segments(Structure.of_model(deeper))
    renamed: dict[str, str] = {}
    added: dict[str, tuple[int, int]] = {}
    for s, (slots, segment) in enumerate(zip(positions, deeper_segments)):
        for j, (k, layer) in enumerate(zip(slots, segment.layers)):
            if k is None:
                spec.identity(deeper, layer)
                added.update((module, (s, j)) for module in layer.modules)
            else:
                renamed.update(zip(layer.modules, segments[s].layers[k].modules))
    result = Deepened(deeper, positions, renamed, added, deeper_segments)
    original = model.state_dict()
    with torch.no_grad():
        for name, tensor in deeper.state_dict().items():
            source = result.original_name(name)
            if source is not None:
                tensor.copy_(original[source])
    return result


def deepened_activations(deepened: Deepened, spec: DepthSpec, modules: list[str],
                         original: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deepened network's activations at ``modules``, from the original's (``original(module)``).

    A kept layer's module has its original's activation; an added layer's module, what the family's
    ``added_representation`` says the added layer outputs there, from the activations of the layer
    before it (itself added or kept) on the same images.
    """
    cache: dict[str, torch.Tensor] = {}

    def activation(module: str) -> torch.Tensor:
        if module in cache:
            return cache[module]
        source = deepened.original_name(module)
        if source is not None:
            out = original(source)
        else:
            s, j = deepened.layer_of(module)
            layers = deepened.segments[s].layers
            out = spec.added_representation(module, layers[j], layers[j - 1], activation, deepened.model)
        cache[module] = out
        return out

    return {module: activation(module) for module in modules}


def relu_estimate(z: torch.Tensor, how: str) -> torch.Tensor:
    """The diagonal of D that stands for a dropped layer's ReLU, from its pre-activations z (t × p), §3.2.

    With step(x) = 1 for x ≥ 0, else 0: ``sign_of_sum`` = step(Σⱼ z_ji); ``majority_vote`` = 1 when
    at least t/2 samples have z_ji ≥ 0; ``average_of_sign`` = (1/t) Σⱼ step(z_ji).
    """
    z = z.reshape(z.shape[0], -1).to(torch.float64)
    steps = (z >= 0).to(torch.float64)
    if how == "sign_of_sum":
        return (z.sum(dim=0) >= 0).to(torch.float64)
    if how == "majority_vote":
        return (steps.sum(dim=0) >= z.shape[0] / 2).to(torch.float64)
    if how == "average_of_sign":
        return steps.mean(dim=0)
    raise ValueError(f"unknown ReLU estimate {how!r}; one of {', '.join(RELU_ESTIMATES)}")


def merge_linear(first: tuple[torch.Tensor, torch.Tensor | None], second: tuple[torch.Tensor, torch.Tensor | None],
                 d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a layer into the next, §3.2: W' = W₂ D W₁ and b' = W₂ D b₁ + b₂ (the paper omits biases).

    ``first`` = (W₁, b₁) of the dropped layer (p × q), ``second`` = (W₂, b₂) of the next (r × p), ``d``
    the diagonal of D (p). Exact wherever D matches the ReLU's pattern on an input.
    """
    (w1, b1), (w2, b2) = first, second
    w1, w2, d = w1.to(torch.float64), w2.to(torch.float64), d.to(torch.float64)
    weight = w2 @ (d[:, None] * w1)
    bias = None
    if b1 is not None or b2 is not None:
        bias = torch.zeros(w2.shape[0], dtype=torch.float64)
        if b1 is not None:
            bias = bias + w2 @ (d * b1.to(torch.float64))
        if b2 is not None:
            bias = bias + b2.to(torch.float64)
    return weight, bias
