"""Line charts written as SVG text directly: for the figures a report draws once per site.

matplotlib lays out every tick label and legend entry with font metrics, about a
seventh of a second per two-panel figure; a report of many sites draws dozens of
them. These charts have fixed axes, so their layout needs no measuring: the SVG
is assembled from the data in well under a millisecond. Text stays text (titles,
axis labels, tick labels, legends), and colours are set in ``style`` attributes
as matplotlib writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PANEL_W = 340.0
PANEL_H = 250.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 52.0, 12.0, 26.0, 40.0
_FONT = "font-family: DejaVu Sans, Arial, sans-serif"


@dataclass(frozen=True)
class Line:
    """One series: points in data coordinates, drawn in ``colour``."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str
    width: float = 1.6
    dashed: bool = False
    markers: bool = False


@dataclass(frozen=True)
class Panel:
    """One pair of axes with its lines and a legend in the lower right corner."""

    title: str
    xlabel: str
    ylabel: str
    limits: tuple[float, float]
    """The same range on both axes (ROC and calibration curves are square)."""
    lines: list[Line] = field(default_factory=list)


def ticks(high: float) -> list[float]:
    """Round tick values from 0 to ``high``: 1, 2 or 5 times a power of ten apart, at most
    five intervals, never past ``high``."""
    if high <= 0:
        return [0.0]
    raw = high / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [round(i * step, 10) for i in range(int(high / step + 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value else "0"


def _panel(panel: Panel, x0: float) -> list[str]:
    low, high = panel.limits
    inner_w, inner_h = PANEL_W - _LEFT - _RIGHT, PANEL_H - _TOP - _BOTTOM
    left, top = x0 + _LEFT, _TOP

    def px(x: float) -> float:
        return left + (min(max(x, low), high) - low) / (high - low) * inner_w

    def py(y: float) -> float:
        return top + inner_h - (min(max(y, low), high) - low) / (high - low) * inner_h

    out = [
        f'<text x="{left + inner_w / 2:.1f}" y="{top - 8:.1f}" text-anchor="middle" '
        f'style="{_FONT}; font-size: 10.8px">{escape(panel.title)}</text>'
    ]
    for tick in ticks(high):
        if tick < low:
            continue
        gx, gy = px(tick), py(tick)
        out.append(
            f'<path d="M{gx:.1f} {top:.1f}V{top + inner_h:.1f}M{left:.1f} {gy:.1f}'
            f'H{left + inner_w:.1f}" style="fill: none; stroke: #b0b0b0; stroke-opacity: 0.3"/>'
        )
        out.append(
            f'<text x="{gx:.1f}" y="{top + inner_h + 13:.1f}" text-anchor="middle" '
            f'style="{_FONT}; font-size: 9px">{_number(tick)}</text>'
        )
        out.append(
            f'<text x="{left - 4:.1f}" y="{gy + 3:.1f}" text-anchor="end" '
            f'style="{_FONT}; font-size: 9px">{_number(tick)}</text>'
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
    for line in panel.lines:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(line.xs, line.ys, strict=True))
        dash = "; stroke-dasharray: 5.5,2.4" if line.dashed else ""
        out.append(
            f'<polyline points="{points}" style="fill: none; stroke: {line.colour}; '
            f'stroke-width: {line.width}{dash}; stroke-linejoin: round"/>'
        )
        if line.markers:
            out.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" style="fill: {line.colour}; '
                f'stroke: {line.colour}"/>'
                for x, y in zip(line.xs, line.ys, strict=True)
            )
    out.extend(_legend(panel.lines, left + inner_w, top + inner_h))
    return out


def _legend(lines: Sequence[Line], right: float, bottom: float) -> list[str]:
    width = 30 + 5.2 * max((len(line.label) for line in lines), default=0)
    height = 6 + 12 * len(lines)
    x, y = right - width - 4, bottom - height - 4
    out = [
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" rx="2" '
        'style="fill: #ffffff; fill-opacity: 0.8; stroke: #cccccc"/>'
    ]
    for index, line in enumerate(lines):
        row = y + 10 + 12 * index
        dash = "; stroke-dasharray: 5.5,2.4" if line.dashed else ""
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
    width = PANEL_W * len(panels)
    body = [part for i, panel in enumerate(panels) for part in _panel(panel, i * PANEL_W)]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}pt" '
        f'height="{PANEL_H:.0f}pt" viewBox="0 0 {width:.0f} {PANEL_H:.0f}" version="1.1">'
        + "".join(body)
        + "</svg>"
    )
