"""The card's pictures of a cross-layer alignment (CLAFusion): the map of matched layers and the cost matrix.

Both are deterministic, self-contained SVG text (no scripts, fonts or external
files). Elements carry classes and ``data-*`` attributes, so a test (or a
reader) finds the matched pairs and the cost of every cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["AlignedSegment", "alignment_map_svg", "cost_heatmap_svg"]


@dataclass(frozen=True)
class AlignedSegment:
    """One segment's alignment: the deeper model's and the shallower model's layer labels, the map, the costs."""

    name: str
    deeper: Sequence[str]
    shallower: Sequence[str]
    mapping: Sequence[int]
    cost: Sequence[Sequence[float]] | None = None


_BOX_W, _BOX_H, _GAP, _PAD = 92, 22, 8, 14
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def alignment_map_svg(deeper: str, shallower: str, segments: Sequence[AlignedSegment]) -> str:
    """Both models' hidden layers as two rows of boxes, segment by segment; matched pairs joined by a line.

    The deeper model's row is on top. A layer of the deeper model that no layer matches is drawn
    dashed: the shallower model gets an identity layer there (adding layers, §3.2), or the deeper
    model loses it (merging layers). Lines carry ``class="match"`` and ``data-deeper`` /
    ``data-shallower`` (1-based within the segment) and ``data-segment``.
    """
    columns = max((len(s.deeper) for s in segments), default=1)
    width = _PAD * 2 + 150 + columns * (_BOX_W + _GAP)
    row = _BOX_H * 2 + 60
    height = _PAD * 2 + 20 + row * len(segments)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{_PAD}" y="{_PAD + 8}" font-size="12">Cross-layer alignment: top {escape(deeper)} '
           f'(deeper), bottom {escape(shallower)}; dashed: no partner</text>']
    for s, segment in enumerate(segments):
        top = _PAD + 24 + s * row
        bottom = top + _BOX_H + 36
        out.append(f'<text x="{_PAD}" y="{top + _BOX_H / 2 + 4}">{escape(segment.name)}</text>')
        matched = set(segment.mapping)

        def x_of(index: int) -> float:
            return _PAD + 150 + index * (_BOX_W + _GAP)

        for j, label in enumerate(segment.deeper):
            dash = "" if j in matched else ' stroke-dasharray="4 3"'
            out.append(f'<rect class="layer deeper" x="{x_of(j)}" y="{top}" width="{_BOX_W}" height="{_BOX_H}" '
                       f'rx="4" fill="#f4f4f4" stroke="#555"{dash}/>')
            out.append(f'<text x="{x_of(j) + _BOX_W / 2}" y="{top + 15}" text-anchor="middle">{escape(label)}</text>')
        for k, label in enumerate(segment.shallower):
            out.append(f'<rect class="layer shallower" x="{x_of(k)}" y="{bottom}" width="{_BOX_W}" '
                       f'height="{_BOX_H}" rx="4" fill="#f4f4f4" stroke="#555"/>')
            out.append(f'<text x="{x_of(k) + _BOX_W / 2}" y="{bottom + 15}" text-anchor="middle">{escape(label)}</text>')
        for k, j in enumerate(segment.mapping):
            colour = _COLOURS[k % len(_COLOURS)]
            out.append(f'<line class="match" data-segment="{s + 1}" data-deeper="{j + 1}" data-shallower="{k + 1}" '
                       f'x1="{x_of(k) + _BOX_W / 2}" y1="{bottom}" x2="{x_of(j) + _BOX_W / 2}" y2="{top + _BOX_H}" '
                       f'stroke="{colour}" stroke-width="2.5"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cost_heatmap_svg(segments: Sequence[AlignedSegment], *, title: str) -> str:
    """Each segment's cost matrix as a heat map (rows: the deeper model's layers; columns: the shallower's).

    Darker is cheaper (more alike); the chosen cells are outlined. Cells carry ``class="cell"`` (plus
    ``chosen``) and ``data-cost``. Segments without a cost (a single forced choice) are left out.
    """
    drawn = [s for s in segments if s.cost is not None]
    cell = 26
    heading = f"{title}: rows the deeper model's layers, columns the shallower's"
    legend = "darker: cheaper; outlined: the pairs chosen"
    width = max(_PAD * 2 + 140 + max((len(s.shallower) for s in drawn), default=1) * cell + 20,
                _PAD * 2 + 7 * len(heading))
    heights = [len(s.deeper) * cell + 64 for s in drawn]
    height = _PAD * 2 + 40 + sum(heights)
    values = [v for s in drawn for row in (s.cost or []) for v in row]
    low, high = min(values, default=0.0), max(values, default=1.0)
    span = high - low or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{_PAD}" y="{_PAD + 8}" font-size="12">{escape(heading)}</text>',
           f'<text x="{_PAD}" y="{_PAD + 24}">{legend}</text>']
    top = _PAD + 40
    for segment, block in zip(drawn, heights):
        out.append(f'<text x="{_PAD}" y="{top + 12}">{escape(segment.name)}</text>')
        for k, label in enumerate(segment.shallower):  # the shallower model's layers head the columns
            x = _PAD + 140 + k * cell + cell / 2
            out.append(f'<text x="{x}" y="{top + 40}" text-anchor="start" '
                       f'transform="rotate(-45 {x} {top + 40})">{escape(label)}</text>')
        chosen = {(j, k) for k, j in enumerate(segment.mapping)}
        for j, row in enumerate(segment.cost or []):
            y = top + 44 + j * cell
            out.append(f'<text x="{_PAD + 132}" y="{y + 17}" text-anchor="end">{escape(segment.deeper[j])}</text>')
            for k, value in enumerate(row):
                shade = int(40 + 200 * (value - low) / span)
                x = _PAD + 140 + k * cell
                mark = ' stroke="#d62728" stroke-width="2.5"' if (j, k) in chosen else ' stroke="white"'
                cls = "cell chosen" if (j, k) in chosen else "cell"
                out.append(f'<rect class="{cls}" data-cost="{value:.6g}" x="{x}" y="{y}" width="{cell}" '
                           f'height="{cell}" fill="rgb({shade},{shade},{min(255, shade + 15)})"{mark}/>')
        top += block
    out.append("</svg>")
    return "\n".join(out) + "\n"
