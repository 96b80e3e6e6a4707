"""A small inline SVG line chart, so reports need no plotting stack and no network."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def line_chart(
    series: dict[str, Sequence[float | None]],
    y_label: str,
    width: int = 640,
    height: int = 280,
    x_labels: Sequence[str] | None = None,
) -> str:
    """One polyline per named series over x = 1..n; gaps where a value is None.

    The x axis reads "round 1 .. round n" unless ``x_labels`` names every point.
    """
    left, right, top, bottom = 48, 150, 12, 32
    values = [v for s in series.values() for v in s if v is not None]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    n = max(len(s) for s in series.values())
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (plot_w * i / max(n - 1, 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(y_label)} by {"point" if x_labels else "round"}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#999"/>',
        f'<text x="4" y="{top + 10}" font-size="11">{hi:.3f}</text>',
        f'<text x="4" y="{top + plot_h}" font-size="11">{lo:.3f}</text>',
    ]
    if x_labels is None:
        parts += [
            f'<text x="{left}" y="{height - 8}" font-size="11">round 1</text>',
            f'<text x="{left + plot_w - 40}" y="{height - 8}" font-size="11">round {n}</text>',
        ]
    else:
        parts += [
            f'<text x="{x(i) - 10:.1f}" y="{height - 8}" font-size="11">{escape(label)}</text>'
            for i, label in enumerate(x_labels)
        ]
    for k, (name, points) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(points) if v is not None)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
        )
        legend_y = top + 14 + 16 * k
        parts.append(
            f'<text x="{left + plot_w + 10}" y="{legend_y}" font-size="12" fill="{colour}">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
