"""``fedcare demo`` and ``fedcare simulate``: a federation on one machine."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fedcare.cli.common import console, errors, fail, guarded, progress_bar
from fedcare.study import Strategy, Study, Weighting, load_study

if TYPE_CHECKING:
    # Imported where used: they pull in scikit-learn and SciPy, which every command
    # would otherwise pay for at start-up.
    from fedcare.simulation.results import ReleaseRecord, SimulationResult, SiteComparison


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "n/a"
    # Two lines keep the table inside 80 columns.
    interval = "no CI" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"
    return f"{value:.3f}\n{interval}"


FULL_TABLE_SITES = 30
"""Above this many sites the terminal shows a summary of each per-site table and the
first warnings; ``report.html`` and ``results.json`` keep every site's row."""


def print_comparison(result: SimulationResult) -> None:
    """The per-site table: local vs federated vs pooled, each AUROC with its 95 %
    bootstrap interval and the held-out set's size; then cross-site generalisation.
    With more than :data:`FULL_TABLE_SITES` sites, a summary of each column instead."""
    many = len(result.comparison) > FULL_TABLE_SITES
    if many:
        _print_site_summary(result)
    else:
        _print_site_tables(result)
    if result.privacy is not None:
        dp = result.privacy
        target = "noise as declared" if dp.epsilon is None else f"epsilon {dp.epsilon:g}"
        console.print(
            f"DP-SGD: {target} per site for the study, delta {dp.delta}, "
            f"clipping {dp.max_grad_norm:g}, {dp.accountant} accountant",
            style="dim",
        )
    shown = result.warnings[:FULL_TABLE_SITES] if many else result.warnings
    for warning in shown:
        console.print(f"[yellow]warning[/] {warning}")
    if len(shown) < len(result.warnings):
        console.print(
            f"[yellow]warning[/] and {len(result.warnings) - len(shown)} more: every warning "
            "is in results.json"
        )
    spends = [s for s in result.sites if s.epsilon_budget is not None]
    if spends:
        privacy = Table(title="Privacy budget at each site (its own ledger)")
        for header in ("site", "epsilon spent", "budget", "left", "noise multiplier"):
            privacy.add_column(header, justify="left" if header == "site" else "right")
        if many:
            # The sites closest to their budget.
            spent = sorted(spends, key=lambda s: (s.epsilon_budget or 0) - (s.epsilon_spent or 0))
            shown_spends = spent[:FULL_TABLE_SITES]
        else:
            shown_spends = spends
        for site in shown_spends:
            assert site.epsilon_spent is not None
            assert site.epsilon_budget is not None
            privacy.add_row(
                site.name,
                f"{site.epsilon_spent:.3f}",
                f"{site.epsilon_budget:g}",
                f"{site.epsilon_budget - site.epsilon_spent:.3f}",
                _fmt(site.noise_multiplier),
            )
        console.print(privacy)
        if many and len(spends) > FULL_TABLE_SITES:
            console.print(
                f"the {FULL_TABLE_SITES} of {len(spends)} sites with the least budget left; "
                "every site's is in results.json",
                style="dim",
            )
        console.print(
            "federated model trained with DP-SGD at every site (delta per the site's budget); "
            "local and pooled baselines are trained without DP.",
            style="dim",
        )


