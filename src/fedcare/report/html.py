"""Write a simulation's results as JSON and as a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from fedcare import plots
from fedcare.simulation.results import SimulationResult


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("fedcare.report", "templates"),
        autoescape=select_autoescape(["html"]),
    )
    env.filters["auroc"] = lambda v: "n/a" if v is None else f"{v:.3f}"
    env.filters["auroc_ci"] = _with_interval
    return env


def _with_interval(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} " + ("(no CI)" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]")


def _rounds_plot(result: SimulationResult, drawn_sites: set[str]) -> str:
    auroc = {
        site.name: [(r.number, r.metrics[site.name].auroc) for r in result.rounds]
        for site in result.sites
        if site.name in drawn_sites
    }
    loss = {"mean training loss": [(r.number, r.mean_train_loss) for r in result.rounds]}
    title = "Federated AUROC by round"
    if len(drawn_sites) < len(result.sites):
        title += f" ({len(drawn_sites)} largest of {len(result.sites)} sites)"
    return plots.by_round(auroc, loss, auroc_title=title)


MAX_SITE_FIGURES = 24
"""Per-site figures, and lines in the by-round figure, drawn in the report (the sites with
the most held-out patients): a figure takes a quarter of a second, a line with its legend
entry a few milliseconds, and a thousand of them say less than the table."""


def _drawn_sites(result: SimulationResult) -> set[str]:
    largest = sorted(result.sites, key=lambda s: (-s.n_test, s.name))[:MAX_SITE_FIGURES]
    return {s.name for s in largest}


def render_html(result: SimulationResult) -> str:
    """The report page; everything inline (SVG plots, no external assets)."""
    drawn_sites = _drawn_sites(result)
    site_plots = {
        site: plots.roc_and_calibration(site, drawn)
        for site, drawn in result.curves.items()
        if drawn and site in drawn_sites
    }
    forests = {
        site: plots.subgroup_forest(site, rows)
        for site, rows in result.subgroups.items()
        if rows and site in drawn_sites
    }
    return (
        _environment()
        .get_template("report.html")
        .render(
            result=result,
            rounds_plot=_rounds_plot(result, drawn_sites) if result.rounds else "",
            epsilon_plot=plots.epsilon_by_round(
                {s.name: s.epsilon_by_round for s in result.sites},
                {s.name: s.epsilon_budget for s in result.sites},
            )
            if any(s.epsilon_by_round for s in result.sites)
            else "",
            site_plots=site_plots,
            forests=forests,
            undrawn=max(0, len(result.sites) - MAX_SITE_FIGURES),
            losses_reported=any(r.mean_train_loss is not None for r in result.rounds),
            personal=any(c.personalized is not None for c in result.comparison),
        )
    )


def write_results(result: SimulationResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    html_path = out_dir / "report.html"
    # Write beside, then rename, so a crash never leaves a half-written result.
    for path, text in (
        (json_path, result.model_dump_json(indent=2)),
        (html_path, render_html(result)),
    ):
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return json_path, html_path
