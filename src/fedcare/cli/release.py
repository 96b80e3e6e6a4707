"""``fedcare release ...``: the model registry (see docs/validation.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fedcare.cli.common import console, fail, guarded, say

if TYPE_CHECKING:
    from fedcare.audit import AuditLog
    from fedcare.releases.registry import Release, ReleaseRegistry

release_app = typer.Typer(
    help="List, inspect, promote, reject and export model releases.", no_args_is_help=True
)

ReleaseArgument = Annotated[int, typer.Argument(help="The release id.", min=1)]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="The coordinator's coordinator.yaml (its database)."),
]
RegistryOption = Annotated[
    Path | None,
    typer.Option(
        "--registry", help="A registry database file, e.g. fedcare-demo/registry/registry.db."
    ),
]


@contextlib.contextmanager
def _open(
    config: Path | None, registry: Path | None
) -> Iterator[tuple[ReleaseRegistry, AuditLog | None]]:
    from fedcare.audit import AuditLog
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.releases.registry import ReleaseRegistry

    if (config is None) == (registry is None):
        fail("give exactly one of --config (a coordinator) or --registry (a database file)")
    audit = None
    if config is not None:
        settings = load_config(config, CoordinatorConfig)
        opened = ReleaseRegistry.open(settings.database, settings.storage / "releases")
        audit = AuditLog(settings.audit_log, "coordinator")
    else:
        assert registry is not None
        if not registry.is_file():
            fail(f"{registry}: no such registry database")
        opened = ReleaseRegistry.open(f"sqlite:///{registry}", registry.parent)
    try:
        yield opened, audit
    finally:
        opened.close()


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@release_app.command("list")
def release_list(
    config: ConfigOption = None,
    registry: RegistryOption = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Only this study (content hash).")
    ] = None,
) -> None:
    """Every release, oldest first: round, parent, state and why."""

    def run() -> list[Release]:
        with _open(config, registry) as (opened, _):
            return opened.releases(study)

    releases = guarded(run)
    if not releases:
        say("no releases yet")
        return
    table = Table(title="Releases")
    for header in ("id", "study", "round", "parent", "state", "sites passed", "why"):
        table.add_column(header, overflow="fold")
    for r in releases:
        passed = sum(v.verdict.passed for v in r.verdicts)
        table.add_row(
            str(r.id),
            f"{r.study_name} ({r.study_hash[:12]})",
            str(r.round),
            "-" if r.parent is None else str(r.parent),
            r.state.value,
            f"{passed}/{len(r.required)}",
            r.reason,
            style={"promoted": "green", "rejected": "red"}.get(r.state.value),
        )
    console.print(table)


@release_app.command("show")
def release_show(
    release_id: ReleaseArgument,
    config: ConfigOption = None,
    registry: RegistryOption = None,
) -> None:
    """One release: lineage, decision, and every site's verdict and reasons."""

    def run() -> Release:
        with _open(config, registry) as (opened, _):
            return opened.get(release_id)

    r = guarded(run)
    say(f"release {r.id}: {r.state.value}")
    say(f"  study    {r.study_name} ({r.study_hash})")
    say(f"  round    {r.round}; parent release: {r.parent if r.parent else 'none'}")
    say(f"  model    sha256 {r.model_sha256}")
    say(f"  created  {_when(r.created_at)}; decided {_when(r.decided_at)}")
    say(f"  quorum   {r.quorum or len(r.required)} of {len(r.required)} site(s)")
    say(f"  decision {r.reason or '(pending)'}")
    if r.override is not None:
        say(f"  override by {r.override.by}: {r.override.reason}")
    for site in r.required:
        verdict = r.verdict_of(site)
        if verdict is None:
            say(f"  site {site}: no verdict yet")
            continue
        overall = verdict.report.overall
        auroc = "suppressed"
        if not overall.suppressed:
            value = overall.auroc.value
            auroc = "n/a" if value is None else f"{value:.3f}"
        say(f"  site {site}: {'passed' if verdict.verdict.passed else 'FAILED'} (AUROC {auroc})")
        for reason in verdict.verdict.reasons:
            say(f"    - {reason}")
        for note in verdict.verdict.notes:
            say(f"    note: {note}")
    for suspension in r.suspended:
        say(
            f"  SUSPENDED at {suspension.site} since {_when(suspension.suspended_at)}: "
            f"{suspension.reason}"
        )


def _decide(
    release_id: int, state: str, by: str, reason: str, config: Path | None, registry: Path | None
) -> Release:
    from fedcare.validation.release import ReleaseState

    with _open(config, registry) as (opened, audit):
        changed = opened.override(release_id, ReleaseState(state), by, reason)
        if audit is not None:
            audit.append(
                "release.override",
                release=release_id,
                study=changed.study_hash,
                state=state,
                by=by,
                reason=reason,
            )
        return changed


ByOption = Annotated[str, typer.Option("--by", help="Who decides (recorded).")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded).")]


@release_app.command("promote")
def release_promote(
    release_id: ReleaseArgument,
    by: ByOption,
    reason: ReasonOption,
    config: ConfigOption = None,
    registry: RegistryOption = None,
) -> None:
    """Promote a release by hand, against or ahead of its gates; who and why are recorded."""
    changed = guarded(lambda: _decide(release_id, "promoted", by, reason, config, registry))
    say(f"release {changed.id} promoted: {changed.reason}")


@release_app.command("reject")
def release_reject(
    release_id: ReleaseArgument,
    by: ByOption,
    reason: ReasonOption,
    config: ConfigOption = None,
    registry: RegistryOption = None,
) -> None:
    """Reject a release by hand (for example, withdraw a promoted one); who and why are recorded."""
    changed = guarded(lambda: _decide(release_id, "rejected", by, reason, config, registry))
    say(f"release {changed.id} rejected: {changed.reason}")


@release_app.command("export")
def release_export(
    release_id: ReleaseArgument,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the release into.")],
    config: ConfigOption = None,
    registry: RegistryOption = None,
) -> None:
    """Write a promoted release: model.safetensors, study.json and its model card."""
    from fedcare.releases.card import export_release

    def run() -> list[Path]:
        with _open(config, registry) as (opened, _):
            return export_release(opened, release_id, out)

    for path in guarded(run):
        say(f"wrote {path}")