def _print_site_tables(result: SimulationResult) -> None:
    table = Table(title=f"AUROC on each site's held-out data ({result.study_name})")
    personal = any(row.personalized is not None for row in result.comparison)
    headers = ["site", "n", "pos.", "local", "federated", "pooled"]
    if personal:
        headers.append("personal")
    for header in headers:
        table.add_column(header, justify="left" if header == "site" else "right")
    for row in result.comparison:
        cells = [
            row.site,
            str(row.n),
            str(row.positives),
            _with_ci(row.local, row.local_ci),
            _with_ci(row.federated, row.federated_ci),
            _with_ci(row.pooled, row.pooled_ci),
        ]
        if personal:
            cell = _with_ci(row.personalized, row.personalized_ci)
            cells.append(cell + ("\nheld" if row.personal_released is False else ""))
        table.add_row(*cells)
    console.print(table)
    console.print(
        "n, pos.: held-out rows and positives; under each AUROC its 95 % bootstrap interval.",
        style="dim",
    )
    if personal:
        console.print(
            "personal: each site's own model (it never leaves the site), released there if "
            "it passes the study's and the site's gates; 'held' if not:",
            style="dim",
        )
        for row in result.comparison:
            for reason in row.personal_reasons:
                console.print(f"  {row.site}: {reason}", style="dim", markup=False)
    cross = Table(title="Cross-site generalisation (mean AUROC on the other sites)")
    for header in ("site", "local model", "federated model"):
        cross.add_column(header, justify="left" if header == "site" else "right")
    for row in result.comparison:
        cross.add_row(row.site, _fmt(row.local_on_other_sites), _fmt(row.federated_on_other_sites))
    console.print(cross)


def _print_site_summary(result: SimulationResult) -> None:
    rows = result.comparison
    table = Table(title=f"AUROC on the held-out data of {len(rows)} sites ({result.study_name})")
    for header in ("model", "sites", "median", "lowest", "highest"):
        table.add_column(header, justify="left" if header == "model" else "right")
    columns: list[tuple[str, Callable[[SiteComparison], float | None]]] = [
        ("local", lambda r: r.local),
        ("federated", lambda r: r.federated),
        ("pooled", lambda r: r.pooled),
        ("personal", lambda r: r.personalized),
        ("local, other sites", lambda r: r.local_on_other_sites),
        ("federated, other sites", lambda r: r.federated_on_other_sites),
    ]
    for name, value in columns:
        scored = sorted(
            ((v, row.site) for row in rows if (v := value(row)) is not None),
            key=lambda pair: pair[0],
        )
        if not scored:
            continue
        low, high = scored[0], scored[-1]
        table.add_row(
            name,
            str(len(scored)),
            f"{statistics.median(v for v, _ in scored):.3f}",
            f"{low[0]:.3f} {low[1]}",
            f"{high[0]:.3f} {high[1]}",
        )
    console.print(table)
    console.print(
        "other sites: a site's model scored on the other sites' data (mean AUROC). Every "
        "site's row, with its interval, is in report.html and results.json.",
        style="dim",
    )


def print_releases(releases: list[ReleaseRecord]) -> None:
    """The candidate releases and how each was settled, with the reasons."""
    if not releases:
        return
    table = Table(title="Releases (every site validates each candidate on its own patients)")
    for header in ("release", "round", "parent", "state", "why"):
        table.add_column(header, overflow="fold")
    for release in releases:
        table.add_row(
            str(release.id),
            str(release.round),
            "-" if release.parent is None else str(release.parent),
            release.state,
            release.reason,
            style="green" if release.state == "promoted" else "red",
        )
    console.print(table)


def _override(
    study: Study,
    rounds: int | None = None,
    strategy: Strategy | None = None,
    weighting: Weighting | None = None,
    cap: float | None = None,
    seed: int | None = None,
    server_lr: float | None = None,
    proximal_mu: float | None = None,
) -> Study:
    """The study with command-line overrides applied (its hash changes accordingly)."""
    aggregation = study.canonical()["aggregation"]
    if strategy is not None and strategy is not study.aggregation.strategy:
        aggregation["strategy"] = strategy.value
        # A learning rate chosen for another strategy is meaningless for this one.
        aggregation["server_learning_rate"] = None
    if server_lr is not None:
        aggregation["server_learning_rate"] = server_lr
    if weighting is not None:
        aggregation["weighting"] = weighting.value
        aggregation["cap"] = cap if weighting is Weighting.CAPPED else None
    changes: dict[str, object] = {"aggregation": aggregation}
    if proximal_mu is not None:
        changes["training"] = {**study.canonical()["training"], "proximal_mu": proximal_mu}
    if rounds is not None:
        changes["rounds"] = {**study.canonical()["rounds"], "count": rounds}
    if seed is not None:
        changes["seed"] = seed
    return study.replace(**changes)


