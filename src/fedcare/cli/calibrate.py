"""``fedcare calibrate``: the privacy-utility sweep, as a table, a plot and JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcare.cli.common import (
    ProcessesOption,
    RayOption,
    check_placement,
    console,
    errors,
    fail,
    guarded,
    progress_bar,
)
from fedcare.study import AccountantKind


def calibrate(
    study_file: Annotated[
        Path | None, typer.Option("--study", help="study.yaml (default: the demo study).")
    ] = None,
    sites_file: Annotated[
        Path | None,
        typer.Option(
            "--sites", help="sites.yaml listing data and mapping per site (your own data)."
        ),
    ] = None,
    heart_disease: Annotated[
        Path | None,
        typer.Option("--heart-disease", help="Run on Fed-Heart-Disease from this folder instead."),
    ] = None,
    epsilons: Annotated[
        list[float] | None,
        typer.Option("--epsilon", help="Epsilon per site (repeat; default 0.5 1 2 4 8)."),
    ] = None,
    delta: Annotated[float, typer.Option(min=0.0, max=1.0, help="DP delta per site.")] = 1e-5,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per grid point.")] = 3,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Operating point (default: the study's validation threshold, or else the "
            "training positive rate).",
        ),
    ] = None,
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help="Clipping norm C.")] = 1.0,
    accountant: Annotated[AccountantKind, typer.Option()] = AccountantKind.RDP,
    scale: Annotated[
        float, typer.Option(min=0.05, max=4.0, help="Size of the built-in cohorts.")
    ] = 1.0,
    out: Annotated[
        Path, typer.Option(help="Folder for calibration.json and calibration.html.")
    ] = Path("calibration"),
    processes: ProcessesOption = None,
    ray: RayOption = None,
) -> None:
    """Privacy-utility sweep: AUROC overall and per site, sensitivity per subgroup, per epsilon."""
    from fedcare.simulation.calibrate import DEFAULT_EPSILONS, CalibrationResult
    from fedcare.simulation.calibrate import calibrate as sweep

    if heart_disease is not None and (study_file is not None or sites_file is not None):
        fail("give --study/--sites or --heart-disease, not both")
    check_placement(processes, ray)

    def run() -> CalibrationResult:
        from fedcare.data import demo_study
        from fedcare.data.heart_disease import dp_safe, heart_disease_study, load_heart_disease
        from fedcare.schema.mapping import MappingError
        from fedcare.simulation.sites import builtin_sites, sites_from_file
        from fedcare.study import load_study

        if heart_disease is not None:
            # DP-safe preprocessing at every point of the sweep, no-DP included.
            study = dp_safe(heart_disease_study())
            sites = load_heart_disease(heart_disease, study)
        else:
            study = load_study(study_file) if study_file is not None else demo_study()
            if sites_file is not None:
                sites, _ = sites_from_file(sites_file, study)
            else:
                try:
                    sites, _ = builtin_sites(study, seed=2026, scale=scale)
                except MappingError as exc:
                    raise MappingError(
                        f"{exc}\nthe built-in hospitals fit only the demo study's schema: "
                        "give --sites sites.yaml with your own sites"
                    ) from exc
        with progress_bar() as progress:
            return sweep(
                study,
                sites,
                epsilons or DEFAULT_EPSILONS,
                delta=delta,
                n_seeds=seeds,
                threshold=threshold,
                max_grad_norm=max_grad_norm,
                accountant=accountant,
                progress=progress,
                processes=processes,
                ray_address=ray,
            )

    result = guarded(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(result.model_dump_json(indent=2) + "\n", "utf-8")
    (out / "calibration.html").write_text(render_html(result), "utf-8")
    print_tables(result)
    errors.print(f"wrote {out / 'calibration.json'} and {out / 'calibration.html'}")


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" + (f" ±{sd:.3f}" if sd is not None else "")


def print_tables(result: object) -> None:
    """The AUROC table and the sensitivity table, one row per grid point."""
    from rich.table import Table

    from fedcare.simulation.calibrate import CalibrationResult

    assert isinstance(result, CalibrationResult)
    sites = list(result.points[0].auroc_by_site)
    auroc = Table(
        title=f"{result.study_name}: AUROC by epsilon per site (delta {result.delta:g}, "
        f"{result.accountant}; mean ± sd over {len(result.seeds)} seeds)"
    )
    for header in ("epsilon", "all sites", *sites):
        auroc.add_column(header, justify="right")
    for point in result.points:
        auroc.add_row(
            point.label,
            _cell(point.auroc.mean, point.auroc.sd),
            *(_cell(point.auroc_by_site[s].mean, point.auroc_by_site[s].sd) for s in sites),
        )
    console.print(auroc)
    groups = list(dict.fromkeys(g for p in result.points for g in p.sensitivity))
    if groups:
        table = Table(
            title=f"Sensitivity at threshold {result.threshold:.3f} by subgroup "
            f"(cells under {result.min_cohort} patients: —)"
        )
        for header in ("epsilon", *groups):
            table.add_column(header, justify="right")
        for point in result.points:
            cells = (point.sensitivity.get(g) for g in groups)
            table.add_row(point.label, *(_cell(c.mean, c.sd) if c else "—" for c in cells))
        console.print(table)
    if result.unavailable_subgroups:
        console.print("not in the data: " + ", ".join(result.unavailable_subgroups), style="dim")


def render_html(result: object) -> str:
    """A page with the two plots (inline SVG) and the settings."""
    from collections.abc import Sequence
    from html import escape

    from fedcare.plots import sweep
    from fedcare.simulation.calibrate import CalibrationResult

    assert isinstance(result, CalibrationResult)
    labels = [p.label for p in result.points]
    auroc: dict[str, Sequence[float | None]] = {"all sites": [p.auroc.mean for p in result.points]}
    for site in result.points[0].auroc_by_site:
        auroc[site] = [p.auroc_by_site[site].mean for p in result.points]
    groups = list(dict.fromkeys(g for p in result.points for g in p.sensitivity))
    sensitivity: dict[str, Sequence[float | None]] = {
        g: [p.sensitivity[g].mean if g in p.sensitivity else None for p in result.points]
        for g in groups
    }
    return (
        "<!doctype html><meta charset='utf-8'>"
        f"<title>{escape(result.study_name)}: privacy and utility</title>"
        f"<h1>{escape(result.study_name)}: privacy and utility</h1>"
        f"<p>epsilon per site for the whole study, delta {result.delta:g}, "
        f"{escape(result.accountant)} accountant, clipping {result.max_grad_norm:g}; "
        f"mean over seeds {result.seeds}.</p>"
        "<h2>AUROC</h2>"
        + sweep(labels, auroc, "AUROC (mean over seeds)", "AUROC by privacy setting")
        + f"<h2>Sensitivity at threshold {result.threshold:.3f}</h2>"
        + sweep(labels, sensitivity, "Sensitivity (mean over seeds)", "Sensitivity by subgroup")
    )
