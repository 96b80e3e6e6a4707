"""``fedcare site run | review | approve``: the hospital's side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcare.cli.common import console, errors, fail, guarded, say
from fedcare.study import load_study

site_app = typer.Typer(help="Run a hospital's site agent.", no_args_is_help=True)


@site_app.command("enrol")
def site_enrol(
    name: Annotated[str, typer.Option(help="This site's name, as the consortium lists it.")],
    out: Annotated[Path, typer.Option(help="Folder for the key and the request (created).")],
) -> None:
    """Make this site's private key and a certificate signing request; only the request
    (NAME.csr) goes to the consortium's CA, the key never leaves."""
    from fedcare.lifecycle import enrol

    done = guarded(lambda: enrol(name, out))
    say(f"key      {done.key} (mode 0600; stays here)")
    say(f"request  {done.csr}")
    say(f"public key sha256 {done.key_sha256}")
    console.print(
        f"next: send {done.csr.name} to the CA's holder ('fedcare provision sign'); read them "
        "the public key's sha256 out of band.",
        style="dim",
        highlight=False,
    )


@site_app.command("run")
def site_run(
    config: Annotated[Path, typer.Option(help="This site's site.yaml.")],
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Log every HTTP request too (httpx at INFO).")
    ] = False,
) -> None:
    """Take part in the configured study until it finishes (outbound connections only)."""
    import logging

    from fedcare.config import SiteConfig, load_config
    from fedcare.site.agent import run_site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # One line per round event; a request line per long-poll would drown them.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.INFO if verbose else logging.WARNING)
    parsed = guarded(lambda: load_config(config, SiteConfig))
    summary = guarded(lambda: run_site(parsed))
    console.print(
        f"site {summary.site}: trained {summary.rounds_trained} round(s); study finished at "
        f"round {summary.final_round}; model in {summary.model_path}",
        markup=False,
    )
    if summary.refused is not None:
        console.print(f"stopped sending updates: {summary.refused}", markup=False)


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
    data_file: Annotated[
        Path | None,
        typer.Option("--data", help="This site's data (with --mapping): its rows set the DP plan."),
    ] = None,
    rows: Annotated[
        int | None,
        typer.Option("--rows", min=1, help="Or: this site's training rows, for the DP plan."),
    ] = None,
) -> None:
    """Review a study against the site policy; exit 1 if the policy refuses it."""
    from fedcare.policy import StudyReview, load_policy, review_study
    from fedcare.policy.render import print_review
    from fedcare.schema.mapping import load_mapping
    from fedcare.schema.readers import read_table
    from fedcare.site.dataset import prepare_site_data

    if data_file is not None and (mapping_file is None or rows is not None):
        fail("--data needs --mapping (and replaces --rows)")

    def run() -> StudyReview:
        mapping = load_mapping(mapping_file) if mapping_file is not None else None
        study = load_study(study_file)
        n_train = rows
        if data_file is not None and mapping is not None:
            n_train = prepare_site_data(read_table(data_file), mapping, study).n_train
        return review_study(
            study, load_policy(policy_file), mapping, coordinator_url=coordinator, n_train=n_train
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


@site_app.command("budget")
def site_budget(
    config: Annotated[Path, typer.Option(help="This site's site.yaml (ledger and policy).")],
) -> None:
    """Privacy budget per data set: spent (all studies composed), remaining, and per study."""
    from rich.table import Table

    from fedcare.config import SiteConfig, load_config
    from fedcare.policy import load_policy
    from fedcare.site.budget import budget_summary

    parsed = guarded(lambda: load_config(config, SiteConfig))
    policy_file = parsed.policy
    if policy_file is None:
        fail(f"{config}: names no policy file, so there is no budget to show")
    policy = guarded(lambda: load_policy(policy_file))
    rows, spends = guarded(lambda: budget_summary(policy, parsed.ledger_path))
    totals = Table(title=f"Privacy budget of site {parsed.site}")
    for column in ("data set", "budget ε", "δ", "accountant", "spent ε", "remaining ε"):
        totals.add_column(column, justify="left" if column == "data set" else "right")
    studies = Table(title="Spent per study (each on its own)")
    for column in ("data set", "study", "hash", "rounds", "steps", "ε"):
        studies.add_column(column, justify="left" if column in {"data set", "study"} else "right")
    for row in rows:
        if row.budget is None:
            totals.add_row(row.dataset, "none", "—", "—", "recorded; no budget to measure it", "0")
            continue
        totals.add_row(
            row.dataset,
            f"{row.budget.epsilon:g}",
            f"{row.budget.delta:g}",
            row.budget.accountant.value,
            f"{row.spent:.4f}",
            f"{row.remaining:.4f}",
        )
    for entry in spends:
        studies.add_row(
            entry.dataset,
            entry.study_name,
            entry.study_hash[:12],
            str(entry.rounds),
            str(entry.steps),
            f"{entry.epsilon:.4f}",
        )
    console.print(totals)
    if studies.row_count:
        console.print(studies)


@site_app.command("monitor")
def site_monitor(
    config: Annotated[Path, typer.Option(help="This site's site.yaml.")],
    data: Annotated[Path, typer.Option("--data", help="New patients (CSV or Parquet).")],
    release: Annotated[
        int | None, typer.Option(help="The release to monitor (default: the latest frozen).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where the JSON and HTML go (default: STATE_DIR/monitor).")
    ] = None,
    send: Annotated[
        bool,
        typer.Option(
            "--send/--no-send",
            help="Send the drift summary when the study declares monitoring (default).",
        ),
    ] = True,
) -> None:
    """Test new patients against a release's reference profile; exit 1 on drift or a
    failed gate. Labels are optional: without them performance is estimated."""
    from fedcare.cli.monitor import print_monitor, run_monitor_command

    run = guarded(lambda: run_monitor_command(config, data, release, out, send))
    print_monitor(run, console)
    result = run.run.result
    if result.checks.drift or result.performance_passed is False or result.estimated_gates:
        raise typer.Exit(code=1)


@site_app.command("ui")
def site_ui(
    config: Annotated[Path, typer.Option(help="This site's site.yaml.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8765,
) -> None:
    """Serve this site's portal on 127.0.0.1 only: what left, budgets, approvals,
    validation reports and drift monitor results (read-only)."""
    from fedcare.config import SiteConfig, load_config
    from fedcare.site.portal import LOOPBACK, serve_portal

    parsed = guarded(lambda: load_config(config, SiteConfig))
    console.print(f"site portal of {parsed.site} on http://{LOOPBACK}:{port}/", markup=False)
    serve_portal(parsed, port)