def _simulate(
    study: Study,
    sites_file: Path | None,
    out: Path | None,
    baselines: bool,
    scale: float,
    data_seed: int,
    pace: Path | None = None,
) -> SimulationResult:
    from fedcare.report import write_results
    from fedcare.simulation.runner import SimulationOptions, run_simulation
    from fedcare.simulation.sites import (
        builtin_rules,
        builtin_sites,
        rules_from_file,
        sites_from_file,
    )

    started = time.perf_counter()
    if sites_file is None:
        sites, descriptions = builtin_sites(study, seed=data_seed, scale=scale)
        rules = builtin_rules([s.name for s in sites], study)
    else:
        sites, descriptions = sites_from_file(sites_file, study)
        rules = rules_from_file(sites_file)
    pacing = None
    if pace is not None:
        from fedcare.simulation.pace import load_pacing

        pacing = load_pacing(pace, [s.name for s in sites])
    errors.print(
        f"study [bold]{study.name}[/] ({study.content_hash[:12]}), {len(sites)} sites, "
        f"{sum(s.n_train for s in sites)} training rows, {study.rounds.count} rounds",
        highlight=False,
    )
    registry_dir = None if out is None else out / "registry"
    if registry_dir is not None and registry_dir.exists():
        # A simulation's releases are its own: a reused --out starts a fresh registry
        # rather than numbering this run's releases after the last run's.
        shutil.rmtree(registry_dir)
        errors.print(f"replacing the previous run's registry in {registry_dir}", highlight=False)
    with progress_bar() as progress:
        options = SimulationOptions(
            baselines,
            descriptions,
            site_rules=rules,
            registry_dir=registry_dir,
            pacing=pacing,
        )
        result = run_simulation(study, sites, options, progress=progress)
    result = result.model_copy(update={"wall_s": time.perf_counter() - started})
    if out is not None:
        from fedcare.releases.bundle import save_site_preprocessing

        # What each site fitted, where its agent would keep it, for fedcare predict.
        for site in sites:
            save_site_preprocessing(
                out / "sites" / site.name, site.name, study.content_hash, site.preprocessor
            )
        json_path, html_path = write_results(result, out)
        errors.print(f"wrote {json_path} and {html_path}", highlight=False)
    return result


def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.json and report.html.")] = Path(
        "fedcare-demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed for the synthetic hospitals.")] = 2026,
    scale: Annotated[float, typer.Option(min=0.01, max=10.0, help="Hospital size factor.")] = 1.0,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override the study's rounds.")] = None,
    network: Annotated[
        bool,
        typer.Option(
            "--network",
            help="Run a coordinator and one process per hospital on loopback over mutual TLS, "
            "and compare the model with the in-process simulation.",
        ),
    ] = False,
    drift: Annotated[
        bool,
        typer.Option(
            "--drift",
            help="Train, freeze the model at one hospital as a promoted release, and run "
            "the drift monitor on later admissions for every built-in drift scenario.",
        ),
    ] = False,
    drift_site: Annotated[
        str, typer.Option(help="The hospital --drift monitors.")
    ] = "ashby-general",
    imaging: Annotated[
        bool,
        typer.Option(
            "--imaging",
            help="The built-in imaging study instead: lesion detection on 64x64 scans from "
            "five hospitals' image folders, a CNN with FedBN (with --network too).",
        ),
    ] = False,
    export: Annotated[
        tuple[str, Path] | None,
        typer.Option(
            "--export",
            metavar="fhir|omop DIR",
            help="Write the hospitals as FHIR R4 bulk exports (NDJSON) or OMOP CDM SQLite "
            "databases under DIR, with their mappings, a sites.yaml and the study; train nothing.",
        ),
    ] = None,
) -> None:
    """Train the built-in early-warning study across five synthetic hospitals, with baselines."""
    from fedcare.data import demo_study, imaging_study

    if export is not None:
        _export_demo(export[0], export[1], seed, scale)
        return

    builtin = imaging_study if imaging else demo_study
    if drift:
        if imaging:
            fail("--drift monitors tabular features; the imaging study has none")
        _drift_demo(_override(demo_study(), rounds=rounds), out / "drift", seed, scale, drift_site)
        return
    if network:
        _network_demo(_override(builtin(), rounds=rounds), out / "network", seed, scale)
        return

    def run() -> SimulationResult:
        study = _override(builtin(), rounds=rounds)
        return _simulate(study, None, out, baselines=True, scale=scale, data_seed=seed)

    result = guarded(run)
    print_comparison(result)
    print_releases(result.releases)
    console.print(f"done in {result.wall_s:.1f} s; open {out / 'report.html'}")


