"""Multi-task weight similarity per transformer layer, and the layers it selects for gating.

The gating merge of ViTs (vit-gating-merge, §3.3) gates the layers where the
sources disagree most. Their disagreement is measured per layer ``l`` by
Eq. 4,

    Sim(l) = Σ_{i<j} CosineSim(W_i^l, W_j^l),

computed separately for the attention block and the MLP block of each layer,
with the "concat-layers + combined-FFN" strategy (Table 9, the best one):
W_i^l is model i's attention weights of layer l concatenated into one vector
(query, key, value and output projections, weights and biases), and likewise
both MLP linears together. Each entry lies in [-P, P] with P = N(N-1)/2, and
equals P where all sources agree.

Weights are streamed: only one tensor of one source (plus one running sum) is
held at a time, so memory does not grow with the number of sources N. With
â_i = vec_i / ‖vec_i‖,

    Σ_{i<j} <â_i, â_j> = (‖Σ_i â_i‖² − Σ_i ‖â_i‖²) / 2,

and ‖Σ_i â_i‖² is a sum over tensors of ‖Σ_i t_i / ‖vec_i‖‖², so a first pass
gathers each source's block norms and a second accumulates the normalised
tensors one key at a time, all in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING

from hfmerge.errors import IncompatibleModelsError, MergeNumericError, RecipeError

if TYPE_CHECKING:  # importing this module loads no torch: methods import it while `hfmerge methods` lists them
    import torch

    from hfmerge.adapters.layout import ModelLayout

logger = logging.getLogger(__name__)

BLOCK_KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class LayerSimilarity:
    """Sim(l) of Eq. 4 for each transformer layer, l = 0..L-1 in forward order.

    Attributes:
        attention: Sim_attn(l), the query/key/value/output weights of layer l concatenated.
        mlp: Sim_mlp(l), both MLP linears of layer l concatenated ("combined-FFN").
        pairs: N(N-1)/2, the value of each entry when all N sources agree.
    """

    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    pairs: int

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise ValueError(
                f"LayerSimilarity needs one attention and one MLP value per layer "
                f"(got {len(self.attention)} and {len(self.mlp)})"
            )

    @property
    def num_layers(self) -> int:
        return len(self.attention)


@dataclass(frozen=True)
class TransformerBlock:
    """One attention or MLP block of a source: layer ``layer``'s block ``module``, its tensors by in-memory name.

    ``tensors`` are in forward order; ``ModelLayout.tensors[name].key`` gives each one's checkpoint key.
    """

    kind: str
    layer: int
    module: str
    tensors: tuple[str, ...]


def transformer_blocks(layout: ModelLayout) -> list[TransformerBlock]:
    """The attention and MLP blocks of ``layout`` that the adapter declares, layer by layer in forward order.

    Block modules come from :attr:`ModelLayout.module_kinds` (the adapter's
    ``blocks`` patterns); a block's tensors are those of the modules inside it.
    The l-th attention block and the l-th MLP block in forward order form layer l.

    Raises:
        IncompatibleModelsError: the family declares no attention and MLP blocks,
            or not one of each per layer.
    """
    kinds = layout.module_kinds
    owned: dict[str, list[str]] = {}
    for info in layout.forward.values():
        for block in _enclosing_blocks(info.module, kinds):
            owned.setdefault(block, []).append(info.name)
    per_kind: dict[str, list[str]] = {kind: [b for b in owned if kinds[b] == kind] for kind in BLOCK_KINDS}
    counts = {kind: len(blocks) for kind, blocks in per_kind.items()}
    if counts["attention"] == 0 or counts["attention"] != counts["mlp"]:
        raise IncompatibleModelsError(
            f"{layout.source.name} ({layout.family.name}) has {counts['attention']} attention and {counts['mlp']} "
            "MLP blocks; layer similarity needs transformer layers of one attention and one MLP block each (ViT)"
        )
    blocks = []
    for layer in range(counts["attention"]):
        for kind in BLOCK_KINDS:
            module = per_kind[kind][layer]
            blocks.append(TransformerBlock(kind, layer, module, tuple(owned[module])))
    return blocks


def gated_keys(layout: ModelLayout, gated: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[str, ...]:
    """The checkpoint keys of the attention layers ``gated[0]`` and MLP layers ``gated[1]``, in forward order.

    ``gated`` is what :func:`select_gated` returns; the keys name the tensors a
    gated model stores once per source (GATING.md, ``GatedMergedConfig.gated``).

    Raises:
        ValueError: a gated index is not a layer of ``layout``.
    """
    blocks = transformer_blocks(layout)
    wanted = _gated_sets(gated, len(blocks) // 2)
    chosen = {name for b in blocks if b.layer in wanted[b.kind] for name in b.tensors}
    return tuple(t.key for t in layout.forward.values() if t.name in chosen)


def _gated_sets(gated: tuple[tuple[int, ...], tuple[int, ...]], layers: int) -> dict[str, set[int]]:
    """``gated`` (attention, MLP layer indices) by kind, each index checked to be one of ``layers``."""
    sets = {"attention": set(gated[0]), "mlp": set(gated[1])}
    for kind, indices in sets.items():
        outside = sorted(i for i in indices if not 0 <= i < layers)
        if outside:
            raise ValueError(f"gated {kind} layer {outside[0]} is not one of the {layers} layers (0..{layers - 1})")
    return sets


def _enclosing_blocks(module: str, kinds: dict[str, str]) -> list[str]:
    """The declared attention/MLP blocks that are ``module`` or contain it."""
    parts = module.split(".")
    prefixes = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return [p for p in prefixes if kinds.get(p) in BLOCK_KINDS]


def _check_same_blocks(sources: Sequence[ModelLayout], blocks: list[TransformerBlock]) -> None:
    """Every source has the blocks of the first, with the same tensors and shapes.

    Raises:
        IncompatibleModelsError: naming the first difference.
    """
    first = sources[0]
    layers = len(blocks) // 2
    for other in sources[1:]:
        their = transformer_blocks(other)
        if len(their) != len(blocks):
            raise IncompatibleModelsError(
                f"{first.source.name} has {layers} transformer layers but {other.source.name} has "
                f"{len(their) // 2}; layer similarity compares sources of one shape"
            )
        for mine, theirs in zip(blocks, their):
            where = f"layer {mine.layer}'s {mine.kind}"
            if mine.tensors != theirs.tensors:
                missing = sorted(set(mine.tensors) ^ set(theirs.tensors))
                raise IncompatibleModelsError(
                    f"{first.source.name} and {other.source.name} differ in {where}: {missing[0]} is in only one "
                    "of them; layer similarity compares sources of one architecture"
                )
            for name in mine.tensors:
                a, b = first.tensors[name].shape, other.tensors[name].shape
                if a != b:
                    raise IncompatibleModelsError(
                        f"{where}: {first.tensors[name].key} is {list(a)} in {first.source.name} but {list(b)} in "
                        f"{other.source.name}; layer similarity compares sources of one shape"
                    )


def _read(layout: ModelLayout, name: str) -> torch.Tensor:
    """The tensor of in-memory name ``name``, read by the source's own checkpoint key."""
    return layout.reader.get(layout.tensors[name].key)


