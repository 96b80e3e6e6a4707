"""Line charts written as SVG text directly: the figures a simulation's report draws.

matplotlib lays out every tick label and legend entry with font metrics, about a
seventh of a second per two-panel figure and half a second to import; a report of
many sites draws dozens of figures, and a simulation of a few seconds would spend a
fifth of its time on them. These charts have fixed layouts, so nothing needs
measuring: the SVG is assembled from the data in well under a millisecond. Text
stays text (titles, axis labels, tick labels, legends), and colours are set in
``style`` attributes as matplotlib writes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

PANEL_W = 340.0
PANEL_H = 250.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 52.0, 12.0, 26.0, 40.0
_FONT = "font-family: DejaVu Sans, Arial, sans-serif"
_ROW = 12.0
"""Height of one legend entry."""
_LEGEND_INSIDE = 8
"""Legends of more lines than this go beside the panel, not over its lines."""

DASHED = "5.5,2.4"
DOTTED = "1.5,2.5"
DASH_DOT = "6,2.4,1.5,2.4"
LINE_STYLES = ("", DASHED, DOTTED, DASH_DOT)
"""SVG dash arrays: solid, dashed, dotted, dash-dot (as matplotlib draws them)."""


@dataclass(frozen=True)
class Line:
    """One series: points in data coordinates (a ``None`` value leaves a gap), drawn in
    ``colour`` with the SVG dash array ``dash`` (empty: solid), and optional error bars
    ``(x, low, high)``."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    colour: str
    width: float = 1.6
    dash: str = ""
    markers: bool = False
    bars: Sequence[tuple[float, float, float]] = ()
    in_legend: bool = True


@dataclass(frozen=True)
class Panel:
    """One pair of axes with its lines and a legend: in the lower right corner, or beside
    the panel when it has more than a few lines."""

    title: str
    xlabel: str
    ylabel: str
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    lines: list[Line] = field(default_factory=list)
    integer_x: bool = False
    """Ticks on the x axis at whole numbers only (rounds)."""
    empty_text: str = ""
    """Written in the middle of the panel when it has no lines."""

    @property
    def legend(self) -> list[Line]:
        return [line for line in self.lines if line.in_legend]

    @property
    def legend_beside(self) -> bool:
        return len(self.legend) > _LEGEND_INSIDE

    @property
    def width(self) -> float:
        return PANEL_W + (_legend_width(self.legend) + 8 if self.legend_beside else 0.0)

    @property
    def height(self) -> float:
        if not self.legend_beside:
            return PANEL_H
        return max(PANEL_H, _TOP + 6 + _legend_height(self.legend) + 4)


def ticks(high: float, low: float = 0.0, integer: bool = False) -> list[float]:
    """Round tick values from ``low`` to ``high``: 1, 2 or 5 times a power of ten apart
    (whole numbers when ``integer``), at most five intervals, never outside the range."""
    if high <= low:
        return [low]
    step = _step(high - low)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9)
    count = math.floor(high / step + 1e-9) - first + 1
    return [round((first + i) * step, 10) for i in range(count)]


def _step(span: float) -> float:
    raw = span / 5
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def padded(values: Sequence[float | None], floor: float | None = None) -> tuple[float, float]:
    """An axis range around ``values`` with a twentieth of their span on each side (as
    matplotlib pads), never below ``floor``; a tenth either side of a single value."""
    given = [v for v in values if v is not None and math.isfinite(v)]
    if not given:
        return (0.0, 1.0)
    low, high = min(given), max(given)
    pad = (high - low) / 20 if high > low else max(abs(high), 1.0) / 10
    low, high = low - pad, high + pad
    return (low if floor is None else max(floor, low), high)


def _number(value: float, step: float) -> str:
    if value == 0:
        return "0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _legend_width(lines: Sequence[Line]) -> float:
    return 30 + 5.2 * max((len(line.label) for line in lines), default=0)


def _legend_height(lines: Sequence[Line]) -> float:
    return 6 + _ROW * len(lines)


