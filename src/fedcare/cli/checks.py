"""``fedcare study check`` and ``fedcare data check``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedcare.cli.common import console, guarded
from fedcare.study import load_study

study_app = typer.Typer(help="Inspect and check study files.", no_args_is_help=True)
data_app = typer.Typer(help="Check a site's data against a study.", no_args_is_help=True)


@study_app.command("check")
def study_check(path: Path) -> None:
    """Validate a study file and print its content hash."""
    study = guarded(lambda: load_study(path))
    schema = study.feature_schema
    console.print(f"[green]valid[/] study '{study.name}'")
    console.print(f"hash     {study.content_hash}")
    console.print(f"features {len(schema.features)} ({schema.n_inputs} model inputs)")
    console.print(f"model    {study.model.kind.value} {list(study.model.hidden) or ''}")
    if study.model.entrypoint is not None:
        from fedcare.models.builders import check_model
        from fedcare.models.module import module_source

        guarded(lambda: check_model(study))
        source = module_source(study.model.entrypoint)
        console.print(f"source   {source} matches source_sha256", markup=False)
    console.print(
        f"training {study.aggregation.strategy.value}, {study.rounds.count} rounds, "
        f"weighting {study.aggregation.weighting.value}"
    )
    dp = study.privacy
    if dp.dp:
        noise = (
            f"epsilon {dp.epsilon:g} per site for the study"
            if dp.epsilon is not None
            else f"noise multiplier {dp.noise_multiplier:g}"
        )
        console.print(
            f"privacy  DP-SGD, {noise}, delta {dp.delta:g}, clipping {dp.max_grad_norm:g}, "
            f"{dp.accountant.value}"
        )
    else:
        console.print("privacy  no differential privacy")


@data_app.command("check")
def data_check(
    data: Path,
    study_file: Annotated[Path, typer.Option("--study", help="study.yaml")],
    mapping_file: Annotated[Path, typer.Option("--mapping", help="the site's mapping.yaml")],
) -> None:
    """Check a site's data file against the study schema through its mapping; nothing is sent."""
    from fedcare.schema.mapping import MappedTable, apply_mapping, load_mapping
    from fedcare.schema.readers import read_table

    def run() -> MappedTable:
        study = load_study(study_file)
        mapping = load_mapping(mapping_file)
        frame = read_table(data)
        return apply_mapping(frame, mapping, study.feature_schema)

    mapped = guarded(run)
    for notice in mapped.notices:
        console.print(f"[yellow]note[/] {escape(str(notice))}")
    console.print(f"[green]ok[/] {len(mapped.frame)} rows fit the schema of the study")
