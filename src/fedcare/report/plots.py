"""The report's plots: matplotlib figures rendered to inline SVG (no display, no network).

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot,
so no global backend or figure registry is touched; text stays text in the SVG
(``svg.fonttype: none``), so axis labels and legends are readable and searchable.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcare.simulation.results import SimulationResult, SubgroupAuroc
from fedcare.validation.curves import Curves

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
    """(colour, line style) of the ``index``-th site."""
    dashes = ("-", "--", ":", "-.")
    return SITE_COLOURS[index % len(SITE_COLOURS)], dashes[(index // len(SITE_COLOURS)) % 4]


def roc_and_calibration(site: str, curves: Mapping[str, Curves]) -> str:
    """ROC and calibration curves of each model on one site's held-out patients."""
    with _style():
        figure = Figure(figsize=(8.0, 3.4))
        roc = figure.add_subplot(1, 2, 1)
        calibration = figure.add_subplot(1, 2, 2)
        for label, drawn in curves.items():
            colour = MODEL_COLOURS.get(label, "#333333")
            roc.plot(drawn.fpr, drawn.tpr, color=colour, label=label, linewidth=1.6)
            calibration.plot(
                drawn.predicted,
                drawn.observed,
                color=colour,
                label=label,
                marker="o",
                markersize=3,
                linewidth=1.4,
            )
        roc.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
        calibration.plot(
            [0, 1],
            [0, 1],
            color="#999999",
            linestyle="--",
            linewidth=1,
            label="perfectly calibrated",
        )
        roc.set(
            xlabel="False positive rate (1 - specificity)",
            ylabel="True positive rate (sensitivity)",
            title=f"ROC at {site}",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        top = max([0.1, *(max(c.predicted + c.observed, default=0.0) for c in curves.values())])
        calibration.set(
            xlabel="Predicted risk (mean in bin)",
            ylabel="Observed event rate",
            title=f"Calibration at {site}",
            xlim=(0, min(1.0, top * 1.1)),
            ylim=(0, min(1.0, top * 1.1)),
        )
        for axes in (roc, calibration):
            axes.legend(loc="lower right", fontsize=8)
        return _svg(figure)


def subgroup_forest(site: str, rows: Sequence[SubgroupAuroc]) -> str:
    """The federated model's AUROC per subgroup with its 95 % interval (forest plot)."""
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
            title=f"Federated model by subgroup at {site}",
            xlim=(0.0, 1.0),
            ylim=(-0.7, len(rows) - 0.3),
        )
        return _svg(figure)


def _per_round(axes: Axes, result: SimulationResult) -> None:
    rounds = [r.number for r in result.rounds]
    for index, site in enumerate(result.sites):
        values = [r.metrics[site.name].auroc for r in result.rounds]
        colour, style = _site_style(index)
        axes.plot(
            rounds,
            _gaps(values),
            label=site.name,
            linewidth=1.5,
            color=colour,
            linestyle=style,
        )
    axes.set(
        xlabel="Round",
        ylabel="Federated model's AUROC (held-out)",
        title="Federated AUROC by round",
    )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=8, loc="best")


def by_round(result: SimulationResult) -> str:
    """Federated AUROC per site by round, and the mean training loss when it is reported."""
    losses = [r.mean_train_loss for r in result.rounds]
    with _style():
        shown = any(v is not None for v in losses)
        figure = Figure(figsize=(8.0 if shown else 4.6, 3.4))
        _per_round(figure.add_subplot(1, 2 if shown else 1, 1), result)
        if shown:
            rounds = [r.number for r in result.rounds]
            second = figure.add_subplot(1, 2, 2)
            second.plot(
                rounds,
                _gaps(losses),
                color="#333333",
                label="mean training loss",
                linewidth=1.5,
            )
            second.set(
                xlabel="Round",
                ylabel="Mean local training loss (BCE)",
                title="Training loss by round",
            )
            second.legend(fontsize=8)
        return _svg(figure)


def epsilon_by_round(result: SimulationResult) -> str:
    """Under DP: the epsilon each site's plan reaches after each round, with its budget."""
    with _style():
        figure = Figure(figsize=(4.6, 3.4))
        axes = figure.add_subplot()
        for index, site in enumerate(result.sites):
            if not site.epsilon_by_round:
                continue
            colour, style = _site_style(index)
            rounds = range(1, len(site.epsilon_by_round) + 1)
            axes.plot(
                rounds,
                site.epsilon_by_round,
                color=colour,
                linestyle=style,
                label=site.name,
                linewidth=1.5,
            )
            if site.epsilon_budget is not None:
                axes.axhline(site.epsilon_budget, color=colour, linestyle=":", linewidth=1)
        axes.set(
            xlabel="Round",
            ylabel="Epsilon spent (plan, at the study's delta)",
            title="Privacy spent by round (dotted: each site's budget)",
        )
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8, loc="best")
        return _svg(figure)


def sweep(
    x_labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    y_label: str,
    title: str,
) -> str:
    """One line per named series over labelled points (a privacy-utility sweep); every
    line its own colour and style, named in the legend; gaps where a value is None."""
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
