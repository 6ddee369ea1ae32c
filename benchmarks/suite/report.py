"""Tables, plots and claim lines of the suite, and RESULTS.md made from them.

Every number here comes from a run: a :class:`Cell` is the mean of the values
measured over seeds, with their spread (half the range, so a difference
smaller than the spread of either side is a tie). Claims are computed from the
cells, never typed in; each renders as one line ``- PASS: …`` or ``- FAIL: …``
that :func:`parse_claims` reads back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape


@dataclass(frozen=True)
class Cell:
    """A measured value: the mean over ``n`` runs (seeds) and half their range."""

    mean: float
    spread: float = 0.0
    n: int = 1

    @classmethod
    def of(cls, values: Sequence[float]) -> Cell:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("a cell needs at least one value")
        return cls(sum(values) / len(values), (max(values) - min(values)) / 2, len(values))

    def text(self, digits: int = 3) -> str:
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.spread:.{digits}f}"
        return f"{self.mean:.{digits}f}"


Value = Cell | float | int | str | None


def _text(value: Value, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, Cell):
        return value.text(digits)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    """One table of RESULTS.md: a row label, then one value per column."""

    title: str
    columns: list[str]
    rows: list[tuple[str, list[Value]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Paragraphs printed under the table: how it was made, and what was found."""
    digits: int = 3
    label_column: str = "model"

    def add(self, label: str, values: Sequence[Value]) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"{self.title}: row {label!r} has {len(values)} values for {len(self.columns)} columns")
        self.rows.append((label, list(values)))

    def cell(self, label: str, column: str) -> Value:
        """The value of row ``label`` in ``column`` (for claims)."""
        for name, values in self.rows:
            if name == label:
                return values[self.columns.index(column)]
        raise KeyError(f"{self.title}: no row {label!r}")

    def markdown(self) -> str:
        lines = ["| " + " | ".join([self.label_column, *self.columns]) + " |",
                 "|" + "---|" * (len(self.columns) + 1)]
        for label, values in self.rows:
            lines.append("| " + " | ".join([label, *(_text(v, self.digits) for v in values)]) + " |")
        return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """A paper's claim checked on the tables: ``passed`` is computed, ``detail`` shows the numbers."""

    text: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"- {'PASS' if self.passed else 'FAIL'}: {self.text} — {self.detail}"


CLAIM_LINE = re.compile(r"^- (PASS|FAIL): (.+?) — (.+)$")


def parse_claims(markdown: str) -> list[tuple[str, str]]:
    """(PASS or FAIL, claim text) for every claim line of a RESULTS.md."""
    return [(m.group(1), m.group(2)) for m in map(CLAIM_LINE.match, markdown.splitlines()) if m]


def _mean(value: Cell | float) -> tuple[float, float]:
    return (value.mean, value.spread) if isinstance(value, Cell) else (float(value), 0.0)


def at_least(text: str, a: Cell | float, b: Cell | float, names: tuple[str, str], margin: float = 0.0) -> Claim:
    """``a ≥ b − margin``; a shortfall within the larger spread of the two is a tie, and a tie passes."""
    (ma, sa), (mb, sb) = _mean(a), _mean(b)
    diff = ma - (mb - margin)
    tie = diff < 0 and -diff <= max(sa, sb)
    detail = f"{names[0]} {ma:.3f} vs {names[1]} {mb:.3f}" + (f" − {margin:g}" if margin else "")
    if tie:
        detail += f" (a tie: the shortfall {-diff:.3f} is within the spread {max(sa, sb):.3f})"
    return Claim(text, diff >= 0 or tie, detail)


def greater(text: str, a: Cell | float, b: Cell | float, names: tuple[str, str]) -> Claim:
    """``a > b`` by more than the larger spread of the two (a tie fails)."""
    (ma, sa), (mb, sb) = _mean(a), _mean(b)
    diff = ma - mb
    detail = f"{names[0]} {ma:.3f} vs {names[1]} {mb:.3f}"
    if 0 < diff <= max(sa, sb):
        detail += f" (a tie: the difference {diff:.3f} is within the spread {max(sa, sb):.3f})"
    return Claim(text, diff > max(sa, sb), detail)


@dataclass
class Section:
    """What one table module returns: its tables, plots (file name → SVG text), claims and a heading."""

    key: str
    heading: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    """What the run found where a claim failed or a number surprised (paragraphs)."""
    seconds: float = 0.0
    error: str | None = None


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939")


def line_plot_svg(title: str, x_label: str, y_label: str, series: dict[str, list[tuple[float, float]]],
                  *, width: int = 640, height: int = 380, y_range: tuple[float, float] | None = None) -> str:
    """A line plot as standalone SVG: one polyline with markers per series, a legend on the right."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError(f"{title}: nothing to plot")
    xs = sorted({x for x, _ in points})
    y_lo, y_hi = y_range or (min(y for _, y in points), max(y for _, y in points))
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.05, y_hi + 0.05
    left, right, top, bottom = 56, 205, 34, 48
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        if len(xs) == 1:
            return left + plot_w / 2
        return left + (x - xs[0]) / (xs[-1] - xs[0]) * plot_w

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="12" font-weight="bold" textLength="{min(len(title) * 6.6, width - left - 8):.0f}" '
           f'lengthAdjust="spacingAndGlyphs">{escape(title)}</text>']
    step = _nice_step(y_hi - y_lo)
    power = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -power + (1 if round(step / 10 ** power, 6) == 2.5 else 0))  # 0.25 needs one more digit
    tick = math.ceil(y_lo / step) * step
    while tick <= y_hi + 1e-9:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:.{decimals}f}</text>')
        tick += step
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#333"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        values = sorted(values)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in values]
        ly = top + 6 + 16 * i
        out.append(f'<line x1="{width - right + 12}" x2="{width - right + 30}" y1="{ly}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{width - right + 36}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice_step(span: float) -> float:
    raw = span / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
