"""``fedcare study check`` and ``fedcare data check``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from fedcare.cli.common import console, guarded
from fedcare.study import load_study

if TYPE_CHECKING:
    from fedcare.sources.spec import Source

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
    data: Annotated[
        str | None,
        typer.Argument(
            help="A CSV or Parquet file, an image folder, a FHIR bulk export folder or an "
            "OMOP database URL (sqlite:///cdm.sqlite, postgresql+psycopg://...)."
        ),
    ] = None,
    study_file: Annotated[Path | None, typer.Option("--study", help="study.yaml")] = None,
    mapping_file: Annotated[
        Path | None, typer.Option("--mapping", help="the site's mapping.yaml")
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="a site.yaml: its study, source and mapping"),
    ] = None,
    sites_file: Annotated[
        Path | None,
        typer.Option("--sites", help="a sites.yaml: check every site in it (with --study)"),
    ] = None,
) -> None:
    """Check a site's data against the study schema through its mapping; nothing is sent.

    Give DATA with --study and --mapping, or --config site.yaml, or --sites sites.yaml
    with --study. Every unmapped code, value left out and broken rule is listed.
    """
    checks = guarded(lambda: _data_checks(data, study_file, mapping_file, config_file, sites_file))
    for name, source, mapping, study in checks:
        _check_one(name, source, mapping, study, len(checks) > 1)


def _data_checks(
    data: str | None,
    study_file: Path | None,
    mapping_file: Path | None,
    config_file: Path | None,
    sites_file: Path | None,
) -> list[tuple[str, Source, Path, Path]]:
    """(site, source, mapping file, study file) for each check the options ask for."""
    from fedcare.config import ConfigError, SiteConfig, load_config
    from fedcare.simulation.sites import load_sites_file
    from fedcare.sources.load import source_from_argument

    given = [x for x in (data, config_file, sites_file) if x is not None]
    if len(given) != 1:
        raise ConfigError("give DATA (with --study and --mapping), --config or --sites")
    if config_file is not None:
        config = load_config(config_file, SiteConfig)
        source = config.data_source
        study = study_file or config.study
        if source is None or config.mapping is None or study is None:
            raise ConfigError(f"{config_file}: needs study, data (or source) and mapping")
        return [(config.site, source, mapping_file or config.mapping, study)]
    if study_file is None:
        raise ConfigError("--study names the study to check the data against")
    if sites_file is not None:
        base = sites_file.parent
        parsed = load_sites_file(sites_file)
        return [(e.name, e.data_source(base), base / e.mapping, study_file) for e in parsed.sites]
    if mapping_file is None:
        raise ConfigError("--mapping names the site's mapping file")
    assert data is not None
    return [("", source_from_argument(data), mapping_file, study_file)]


def _check_one(name: str, source: Source, mapping: Path, study_file: Path, many: bool) -> None:
    from fedcare.schema.mapping import MappedTable, apply_mapping
    from fedcare.sources.load import SourceTable, read_source

    def run() -> tuple[SourceTable, MappedTable]:
        study = load_study(study_file)
        table = read_source(source, mapping, study.feature_schema)
        return table, apply_mapping(table.frame, table.mapping, study.feature_schema)

    table, mapped = guarded(run)
    prefix = f"{name}: " if many else ""
    for notice in (*table.notices, *mapped.notices):
        console.print(f"[yellow]note[/] {escape(prefix + str(notice))}")
    console.print(
        f"[green]ok[/] {escape(prefix)}{len(mapped.frame)} rows fit the schema of the study"
    )
