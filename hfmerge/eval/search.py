"""A parameter search on validation data as data: its grid, each point's scores, the choice, and how the card shows it.

The search itself (merging each grid point, scoring it) is the pipeline's
(:mod:`hfmerge.run.search`). No torch here: the card and ``hfmerge.yaml`` are
written from this record.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from hfmerge.eval.report import METRIC_NAMES

SEARCH_RESULT = "search"
"""The run record's name for the search (:class:`ParameterSearch`)."""
SEARCH_SVG = "search.svg"
"""The plot of the search's scores, written beside the card."""
VALIDATION_SPLITS = ("validation", "valid", "val")
"""The split names read as an evaluation dataset's validation split, first found first."""
HELD_OUT_FRACTION = 0.2
"""Of an evaluation dataset with no validation split, the part held out for the search (and so left out of the
card's test scores)."""


def grid_points(space: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every point of the grids' cross product, the first parameter varying slowest."""
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


def describe_search(space: dict[str, tuple[Any, ...]], tasks: int) -> list[str]:
    """What ``--dry-run`` says the search will do (one line per fact, unindented)."""
    grids = " × ".join(f"{name} ∈ {{{', '.join(_number(v) for v in grid)}}}" for name, grid in space.items())
    count = len(grid_points(space))
    return [
        f"search: {grids}: {count} merges, one at a time, each scored by its mean validation accuracy over the "
        f"{tasks} task{'s' if tasks != 1 else ''}; then the merge with the best",
        "  validation data: each --eval-data dataset's validation split where it has one, else "
        f"{HELD_OUT_FRACTION:.0%} of its images held out (seeded), which the card's test scores then leave out",
        "  the plan above is shown with each searched parameter at its default",
    ]


@dataclass
class SearchPoint:
    """One grid point: its parameter values, and its main metric on each validation task."""

    parameters: dict[str, Any]
    scores: dict[str, float]

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else 0.0


@dataclass
class ParameterSearch:
    """A finished search: the grids, every point scored in grid order, and the values chosen.

    ``validation`` names the datasets scored; ``held_out`` says, per evaluation dataset, how many of its
    images were held out of it for the search (0: it has a validation split of its own, which was read).
    """

    space: dict[str, tuple[Any, ...]]
    points: list[SearchPoint]
    metric: str
    validation: list[str]
    held_out: list[int] = field(default_factory=list)

    @property
    def best(self) -> SearchPoint:
        """The point of highest mean score; the first in grid order among equals."""
        return max(self.points, key=lambda p: p.mean)  # max keeps the first of equal keys

    @property
    def chosen(self) -> dict[str, Any]:
        return dict(self.best.parameters)

    def _metric_name(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric)

    def _grids(self) -> str:
        return "; ".join(f"`{name}` ∈ {{{', '.join(_number(v) for v in grid)}}}" for name, grid in self.space.items())

    def _validation_text(self) -> str:
        held = [(name, n) for name, n in zip(self.validation, self.held_out) if n]
        text = ", ".join(f"`{name}`" for name in self.validation)
        if held:
            text += (" (where a dataset has no validation split, images held out of the evaluation data: "
                     + ", ".join(f"{n} of `{name}`" for name, n in held)
                     + "; the evaluation below leaves them out)")
        return text

    def yaml_note(self) -> str:
        """Comment lines for ``hfmerge.yaml``: which values were chosen, from which grid, and that it will not search."""
        chosen = ", ".join(f"{name} = {_number(value)}" for name, value in self.chosen.items())
        grids = " × ".join(f"{name} ∈ {{{', '.join(_number(v) for v in grid)}}}" for name, grid in self.space.items())
        return (f"# {chosen}: chosen by hfmerge on validation data (best mean {self._metric_name()}) from the grid "
                f"{grids}.\n# The parameters below hold the chosen values: this recipe merges without searching "
                "again (README.md's 'Parameter search' has the scores).\n")

    def markdown(self, chart: str | None = None) -> str:
        """The card's section: what was searched and on what, each point's scores, the plot."""
        names = list(self.space)
        tasks = list(dict.fromkeys(task for point in self.points for task in point.scores))
        chosen = self.best
        lines = [
            "## Parameter search", "",
            f"{' and '.join(f'`{n}`' for n in names)} {'were' if len(names) > 1 else 'was'} chosen on validation "
            f"data: the merge was made once per grid point ({self._grids()}; {len(self.points)} merges), each "
            f"scored by its {self._metric_name()} on {self._validation_text()}, and the point of best mean "
            "(the first among equals) was merged: "
            + ", ".join(f"`{n}` = {_number(v)}" for n, v in chosen.parameters.items()) + ".", "",
            "| " + " | ".join([*(f"`{n}`" for n in names), *tasks, "mean", ""]) + " |",
            "|" + "---|" * (len(names) + len(tasks) + 2),
        ]
        for point in self.points:
            cells = [*(_number(point.parameters[n]) for n in names), *(f"{point.scores.get(t, 0.0):.4f}" for t in tasks),
                     f"{point.mean:.4f}", "chosen" if point is chosen else ""]
            lines.append("| " + " | ".join(cells) + " |")
        if chart:
            lines += ["", f"![Parameter search]({chart})"]
        return "\n".join(lines) + "\n"

    def svg(self) -> str:
        """The mean score against the parameter with the most points, one line per value of the others."""
        names = list(self.space)
        x_name = max(names, key=lambda n: len(self.space[n]))
        others = [n for n in names if n != x_name]
        xs = list(self.space[x_name])
        series: dict[tuple[Any, ...], dict[Any, float]] = {}
        for point in self.points:
            series.setdefault(tuple(point.parameters[n] for n in others), {})[point.parameters[x_name]] = point.mean
        left, top, width, height = 64, 24, 420, 220
        legend_top = top + height + 52
        total_width, total_height = left + width + 24, legend_top + 18 * max(len(series), 1) + 12
        low, high = min(float(x) for x in xs), max(float(x) for x in xs)
        span = (high - low) or 1.0

        def px(x: Any) -> float:
            return left + width * (float(x) - low) / span if len(xs) > 1 else left + width / 2

        def py(value: float) -> float:
            return top + height * (1 - max(0.0, min(value, 1.0)))

        out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{total_height}" '
                f'viewBox="0 0 {total_width} {total_height}" font-family="sans-serif" font-size="11">'),
               f'<rect width="{total_width}" height="{total_height}" fill="white"/>']
        for i in range(5):
            value = i / 4
            out.append(f'<line x1="{left}" x2="{left + width}" y1="{py(value):.1f}" y2="{py(value):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{py(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
        for x in xs:
            out.append(f'<text x="{px(x):.1f}" y="{top + height + 16}" text-anchor="middle">{_number(x)}</text>')
        chosen = self.best
        for s, (key, values) in enumerate(series.items()):
            colour = _COLOURS[s % len(_COLOURS)]
            points = " ".join(f"{px(x):.1f},{py(values[x]):.1f}" for x in xs if x in values)
            out.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
            for x in (x for x in xs if x in values):
                picked = all(chosen.parameters[n] == v for n, v in zip(others, key)) and chosen.parameters[x_name] == x
                out.append(f'<circle class="{"chosen" if picked else "point"}" cx="{px(x):.1f}" cy="{py(values[x]):.1f}" '
                           f'r="{6 if picked else 3}" fill="{"black" if picked else colour}">'
                           f'<title>{escape(_label(others, key, x_name, x))}: {values[x]:.4f}</title></circle>')
        out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + height}" stroke="black"/>')
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{top + height}" y2="{top + height}" stroke="black"/>')
        out.append(f'<text class="axis-label" x="{left + width / 2:.1f}" y="{top + height + 34}" '
                   f'text-anchor="middle">{escape(x_name)}</text>')
        out.append(f'<text class="axis-label" transform="translate(16 {top + height / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">mean validation {escape(self._metric_name())}</text>')
        out.append('<g class="legend">')
        for s, key in enumerate(series):
            row = legend_top + 18 * s
            text = ", ".join(f"{n} = {_number(v)}" for n, v in zip(others, key)) or "mean over the tasks"
            out.append(f'<rect x="{left}" y="{row}" width="12" height="12" fill="{_COLOURS[s % len(_COLOURS)]}"/>')
            out.append(f'<text x="{left + 18}" y="{row + 10}">{escape(text)}</text>')
        out.append("</g>")
        out.append("</svg>")
        return "\n".join(out) + "\n"


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _label(others: Sequence[str], key: tuple[Any, ...], x_name: str, x: Any) -> str:
    return ", ".join(f"{n} = {_number(v)}" for n, v in [*zip(others, key), (x_name, x)])


def _number(value: Any) -> str:
    """A grid value as written: ``0.5``, ``1`` for ``1.0``."""
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    return str(value)
