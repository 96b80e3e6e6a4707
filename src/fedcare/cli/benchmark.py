"""``fedcare benchmark ...``: published benchmarks on real hospital data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from fedcare.study import AccountantKind, PersonalizationMethod, PersonalizationSpec

benchmark_app = typer.Typer(
    help="Reproduce published federated benchmarks on real hospital data.", no_args_is_help=True
)


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.0%}" if percent else f"{value:.3f}"


@benchmark_app.command("heart-disease")
def benchmark_heart_disease(
    data_dir: Annotated[
        Path, typer.Option(help="Folder holding the four processed.*.data files (UCI set 45).")
    ],
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per method.")] = 5,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the full result as JSON.")
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(min=0.0, help="DP-SGD at every site: target epsilon per site for the study."),
    ] = None,
    delta: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="DP delta (with --epsilon).")
    ] = None,
    accountant: Annotated[
        AccountantKind, typer.Option(help="Accountant that sets the noise (with --epsilon).")
    ] = AccountantKind.RDP,
    methods: Annotated[
        list[str] | None,
        typer.Option("--method", help="Run only these federated methods (repeat the option)."),
    ] = None,
    personal: Annotated[
        list[PersonalizationMethod] | None,
        typer.Option(
            "--personal",
            help="Also FedAvg with each centre's personal model: finetune or ditto (repeat).",
        ),
    ] = None,
    personal_epochs: Annotated[
        int, typer.Option(min=1, help="finetune: epochs after the study; ditto: per round.")
    ] = 5,
    ditto_lam: Annotated[
        float, typer.Option(min=1e-6, max=1e4, help="ditto: pull towards the global model.")
    ] = 0.1,
    processes: ProcessesOption = None,
    ray: RayOption = None,
) -> None:
    """Fed-Heart-Disease (four real centres): pooled, local and every strategy vs FLamby."""
    from fedcare.data.heart_disease import (
        CENTER_NAMES,
        dp_safe,
        heart_disease_study,
        load_heart_disease,
    )
    from fedcare.simulation.heart_benchmark import (
        METHODS,
        BenchmarkResult,
        run_benchmark,
        table_rows,
    )

    check_placement(processes, ray)
    if (epsilon is None) != (delta is None):
        fail("give --epsilon and --delta together (differential privacy needs both)")
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        fail(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    if PersonalizationMethod.FEDBN in (personal or ()):
        fail("fedbn needs normalisation layers; the heart-disease model is logistic regression")

    def run() -> BenchmarkResult:
        specs = [
            PersonalizationSpec(method=m, epochs=personal_epochs, lam=ditto_lam)
            for m in dict.fromkeys(personal or ())
        ]
        study = heart_disease_study()
        if epsilon is not None:
            privacy = {"dp": True, "epsilon": epsilon, "delta": delta, "accountant": accountant}
            study = dp_safe(study).replace(privacy=privacy)
        sites = load_heart_disease(data_dir, study)
        errors.print(
            f"Fed-Heart-Disease: {len(sites)} centres, "
            f"{sum(s.n_train for s in sites)} training and {sum(s.n_test for s in sites)} "
            f"test rows; {seeds} seed(s) per method",
            highlight=False,
        )
        with progress_bar() as progress:
            return run_benchmark(
                sites,
                study,
                n_seeds=seeds,
                methods=methods or METHODS,
                progress=progress,
                personalization=specs,
                processes=processes,
                ray_address=ray,
            )

    result = guarded(run)
    table = Table(title="Fed-Heart-Disease: test accuracy (mean over seeds)")
    for header in ("method", "Avg", *CENTER_NAMES, "lift"):
        table.add_column(header, justify="left" if header == "method" else "right")
    # Each method's row, then the published numbers (dim) right under it.
    for row in table_rows(result):
        pairs = row.pairs(CENTER_NAMES)
        if row.measured is not None:
            lift = "" if row.is_local else _cell(row.lift, percent=True)
            table.add_row(row.label, *(_cell(ours) for ours, _ in pairs), lift)
        if row.published is not None:
            label = "  published" if row.measured is not None else f"{row.label} (published only)"
            lift = "" if row.is_local else _cell(row.published_lift, percent=True)
            table.add_row(label, *(_cell(pub) for _, pub in pairs), lift, style="dim")
    console.print(table)
    settings = result.settings
    console.print(
        "lift: median over centres of the gain over each centre's local model on the other "
        f"three centres' test sets. Seeds {settings.seeds}, split seed {settings.split_seed}, "
        f"{settings.rounds} rounds; {result.wall_s:.0f} s.",
        style="dim",
    )
    if epsilon is not None:
        console.print(
            f"federated methods: DP-SGD at every centre, epsilon {epsilon:g} per centre for the "
            f"whole study at delta {delta:g} ({accountant.value}); pooled and local rows are "
            "trained without DP. All rows use DP-safe preprocessing (reference scaling, keyed "
            "split), so they differ from the published protocol's.",
            style="dim",
        )
    if json_file is not None:
        json_file.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        errors.print(f"wrote {json_file}", highlight=False)
