"""Plots of results: figures rendered to inline SVG (no display, no network), over plain
series, so the simulation's report and the coordinator's dashboard draw the same figures
from their own data.

The figures every simulation report draws (ROC and calibration per site, AUROC and loss
by round, epsilon by round) are written as SVG text by :mod:`fedcare.svg_chart`; a
simulation of a few seconds would otherwise spend a fifth of them importing and laying
out matplotlib. matplotlib draws the rest (subgroup forests, the dashboard's round
timeline, a calibration sweep), imported when one is first drawn. Its figures are built
with :class:`matplotlib.figure.Figure` directly, never through pyplot, so no global
backend or figure registry is touched; text stays text in the SVG
(``svg.fonttype: none``), so axis labels and legends are readable and searchable.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from fedcare import svg_chart
from fedcare.validation.curves import Curves

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = Sequence[tuple[int, float | None]]
"""(round, value) points of one line; None leaves a gap."""

MODEL_COLOURS = {"local": "#1f77b4", "federated": "#d62728", "pooled": "#2ca02c"}
"""One colour per model, the same in every plot."""

SITE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""Distinct colours for up to ten sites (matplotlib's tab10); more sites add dashes."""


def _style() -> AbstractContextManager[None]:
    from matplotlib import rc_context

    return rc_context(
        {"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
    )


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    with _style():
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _gaps(values: Sequence[float | None]) -> list[float]:
    """Values with None as NaN, which matplotlib leaves as a gap in the line."""
    return [float("nan") if v is None else v for v in values]


def _site_style(index: int) -> tuple[str, str]:
    """(colour, matplotlib line style) of the ``index``-th site."""
    dashes = ("-", "--", ":", "-.")
    return SITE_COLOURS[index % len(SITE_COLOURS)], dashes[(index // len(SITE_COLOURS)) % 4]


def _site_line(index: int) -> tuple[str, str]:
    """(colour, SVG dash array) of the ``index``-th site: the same styles as
    :func:`_site_style`."""
    styles = svg_chart.LINE_STYLES
    return SITE_COLOURS[index % len(SITE_COLOURS)], styles[(index // len(SITE_COLOURS)) % 4]


def roc_and_calibration(site: str, curves: Mapping[str, Curves]) -> str:
    """ROC and calibration curves of each model on one site's held-out patients.

    Written as SVG directly (:mod:`fedcare.svg_chart`): a report draws one per site."""
    top = max([0.1, *(max(c.predicted + c.observed, default=0.0) for c in curves.values())])
    roc = svg_chart.Panel(
        f"ROC at {site}",
        "False positive rate (1 - specificity)",
        "True positive rate (sensitivity)",
        (0.0, 1.0),
        (0.0, 1.0),
    )
    calibration_range = (0.0, min(1.0, top * 1.1))
    calibration = svg_chart.Panel(
        f"Calibration at {site}",
        "Predicted risk (mean in bin)",
        "Observed event rate",
        calibration_range,
        calibration_range,
    )
    for label, drawn in curves.items():
        colour = MODEL_COLOURS.get(label, "#333333")
        roc.lines.append(svg_chart.Line(label, drawn.fpr, drawn.tpr, colour))
        calibration.lines.append(
            svg_chart.Line(label, drawn.predicted, drawn.observed, colour, 1.4, markers=True)
        )
    roc.lines.append(svg_chart.Line("chance", [0, 1], [0, 1], "#999999", 1.0, svg_chart.DASHED))
    calibration.lines.append(
        svg_chart.Line("perfectly calibrated", [0, 1], [0, 1], "#999999", 1.0, svg_chart.DASHED)
    )
    return svg_chart.panels_svg([roc, calibration])


class ForestRow(Protocol):
    """One subgroup's AUROC with its interval, or a suppressed cell."""

    @property
    def group(self) -> str: ...
    @property
    def suppressed(self) -> bool: ...
    @property
    def auroc(self) -> float | None: ...
    @property
    def ci_low(self) -> float | None: ...
    @property
    def ci_high(self) -> float | None: ...


def subgroup_forest(site: str, rows: Sequence[ForestRow], model: str = "Federated model") -> str:
    """``model``'s AUROC per subgroup with its 95 % interval (forest plot)."""
    from matplotlib.figure import Figure

    with _style():
        figure = Figure(figsize=(6.0, 0.35 * len(rows) + 1.2))
        axes = figure.add_subplot()
        for position, row in enumerate(reversed(rows)):
            if row.suppressed or row.auroc is None:
                axes.text(
                    0.5,
                    position,
                    "suppressed (too few patients)",
                    va="center",
                    ha="center",
                    fontsize=8,
                    color="#777777",
                )
                continue
            low = row.auroc - row.ci_low if row.ci_low is not None else 0.0
            high = row.ci_high - row.auroc if row.ci_high is not None else 0.0
            axes.errorbar(
                row.auroc,
                position,
                xerr=[[low], [high]],
                fmt="s",
                color=MODEL_COLOURS["federated"],
                ecolor="#444444",
                capsize=3,
                markersize=5,
            )
        axes.set_yticks(range(len(rows)), [r.group for r in reversed(rows)])
        axes.axvline(0.5, color="#999999", linestyle="--", linewidth=1)
        axes.set(
            xlabel="AUROC (95 % bootstrap interval)",
            title=f"{model} by subgroup at {site}",
            xlim=(0.0, 1.0),
            ylim=(-0.7, len(rows) - 0.3),
        )
        return _svg(figure)


def _round_panel(
    series: Mapping[str, Series],
    ylabel: str,
    title: str,
    intervals: Mapping[str, Sequence[tuple[int, float, float]]],
    rounds: int | None,
) -> svg_chart.Panel:
    """One line per named series by round, each its own colour and style, with error
    bars for its intervals."""
    # Lines with intervals at the same rounds are set a little apart, so their bars
    # do not hide one another.
    spread = 0.08 if intervals else 0.0
    middle = (len(series) - 1) / 2
    lines = []
    for index, (name, points) in enumerate(series.items()):
        colour, dash = _site_line(index)
        shift = (index - middle) * spread
        lines.append(
            svg_chart.Line(
                name,
                [x + shift for x, _ in points],
                [y for _, y in points],
                colour,
                1.5,
                dash,
                markers=len(points) < 12,
                bars=[(x + shift, low, high) for x, low, high in intervals.get(name, ())],
            )
        )
    last = (
        rounds if rounds is not None else max((x for p in series.values() for x, _ in p), default=1)
    )
    values = [y for points in series.values() for _, y in points]
    values += [v for band in intervals.values() for _, low, high in band for v in (low, high)]
    return svg_chart.Panel(
        title,
        "Round",
        ylabel,
        (0.5, last + 0.5),
        svg_chart.padded(values),
        lines,
        integer_x=True,
        empty_text="nothing to plot yet",
    )


def by_round(
    auroc: Mapping[str, Series],
    loss: Mapping[str, Series] | None = None,
    *,
    auroc_label: str = "Federated model's AUROC (held-out)",
    auroc_title: str = "Federated AUROC by round",
    loss_label: str = "Mean local training loss (BCE)",
    loss_title: str = "Training loss by round",
    intervals: Mapping[str, Sequence[tuple[int, float, float]]] | None = None,
    rounds: int | None = None,
) -> str:
    """AUROC per site by round (with intervals when given), and beside it a loss by
    round when one is reported; ``rounds`` fixes the x axis to the whole study."""
    panels = [_round_panel(auroc, auroc_label, auroc_title, intervals or {}, rounds)]
    if loss is not None and any(v is not None for line in loss.values() for _, v in line):
        panels.append(_round_panel(loss, loss_label, loss_title, {}, rounds))
    return svg_chart.panels_svg(panels)


def epsilon_by_round(
    spent: Mapping[str, Sequence[float]], budgets: Mapping[str, float | None]
) -> str:
    """Under DP: the epsilon each site reaches after each round, with its budget dotted."""
    lines = []
    values: list[float | None] = []
    last = max((len(v) for v in spent.values()), default=1)
    for index, (site, spent_by_round) in enumerate(spent.items()):
        if not spent_by_round:
            continue
        colour, dash = _site_line(index)
        rounds = list(range(1, len(spent_by_round) + 1))
        lines.append(svg_chart.Line(site, rounds, list(spent_by_round), colour, 1.5, dash))
        values += spent_by_round
        budget = budgets.get(site)
        if budget is not None:
            lines.append(
                svg_chart.Line(
                    f"{site} budget",
                    [0.5, last + 0.5],
                    [budget, budget],
                    colour,
                    1.0,
                    svg_chart.DOTTED,
                    in_legend=False,
                )
            )
            values.append(budget)
    panel = svg_chart.Panel(
        "Privacy spent by round (dotted: each site's budget)",
        "Round",
        "Epsilon spent (plan, at the study's delta)",
        (0.5, last + 0.5),
        svg_chart.padded(values, floor=0.0),
        lines,
        integer_x=True,
    )
    return svg_chart.panels_svg([panel])


def round_timeline(rounds: Sequence[tuple[int, float | None, int, int, bool]]) -> str:
    """Each round's duration (bars: blue closed, red failed) and how many of the
    selected sites took part: ``(round, seconds, participants, selected, applied)``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with _style():
        figure = Figure(figsize=(8.0, 3.0))
        duration = figure.add_subplot(1, 2, 1)
        taking_part = figure.add_subplot(1, 2, 2)
        numbers = [r[0] for r in rounds]
        duration.bar(
            numbers,
            [r[1] or 0.0 for r in rounds],
            color=["#1f77b4" if r[4] else "#d62728" for r in rounds],
        )
        duration.set(xlabel="Round", ylabel="Duration (s)", title="Round duration (red: failed)")
        taking_part.plot(numbers, [r[3] for r in rounds], color="#7f7f7f", label="selected")
        taking_part.plot(
            numbers, [r[2] for r in rounds], color="#2ca02c", marker="o", label="took part"
        )
        taking_part.set(
            xlabel="Round",
            ylabel="Sites",
            title="Sites per round",
            ylim=(0, max([1, *(r[3] for r in rounds)]) + 0.5),
        )
        taking_part.yaxis.set_major_locator(MaxNLocator(integer=True))
        taking_part.legend(fontsize=8)
        for axes in (duration, taking_part):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _svg(figure)


def sweep(
    x_labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    y_label: str,
    title: str,
) -> str:
    """One line per named series over labelled points (a privacy-utility sweep); every
    line its own colour and style, named in the legend; gaps where a value is None."""
    from matplotlib.figure import Figure

    with _style():
        figure = Figure(figsize=(7.0, 3.8))
        axes = figure.add_subplot()
        positions = range(len(x_labels))
        for index, (name, values) in enumerate(series.items()):
            colour, style = _site_style(index)
            axes.plot(
                positions,
                _gaps(values),
                color=colour,
                linestyle=style,
                marker="o",
                markersize=3,
                linewidth=1.5,
                label=name,
            )
        axes.set_xticks(list(positions), list(x_labels))
        axes.set(xlabel="Privacy setting (epsilon per site)", ylabel=y_label, title=title)
        if series:
            axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            axes.text(0.5, 0.5, "nothing to plot", transform=axes.transAxes, ha="center")
        return _svg(figure)
