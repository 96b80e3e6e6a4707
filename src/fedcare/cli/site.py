"""``fedcare site run | review | approve``: the hospital's side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcare.cli.common import console, errors, guarded
from fedcare.study import load_study

site_app = typer.Typer(help="Run a hospital's site agent.", no_args_is_help=True)


@site_app.command("run")
def site_run(
    config: Annotated[Path, typer.Option(help="This site's site.yaml.")],
) -> None:
    """Take part in the configured study until it finishes (outbound connections only)."""
    import logging

    from fedcare.config import SiteConfig, load_config
    from fedcare.site.agent import run_site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parsed = guarded(lambda: load_config(config, SiteConfig))
    summary = guarded(lambda: run_site(parsed))
    console.print(
        f"site {summary.site}: trained {summary.rounds_trained} round(s); study finished at "
        f"round {summary.final_round}; model in {summary.model_path}"
    )


# --- site review / approve: the officer's check of a study against policy.yaml -------


@site_app.command("review")
def site_review(
    study_file: Annotated[Path, typer.Argument(help="The study.yaml to review.")],
    policy_file: Annotated[Path, typer.Option("--policy", help="This site's policy.yaml.")],
    mapping_file: Annotated[
        Path | None, typer.Option("--mapping", help="This site's mapping, to show local columns.")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option("--coordinator", help="The coordinator URL to check.")
    ] = None,
) -> None:
    """Review a study against the site policy; exit 1 if the policy refuses it."""
    from fedcare.policy import StudyReview, load_policy, review_study
    from fedcare.policy.render import print_review
    from fedcare.schema.mapping import load_mapping

    def run() -> StudyReview:
        mapping = load_mapping(mapping_file) if mapping_file is not None else None
        return review_study(
            load_study(study_file), load_policy(policy_file), mapping, coordinator_url=coordinator
        )

    review = guarded(run)
    print_review(review, console)
    if not review.approvable:
        raise typer.Exit(code=1)


@site_app.command("approve")
def site_approve(
    study_file: Annotated[Path, typer.Argument(help="The study.yaml to approve.")],
    policy_file: Annotated[Path, typer.Option("--policy", help="This site's policy.yaml.")],
    by: Annotated[str, typer.Option("--by", help="Who approves (recorded in the policy).")],
    note: Annotated[str, typer.Option("--note", help="Why; required with --force.")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Approve although rules refuse it (give --note).")
    ] = False,
) -> None:
    """Approve the study's exact content hash in policy.yaml (written atomically)."""
    from rich.markup import escape as escape_markup

    from fedcare.policy import SitePolicy, StudyRefusedError, approve, is_approved, load_policy
    from fedcare.policy.render import print_findings

    study = guarded(lambda: load_study(study_file))
    before = guarded(lambda: load_policy(policy_file))

    def run() -> SitePolicy | StudyRefusedError:
        try:
            return approve(policy_file, study, by, note, force=force)
        except StudyRefusedError as exc:
            return exc  # a refusal is a verdict (exit 1), not a usage error (exit 2)

    outcome = guarded(run)
    if isinstance(outcome, StudyRefusedError):
        name = escape_markup(study.name)
        errors.print(f"[bold red]refused[/]: study '{name}' is not approved", highlight=False)
        print_findings(outcome.findings, errors)
        errors.print("to approve it anyway: --force --note REASON", style="dim")
        raise typer.Exit(code=1)
    entry = outcome.approval(study.content_hash)
    assert entry is not None
    state = "already approved" if is_approved(before, study.content_hash) else "approved"
    console.print(
        f"{state} study '{study.name}' in {policy_file}\n"
        f"hash {entry.hash}\nby {entry.approved_by} at {entry.approved_at:%Y-%m-%d %H:%M} UTC"
        + (f"\nnote {entry.note}" if entry.note else ""),
        markup=False,
        highlight=False,
    )