def _export_demo(kind: str, folder: Path, seed: int, scale: float) -> None:

    from fedcare.data import demo_study_path
    from fedcare.data.exports import write_exports
    from fedcare.data.synthetic import generate_cohorts

    if kind not in ("fhir", "omop"):
        fail(f"--export: '{kind}' is not an export kind; use fhir or omop")
    with progress_bar() as progress:
        sites = guarded(
            lambda: write_exports(generate_cohorts(seed, scale), kind, folder, progress)
        )
    study = folder / "study.yaml"
    shutil.copyfile(demo_study_path(), study)
    console.print(f"wrote the five hospitals as {kind} under {folder}", markup=False)
    console.print(f"check:    fedcare data check --sites {sites} --study {study}", markup=False)
    console.print(f"simulate: fedcare simulate --sites {sites} --study {study}", markup=False)


def _drift_demo(study: Study, folder: Path, seed: int, scale: float, hospital: str) -> None:
    from fedcare.data.drift import hospital_profile
    from fedcare.simulation.drift_demo import freeze_reference, monitor_scenarios
    from fedcare.simulation.runner import run_federation
    from fedcare.simulation.sites import builtin_sites

    guarded(lambda: hospital_profile(hospital))
    sites, _ = guarded(lambda: builtin_sites(study, seed, scale))
    data = next(s for s in sites if s.name == hospital)
    with progress_bar() as progress:
        run = run_federation(study, sites, progress)
    store = freeze_reference(study, data, run.params, len(run.rounds), folder / "state")
    outcomes = monitor_scenarios(study, store, hospital, 1000, seed, folder)
    table = Table(title=f"Drift monitor at {hospital}: 1,000 later admissions per scenario")
    for column in ("scenario", "strength", "verdict", "flagged tests", "AUROC est.", "measured"):
        table.add_column(
            column, justify="left" if column in {"scenario", "flagged tests"} else "right"
        )
    for outcome in outcomes:
        checks = outcome.result.checks
        flagged = [f"{c.name} ({c.kind.value})" for c in checks.checks if c.flagged]
        estimates = checks.estimates
        table.add_row(
            outcome.scenario.value,
            f"{outcome.strength:g}",
            "[bold red]drift[/]" if checks.drift else "[green]stable[/]",
            ", ".join(flagged) or "—",
            f"{estimates.estimated_auroc:.3f}" if estimates.estimated_auroc is not None else "—",
            f"{estimates.measured_auroc:.3f}" if estimates.measured_auroc is not None else "—",
        )
    console.print(table)
    console.print(f"pages: {folder}/<scenario>/monitor-*.html", markup=False)


