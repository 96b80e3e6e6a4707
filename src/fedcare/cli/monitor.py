"""``fedcare site monitor``: run the drift monitor at a site, record it, print it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcare.config import ConfigError, SiteConfig, load_config
from fedcare.drift.checks import TEST_NAMES
from fedcare.policy import SitePolicy, load_policy
from fedcare.policy.approval import site_audit_path
from fedcare.schema.mapping import load_mapping
from fedcare.schema.readers import read_table
from fedcare.site.fingerprint import data_digest
from fedcare.site.monitor import MonitorRun, monitor_table, write_monitor
from fedcare.site.profiles import ProfileStore
from fedcare.study import load_study


@dataclass(frozen=True)
class MonitorCommand:
    run: MonitorRun
    sent: str
    """What happened to the summary, in one line."""


def run_monitor_command(
    config_path: Path, data_path: Path, release: int | None, out: Path | None, send: bool
) -> MonitorCommand:
    """Monitor, write the JSON and HTML, audit, and send the summary when the study asks."""
    from fedcare.audit import AuditLog
    from fedcare.site.client import CoordinatorClient

    config = load_config(config_path, SiteConfig)
    if config.study is None or config.mapping is None:
        raise ConfigError(f"{config_path}: the site config needs study and mapping files")
    study = load_study(config.study)
    mapping = load_mapping(config.mapping)
    if mapping.site != config.site:
        raise ConfigError(
            f"the mapping is for site '{mapping.site}' but this site is '{config.site}'"
        )
    policy: SitePolicy | None = load_policy(config.policy) if config.policy else None
    store = ProfileStore(config.state_dir, study.content_hash)
    result = monitor_table(
        study, mapping, policy, store, read_table(data_path), data_digest(data_path), release
    )
    run = write_monitor(result, study, policy, out or config.state_dir / "monitor")
    audit = AuditLog(site_audit_path(config.policy), config.site) if config.policy else None
    if audit is not None:
        audit.append(
            "drift.monitored",
            study=study.content_hash,
            release=result.release,
            rows=result.checks.n,
            data_sha256=result.data_sha256,
            drift=result.checks.drift,
            flagged=[c.name + ":" + c.kind.value for c in result.checks.checks if c.flagged],
            performance_passed=result.performance_passed,
            result_sha256=hashlib.sha256(run.json_path.read_bytes()).hexdigest(),
        )
    if study.monitoring is None:
        return MonitorCommand(run, "the study declares no monitoring: nothing left the site")
    if run.summary is None:
        return MonitorCommand(run, f"nothing sent: {run.refused}")
    if not send:
        return MonitorCommand(run, "not sent (--no-send)")
    body = run.summary.model_dump_json().encode("utf-8")
    recipient = str(config.coordinator)
    if audit is not None:
        # Recorded before the first byte leaves, like every outflow.
        audit.append(
            "drift.sent",
            study=study.content_hash,
            release=result.release,
            recipient=recipient,
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
        )
    client = CoordinatorClient(recipient, config.tls)
    try:
        client.send_drift(study.content_hash, body)
    finally:
        client.close()
    return MonitorCommand(run, f"drift summary sent to {recipient} ({len(body):,} bytes)")


def _p(value: float) -> str:
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def print_monitor(command: MonitorCommand, console: Console) -> None:
    """The verdict per check, the estimates and the gates."""
    run = command.run
    result = run.result
    checks = result.checks
    table = Table(
        title=f"Drift at {result.site}: release {result.release} of {result.study_name}, "
        f"{checks.n:,} new patients ({'labelled' if checks.labelled else 'no labels'})"
    )
    for column in ("check", "test", "statistic", "p", "p (BH)", "effect", "verdict"):
        table.add_column(column, justify="left" if column in {"check", "test"} else "right")
    for check in checks.checks:
        table.add_row(
            check.name,
            TEST_NAMES[check.kind],
            f"{check.statistic:.4g}",
            _p(check.p_value),
            _p(check.p_adjusted),
            f"{check.effect:+.3f} {check.effect_name}",
            "[bold red]shift[/]" if check.flagged else "[green]stable[/]",
        )
    console.print(table)
    estimates = checks.estimates

    def show(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "—"
        return f"{100 * value:.1f} %" if percent else f"{value:.3f}"

    console.print(
        f"prevalence: reference {show(estimates.reference_prevalence, True)}, "
        f"estimated without labels (BBSE) {show(estimates.estimated_prevalence, True)}, "
        f"measured {show(estimates.measured_prevalence, True)}",
        markup=False,
    )
    console.print(
        f"AUROC: reference {show(estimates.reference_auroc)}, estimated without labels "
        f"(CBPE) {show(estimates.estimated_auroc)}, measured {show(estimates.measured_auroc)}",
        markup=False,
    )
    verdict = "DRIFT" if checks.drift else "no drift"
    flagged = sum(c.flagged for c in checks.checks)
    console.print(
        f"verdict: {verdict} ({flagged} of {len(checks.checks)} tests flagged at FDR "
        f"{checks.alpha:g})",
        style="bold red" if checks.drift else "bold green",
        markup=False,
    )
    if result.performance_passed is not None:
        state = "pass" if result.performance_passed else "FAIL"
        console.print(f"gates with labels: {state}", markup=False)
        for reason in result.reasons:
            console.print(f"  {reason}", markup=False)
    for reason in result.estimated_gates:
        console.print(f"gate (estimated): {reason}", markup=False)
    console.print(f"wrote {run.json_path} and {run.html_path}", markup=False)
    console.print(command.sent, markup=False)
