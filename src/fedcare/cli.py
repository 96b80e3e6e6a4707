"""The ``fedcare`` command line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedcare.schema.mapping import DataValidationError, MappingError
from fedcare.schema.readers import DataFileError
from fedcare.simulation.results import SimulationResult
from fedcare.site.dataset import SiteDataError
from fedcare.study import Strategy, Study, StudyError, Weighting, load_study

app = typer.Typer(
    help="fedcare: federated learning between hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
study_app = typer.Typer(help="Inspect and check study files.", no_args_is_help=True)
data_app = typer.Typer(help="Check a site's data against a study.", no_args_is_help=True)


@app.callback()
def _main(
    threads: Annotated[
        int, typer.Option(min=1, envvar="FEDCARE_THREADS", help="CPU threads for PyTorch.")
    ] = 1,
) -> None:
    """fedcare: federated learning between hospitals."""
    import torch

    # Site models are small: with several threads, per-batch synchronisation
    # costs more than the arithmetic (measured 4x slower on 2 cores).
    torch.set_num_threads(threads)


app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")

console = Console()
errors = Console(stderr=True)

T = TypeVar("T")

# Errors a user can fix: shown as one clear message, exit status 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    StudyError,
    MappingError,
    DataValidationError,
    DataFileError,
    SiteDataError,
)


def _user_errors() -> tuple[type[Exception], ...]:
    from fedcare.simulation.sites import SitesFileError

    return (*USER_ERRORS, SitesFileError)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error becomes a message and exit status 2."""
    try:
        return fn()
    except _user_errors() as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=errors, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_comparison(result: SimulationResult) -> None:
    """The per-site table: local vs federated vs pooled, and cross-site generalisation."""
    table = Table(title=f"AUROC on each site's held-out data ({result.study_name})")
    for header in ("site", "local", "federated", "pooled", "local→others", "federated→others"):
        table.add_column(header, justify="left" if header == "site" else "right")
    for row in result.comparison:
        table.add_row(
            row.site,
            _fmt(row.local),
            _fmt(row.federated),
            _fmt(row.pooled),
            _fmt(row.local_on_other_sites),
            _fmt(row.federated_on_other_sites),
        )
    console.print(table)
    console.print(
        "local→others: each site's local model scored on the other sites' held-out data; "
        "federated→others: the federated model on the same data (mean AUROC).",
        style="dim",
    )


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
    try:
        return study.replace(**changes)
    except ValueError as exc:
        raise StudyError(f"the command-line overrides do not validate: {exc}") from exc


def _simulate(
    study: Study,
    sites_file: Path | None,
    out: Path | None,
    baselines: bool,
    scale: float,
    data_seed: int,
) -> SimulationResult:
    from fedcare.report import write_results
    from fedcare.simulation.runner import SimulationOptions, run_simulation
    from fedcare.simulation.sites import builtin_sites, sites_from_file

    started = time.perf_counter()
    if sites_file is None:
        sites, descriptions = builtin_sites(study, seed=data_seed, scale=scale)
    else:
        sites, descriptions = sites_from_file(sites_file, study)
    errors.print(
        f"study [bold]{study.name}[/] ({study.content_hash[:12]}), {len(sites)} sites, "
        f"{sum(s.n_train for s in sites)} training rows, {study.rounds.count} rounds",
        highlight=False,
    )
    with _progress() as progress:
        result = run_simulation(
            study, sites, SimulationOptions(baselines, descriptions), progress=progress
        )
    result = result.model_copy(update={"wall_s": time.perf_counter() - started})
    if out is not None:
        json_path, html_path = write_results(result, out)
        errors.print(f"wrote {json_path} and {html_path}", highlight=False)
    return result


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.json and report.html.")] = Path(
        "fedcare-demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed for the synthetic hospitals.")] = 2026,
    scale: Annotated[float, typer.Option(min=0.01, max=10.0, help="Hospital size factor.")] = 1.0,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override the study's rounds.")] = None,
) -> None:
    """Train the built-in early-warning study across five synthetic hospitals, with baselines."""
    from fedcare.data import demo_study

    def run() -> SimulationResult:
        study = _override(demo_study(), rounds=rounds)
        return _simulate(study, None, out, baselines=True, scale=scale, data_seed=seed)

    result = guarded(run)
    print_comparison(result)
    console.print(f"done in {result.wall_s:.1f} s; open {out / 'report.html'}")


@app.command()
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
        return _simulate(study, sites_file, out, baselines, scale, data_seed)

    result = guarded(run)
    print_comparison(result)


@study_app.command("check")
def study_check(path: Path) -> None:
    """Validate a study file and print its content hash."""
    study = guarded(lambda: load_study(path))
    schema = study.feature_schema
    console.print(f"[green]valid[/] study '{study.name}'")
    console.print(f"hash     {study.content_hash}")
    console.print(f"features {len(schema.features)} ({schema.n_inputs} model inputs)")
    console.print(f"model    {study.model.kind.value} {list(study.model.hidden) or ''}")
    console.print(
        f"training {study.aggregation.strategy.value}, {study.rounds.count} rounds, "
        f"weighting {study.aggregation.weighting.value}"
    )


@data_app.command("check")
def data_check(
    data: Path,
    study_file: Annotated[Path, typer.Option("--study", help="study.yaml")],
    mapping_file: Annotated[Path, typer.Option("--mapping", help="the site's mapping.yaml")],
) -> None:
    """Check a site's data file against the study schema through its mapping; nothing is sent."""
    from fedcare.schema.mapping import apply_mapping, load_mapping
    from fedcare.schema.readers import read_table

    def run() -> int:
        study = load_study(study_file)
        mapping = load_mapping(mapping_file)
        frame = read_table(data)
        mapped = apply_mapping(frame, mapping, study.feature_schema)
        return len(mapped)

    rows = guarded(run)
    console.print(f"[green]ok[/] {rows} rows fit the schema of the study")


if __name__ == "__main__":
    app()