def _network_demo(study: Study, folder: Path, seed: int, scale: float) -> None:
    from fedcare.simulation.loopback import LoopbackError, run_network_demo

    errors.print(
        f"network demo: study {study.name} ({study.content_hash[:12]}) in {folder}; "
        "coordinator and sites run as separate processes on 127.0.0.1 with mutual TLS",
        highlight=False,
    )
    with progress_bar() as progress:
        try:
            result = guarded(
                lambda: run_network_demo(
                    folder,
                    study,
                    seed,
                    scale,
                    progress,
                    on_started=lambda url: errors.print(f"coordinator serving at {url}"),
                )
            )
        except LoopbackError as exc:
            fail(str(exc), code=1)
    table = Table(title="Network demo")
    table.add_column("process")
    table.add_column("peak RSS (MB)", justify="right")
    for proc in result.processes:
        table.add_row(proc.name, f"{proc.peak_rss_mb:.0f}")
    console.print(table)
    steady = sorted(result.coordinator_overhead_s[1:]) or result.coordinator_overhead_s
    console.print(
        f"{result.rounds} rounds over the network in {result.network_wall_s:.1f} s "
        f"(process start-up included); in-process: {result.in_process_wall_s:.1f} s\n"
        f"coordinator overhead per round (round time not spent training, median of rounds 2+): "
        f"{steady[len(steady) // 2]:.3f} s\n"
        + (
            "the model is not compared with the in-process simulation: under DP every "
            "site's noise is secret and fresh"
            if result.max_abs_diff is None
            else "largest parameter difference from the in-process simulation: "
            f"{result.max_abs_diff:.2e}"
        )
    )
    (folder / "network-result.json").write_text(result.model_dump_json(indent=2))
    print_releases(_coordinator_releases(folder, study))


def _coordinator_releases(folder: Path, study: Study) -> list[ReleaseRecord]:
    """The release history the demo's coordinator recorded."""
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.releases.registry import ReleaseRegistry

    settings = load_config(folder / "coordinator.yaml", CoordinatorConfig)
    registry = ReleaseRegistry.open(settings.database, settings.storage / "releases")
    try:
        from fedcare.simulation.results import ReleaseRecord

        return [ReleaseRecord.from_release(r) for r in registry.releases(study.content_hash)]
    finally:
        registry.close()


def simulate(
    study_file: Annotated[
        Path | None, typer.Option("--study", help="study.yaml (default: the demo study).")
    ] = None,
    sites_file: Annotated[
        Path | None,
        typer.Option(
            "--sites",
            help="sites.yaml listing data and mapping per site (default: the built-in hospitals).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and report.html.")
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also train local-only and pooled models.")
    ] = True,
    strategy: Annotated[Strategy | None, typer.Option(help="Override the strategy.")] = None,
    weighting: Annotated[Weighting | None, typer.Option(help="Override client weighting.")] = None,
    cap: Annotated[
        float | None, typer.Option(help="Largest weight share with --weighting capped.")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Override the number of rounds.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the study seed.")] = None,
    server_lr: Annotated[
        float | None, typer.Option(min=0.0, help="Override the server learning rate.")
    ] = None,
    proximal_mu: Annotated[
        float | None, typer.Option(min=0.0, help="FedProx proximal term mu (0 = off).")
    ] = None,
    data_seed: Annotated[int, typer.Option(help="Seed for the built-in hospitals.")] = 2026,
    scale: Annotated[float, typer.Option(min=0.01, max=10.0, help="Built-in size factor.")] = 1.0,
    pace: Annotated[
        Path | None,
        typer.Option(
            help="YAML with each site's speed, latency_s and availability (virtual clock)."
        ),
    ] = None,
) -> None:
    """Run a study's federation on one machine, through the coordinator's round logic."""

    def run() -> SimulationResult:
        from fedcare.data import demo_study

        base = load_study(study_file) if study_file else demo_study()
        study = _override(
            base,
            rounds,
            strategy,
            weighting,
            cap,
            seed,
            server_lr=server_lr,
            proximal_mu=proximal_mu,
        )
        return _simulate(study, sites_file, out, baselines, scale, data_seed, pace)

    result = guarded(run)
    print_comparison(result)
    print_releases(result.releases)