def _panel(panel: Panel, x0: float) -> list[str]:
    (xlow, xhigh), (ylow, yhigh) = panel.xlim, panel.ylim
    inner_w, inner_h = PANEL_W - _LEFT - _RIGHT, PANEL_H - _TOP - _BOTTOM
    left, top = x0 + _LEFT, _TOP

    def px(x: float) -> float:
        return left + (min(max(x, xlow), xhigh) - xlow) / (xhigh - xlow) * inner_w

    def py(y: float) -> float:
        return top + inner_h - (min(max(y, ylow), yhigh) - ylow) / (yhigh - ylow) * inner_h

    out = [
        f'<text x="{left + inner_w / 2:.1f}" y="{top - 8:.1f}" text-anchor="middle" '
        f'style="{_FONT}; font-size: 10.8px">{escape(panel.title)}</text>'
    ]
    grid = 'style="fill: none; stroke: #b0b0b0; stroke-opacity: 0.3"'
    xticks = ticks(xhigh, xlow, panel.integer_x)
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    for tick in xticks:
        gx = px(tick)
        out.append(f'<path d="M{gx:.1f} {top:.1f}V{top + inner_h:.1f}" {grid}/>')
        out.append(
            f'<text x="{gx:.1f}" y="{top + inner_h + 13:.1f}" text-anchor="middle" '
            f'style="{_FONT}; font-size: 9px">{_number(tick, xstep)}</text>'
        )
    yticks = ticks(yhigh, ylow)
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for tick in yticks:
        gy = py(tick)
        out.append(f'<path d="M{left:.1f} {gy:.1f}H{left + inner_w:.1f}" {grid}/>')
        out.append(
            f'<text x="{left - 4:.1f}" y="{gy + 3:.1f}" text-anchor="end" '
            f'style="{_FONT}; font-size: 9px">{_number(tick, ystep)}</text>'
        )
    out.append(
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{inner_w:.1f}" height="{inner_h:.1f}" '
        'style="fill: none; stroke: #000000; stroke-width: 0.8"/>'
    )
    out.append(
        f'<text x="{left + inner_w / 2:.1f}" y="{top + inner_h + 30:.1f}" text-anchor="middle" '
        f'style="{_FONT}; font-size: 9px">{escape(panel.xlabel)}</text>'
    )
    cy = top + inner_h / 2
    out.append(
        f'<text x="{x0 + 12:.1f}" y="{cy:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 12:.1f} {cy:.1f})" '
        f'style="{_FONT}; font-size: 9px">{escape(panel.ylabel)}</text>'
    )
    if not panel.lines and panel.empty_text:
        out.append(
            f'<text x="{left + inner_w / 2:.1f}" y="{cy:.1f}" text-anchor="middle" '
            f'style="{_FONT}; font-size: 9px">{escape(panel.empty_text)}</text>'
        )
    for line in panel.lines:
        out.extend(_line(line, px, py))
    if panel.legend_beside:
        out.extend(
            _legend(panel.legend, x0 + panel.width - 4 - _legend_width(panel.legend), top + 6)
        )
    elif panel.legend:
        points = [
            (px(x), py(y))
            for line in panel.lines
            for x, y in zip(line.xs, line.ys, strict=True)
            if y is not None and math.isfinite(y)
        ]
        box = (left + 4, top + 4, left + inner_w - 4, top + inner_h - 4)
        out.extend(_legend(panel.legend, *_emptiest_corner(panel.legend, box, points)))
    return out


def _emptiest_corner(
    lines: Sequence[Line],
    box: tuple[float, float, float, float],
    points: Sequence[tuple[float, float]],
) -> tuple[float, float]:
    """The top left of the legend in the corner of ``box`` that covers the fewest
    ``points`` (lower right first on a tie), as matplotlib's ``loc="best"`` places it."""
    width, height = _legend_width(lines), _legend_height(lines)
    x_left, y_top, x_right, y_bottom = box
    corners = [
        (x_right - width, y_bottom - height),
        (x_right - width, y_top),
        (x_left, y_bottom - height),
        (x_left, y_top),
    ]

    def covered(corner: tuple[float, float]) -> int:
        x, y = corner
        return sum(x <= px <= x + width and y <= py <= y + height for px, py in points)

    return min(corners, key=covered)


def _line(line: Line, px: Callable[[float], float], py: Callable[[float], float]) -> list[str]:
    """The line's segments between gaps, its markers and its error bars."""
    style = (
        f"fill: none; stroke: {line.colour}; stroke-width: {line.width}"
        + (f"; stroke-dasharray: {line.dash}" if line.dash else "")
        + "; stroke-linejoin: round"
    )
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(line.xs, line.ys, strict=True):
        if y is None or not math.isfinite(y):
            segments.append([])
        else:
            segments[-1].append((px(x), py(y)))
    out = [
        '<polyline points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
        + f'" style="{style}"/>'
        for segment in segments
        if segment
    ]
    if line.markers:
        out.extend(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" style="fill: {line.colour}; '
            f'stroke: {line.colour}"/>'
            for segment in segments
            for x, y in segment
        )
    for x, low, high in line.bars:
        bx, blow, bhigh = px(x), py(low), py(high)
        out.append(
            f'<path d="M{bx:.1f} {blow:.1f}V{bhigh:.1f}M{bx - 2:.1f} {blow:.1f}H{bx + 2:.1f}'
            f'M{bx - 2:.1f} {bhigh:.1f}H{bx + 2:.1f}" style="fill: none; '
            f'stroke: {line.colour}; stroke-opacity: 0.6"/>'
        )
    return out


def _legend(lines: Sequence[Line], x: float, y: float) -> list[str]:
    """The legend's box with its top left corner at (``x``, ``y``)."""
    width, height = _legend_width(lines), _legend_height(lines)
    out = [
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" rx="2" '
        'style="fill: #ffffff; fill-opacity: 0.8; stroke: #cccccc"/>'
    ]
    for index, line in enumerate(lines):
        row = y + 10 + _ROW * index
        dash = f"; stroke-dasharray: {line.dash}" if line.dash else ""
        out.append(
            f'<path d="M{x + 4:.1f} {row:.1f}H{x + 22:.1f}" style="fill: none; '
            f'stroke: {line.colour}; stroke-width: {line.width}{dash}"/>'
        )
        out.append(
            f'<text x="{x + 26:.1f}" y="{row + 3:.1f}" style="{_FONT}; font-size: 8px">'
            f"{escape(line.label)}</text>"
        )
    return out


def panels_svg(panels: Sequence[Panel]) -> str:
    """The panels side by side as one SVG element."""
    body: list[str] = []
    x0 = 0.0
    for panel in panels:
        body.extend(_panel(panel, x0))
        x0 += panel.width
    height = max((p.height for p in panels), default=PANEL_H)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0:.0f}pt" '
        f'height="{height:.0f}pt" viewBox="0 0 {x0:.0f} {height:.0f}" version="1.1">'
        + "".join(body)
        + "</svg>"
    )