def layer_similarity(sources: Sequence[ModelLayout | str]) -> LayerSimilarity:
    """Sim_attn(l) and Sim_mlp(l) of Eq. 4 (§3.3, "concat-layers + combined-FFN", Table 9).

    Reads each attention/MLP tensor of each source twice, one at a time, from
    the source's memory-mapped reader; nothing else is read. Where a source's
    block is all zeros its cosine with any other is taken as 0.

    Args:
        sources: at least two models of one architecture and shape: inspected layouts, or repo ids
            (``org/name[@revision]``) and folders, which are resolved and inspected here (weights downloaded
            as for a merge).

    Returns:
        One value per layer for attention and for MLP, in forward order of layers.

    Example:
        >>> sim = hfmerge.layer_similarity(["org/vit-mnist", "org/vit-cifar10", "org/vit-eurosat"])
        >>> hfmerge.select_gated(sim, 3)  # (attention layers, MLP layers) the gating merge would gate

    Raises:
        IncompatibleModelsError: fewer than two sources, a family without
            attention and MLP blocks, or sources whose layers or shapes differ.
        MergeNumericError: a source's weights are not finite.
    """
    if len(sources) < 2:
        raise IncompatibleModelsError(
            f"layer similarity compares sources pairwise: give at least two (got {len(sources)})"
        )
    if any(isinstance(source, (str, PathLike)) for source in sources):
        from hfmerge.adapters import inspect_reference

        sources = [inspect_reference(str(s)) if isinstance(s, (str, PathLike)) else s for s in sources]
    import torch

    first = sources[0]
    blocks = transformer_blocks(first)
    _check_same_blocks(sources, blocks)
    logger.info("layer similarity (Eq. 4) of %d sources over %d layers", len(sources), len(blocks) // 2)

    # Pass 1: ‖vec_i‖ of every block of every source, one tensor at a time.
    norms: list[list[float]] = []
    for layout in sources:
        squares = []
        for block in blocks:
            total = 0.0
            for name in block.tensors:
                total += float(torch.linalg.vector_norm(_read(layout, name), dtype=torch.float64)) ** 2
            if not math.isfinite(total):
                raise MergeNumericError(
                    f"{layout.source.name}: layer {block.layer}'s {block.kind} weights are not finite (NaN or "
                    "infinite values); check that source's checkpoint"
                )
            squares.append(total)
        norms.append([math.sqrt(s) for s in squares])

    # Pass 2: ‖Σ_i â_i‖² accumulated key by key; one running sum and one source tensor held at a time.
    values: dict[str, list[float]] = {kind: [] for kind in BLOCK_KINDS}
    for b, block in enumerate(blocks):
        squared_sum = 0.0
        for name in block.tensors:
            running = torch.zeros(first.tensors[name].shape, dtype=torch.float64)
            for i, layout in enumerate(sources):
                if norms[i][b] > 0:
                    running.add_(_read(layout, name), alpha=1.0 / norms[i][b])
            squared_sum += float(torch.linalg.vector_norm(running)) ** 2
        unit = sum(1 for i in range(len(sources)) if norms[i][b] > 0)  # Σ_i ‖â_i‖²
        values[block.kind].append((squared_sum - unit) / 2)
    n = len(sources)
    return LayerSimilarity(tuple(values["attention"]), tuple(values["mlp"]), n * (n - 1) // 2)


def select_gated(similarity: LayerSimilarity, m: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The m attention layers and the m MLP layers of lowest similarity, which the gating merge gates (§3.3).

    Ties go to the lower layer index. Each tuple is sorted by layer index.

    Raises:
        RecipeError: m is not an integer in 0..L, naming the maximum L.
    """
    layers = similarity.num_layers
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= layers:
        raise RecipeError(
            f"m={m!r} is not a number of layers to gate: the sources have {layers} transformer layers, "
            f"so m must be an integer from 0 to {layers} (the maximum, which gates every layer)"
        )

    def lowest(values: tuple[float, ...]) -> tuple[int, ...]:
        return tuple(sorted(sorted(range(layers), key=lambda l: (values[l], l))[:m]))

    return lowest(similarity.attention), lowest(similarity.mlp)


_WIDTH, _HEIGHT = 640, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 76, 16, 40, 44
_COLOURS = {"attention": "#1f77b4", "mlp": "#d62728"}
_LETTERS = {"attention": "A", "mlp": "M"}


def _n(x: float) -> str:
    """A coordinate, written the same on every platform."""
    return f"{x:.2f}"


def _step(low: float, high: float) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about four steps from ``low`` to ``high``."""
    raw = (high - low) / 4
    power = 10.0 ** math.floor(math.log10(raw))
    return next(f * power for f in (1, 2, 5, 10) if f * power >= raw)


def _ticks(low: float, high: float) -> list[float]:
    """The y ticks: ``high`` (the maximum, N(N-1)/2), round values 1, 2 or 5 times a power of ten apart
    (0 among them) not crowding its label, and ``low`` where it crowds none."""
    gap = 0.1 * (high - low)
    step = _step(low, high)
    first = math.ceil(low / step - 1e-9)
    values = [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]
    values = [v for v in values if high - v >= gap] + [high]
    if all(abs(low - v) >= gap for v in values):
        values.insert(0, low)
    return values


def similarity_svg(similarity: LayerSimilarity, gated: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    """The card's picture of Eq. 4 per layer, as the paper's Figure 3 draws it.

    x is the layer (1..L), y the similarity, zoomed to the values as Figure 3
    is (at most N(N-1)/2); attention and MLP are two lines of markers. The
    layers ``gated`` (as :func:`select_gated` returns them: attention, MLP
    indices from 0) have filled markers labelled A/M; the others are hollow.
    Markers carry ``class="marker <kind>[ gated]"`` and ``data-layer`` (1-based)
    so a reader (or a test) can find them. The text is deterministic and
    self-contained: no scripts, no external fonts or files.

    Raises:
        ValueError: a gated index is not a layer of ``similarity``.
    """
    layers = similarity.num_layers
    marked = _gated_sets(gated, layers)
    series = {"attention": similarity.attention, "mlp": similarity.mlp}
    everything = [*similarity.attention, *similarity.mlp]
    lowest, highest = min(everything, default=0.0), max(everything, default=float(similarity.pairs))
    # zoomed to the values, as Figure 3 is: sources fine-tuned from one pre-training agree to the third decimal,
    # so an axis from 0 to N(N-1)/2 would draw every layer on one line at the top
    margin = 0.1 * max(highest - lowest, 1e-4)
    high = min(float(similarity.pairs), highest + margin) if highest <= similarity.pairs else highest
    low = lowest - margin if lowest > 0 else lowest
    step = _step(low, high)  # both ends on round values, so every label is a round number
    low = math.floor(low / step + 1e-9) * step
    high = min(max(float(similarity.pairs), highest), math.ceil(high / step - 1e-9) * step)
    if high <= low:
        high = low + 1.0
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    step = plot_w / max(layers, 1)

    def x_of(layer: int) -> float:
        return _LEFT + (layer + 0.5) * step

    def y_of(value: float) -> float:
        return _TOP + plot_h * (high - value) / (high - low)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="11">',
        f"<title>Weight similarity per layer (Eq. 4): {len(gated[0])} attention and {len(gated[1])} MLP "
        "layers gated</title>",
        "<desc>" + "; ".join(
            f"{kind}: " + ", ".join(f"{v:.4f}" for v in values) for kind, values in series.items()
        ) + f" (maximum {similarity.pairs})</desc>",
        f'<rect x="0" y="0" width="{_WIDTH}" height="{_HEIGHT}" fill="#ffffff"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" stroke="#333333"/>',
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_LEFT + plot_w}" y2="{_TOP + plot_h}" stroke="#333333"/>',
    ]
    for value in _ticks(low, high):
        y = _n(y_of(value))
        out.append(f'<line x1="{_LEFT - 4}" y1="{y}" x2="{_LEFT + plot_w}" y2="{y}" stroke="#e0e0e0"/>')
        out.append(f'<text class="y-label" x="{_LEFT - 6}" y="{y}" text-anchor="end" '
                   f'dominant-baseline="middle">{value:.6g}</text>')
    if low < 0:
        out.append(f'<line x1="{_LEFT}" y1="{_n(y_of(0.0))}" x2="{_LEFT + plot_w}" y2="{_n(y_of(0.0))}" '
                   'stroke="#999999"/>')
    every = max(1, math.ceil(layers / 24))
    for layer in range(layers):
        if layer % every == 0 or layer == layers - 1:
            out.append(f'<text class="x-label" x="{_n(x_of(layer))}" y="{_TOP + plot_h + 14}" '
                       f'text-anchor="middle">{layer + 1}</text>')
    out.append(f'<text x="{_n(_LEFT + plot_w / 2)}" y="{_HEIGHT - 8}" text-anchor="middle">layer</text>')
    out.append(f'<text x="14" y="{_n(_TOP + plot_h / 2)}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_n(_TOP + plot_h / 2)})">similarity (max {similarity.pairs})</text>')
    for kind, values in series.items():
        colour = _COLOURS[kind]
        points = " ".join(f"{_n(x_of(l))},{_n(y_of(v))}" for l, v in enumerate(values))
        out.append(f'<polyline class="line {kind}" points="{points}" fill="none" stroke="{colour}" '
                   'stroke-width="1.5"/>')
        for layer, value in enumerate(values):
            is_gated = layer in marked[kind]
            fill = colour if is_gated else "#ffffff"
            cls = f"marker {kind}{' gated' if is_gated else ''}"
            x, y = x_of(layer), y_of(value)
            if kind == "attention":
                out.append(f'<circle class="{cls}" data-layer="{layer + 1}" cx="{_n(x)}" cy="{_n(y)}" r="4" '
                           f'fill="{fill}" stroke="{colour}" stroke-width="1.5"/>')
            else:
                out.append(f'<rect class="{cls}" data-layer="{layer + 1}" x="{_n(x - 4)}" y="{_n(y - 4)}" '
                           f'width="8" height="8" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>')
            if is_gated:
                offset = -8 if kind == "attention" else 16
                out.append(f'<text class="gated-label {kind}" data-layer="{layer + 1}" x="{_n(x)}" '
                           f'y="{_n(y + offset)}" text-anchor="middle" fill="{colour}">{_LETTERS[kind]}</text>')
    legend = [("attention", "attention (q, k, v, o)"), ("mlp", "MLP (both linears)")]
    x = _LEFT
    for kind, text in legend:
        colour = _COLOURS[kind]
        out.append(f'<line x1="{x}" y1="16" x2="{x + 18}" y2="16" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{x + 24}" y="16" dominant-baseline="middle">{text}</text>')
        x += 170
    out.append(f'<text x="{x}" y="16" dominant-baseline="middle">filled, A/M: gated</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
