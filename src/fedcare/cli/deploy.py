"""``fedcare provision`` and ``fedcare coordinator serve | status | site drop | site admit``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fedcare.cli.common import console, fail, guarded, say

if TYPE_CHECKING:
    from fedcare.config import CoordinatorConfig
    from fedcare.federation.state.sql import SeenCertificate, SqlState
    from fedcare.federation.status import StudyOverview
    from fedcare.lifecycle import CaFolder
    from fedcare.releases.registry import ReleaseRegistry

coordinator_app = typer.Typer(help="Run the consortium's coordinator.", no_args_is_help=True)
membership_app = typer.Typer(
    help="Add a site to a running study, drop one, or admit it again (the study's hash stays).",
    no_args_is_help=True,
)
coordinator_app.add_typer(membership_app, name="site")

ConfigOption = Annotated[Path, typer.Option(help="coordinator.yaml (see 'fedcare provision').")]


@coordinator_app.command("serve")
def coordinator_serve(config: ConfigOption) -> None:
    """Serve the configured studies over mutual TLS until stopped."""
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.coordinator.server import serve

    parsed = guarded(lambda: load_config(config, CoordinatorConfig))
    guarded(lambda: serve(parsed))


@contextmanager
def _coordinator_state(
    config: Path,
) -> Iterator[tuple[CoordinatorConfig, SqlState, ReleaseRegistry]]:
    """The coordinator's state and release registry, opened from its config (the service
    may be running: every change is its own transaction)."""
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.federation.state.sql import SqlState
    from fedcare.releases.registry import ReleaseRegistry

    parsed = guarded(lambda: load_config(config, CoordinatorConfig))
    state = guarded(lambda: SqlState(parsed.database, parsed.storage))
    try:
        registry = ReleaseRegistry(state.engine, state.storage / "releases")
        yield parsed, state, registry
    finally:
        state.close()


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, now - moment)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _print_overview(study: StudyOverview, now: float) -> None:
    say(
        f"study {study.name} ({study.study_hash[:12]}): {study.status}, round "
        f"{study.last_round} of {study.rounds_total} done"
    )
    round_ = study.open_round
    if round_ is not None:
        left = round_.deadline - now
        due = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago"
        say(
            f"  open round {round_.number}: selected {', '.join(round_.selected)}; reported "
            f"{', '.join(round_.reported) or 'none'}; waiting for "
            f"{', '.join(round_.waiting_for) or 'nobody'}; deadline {due}"
        )
    table = Table("site", "state", "why", "last seen", "rounds contributed", "missed in a row")
    for site in study.sites:
        table.add_row(
            site.site,
            site.state,
            site.reason or "-",
            _ago(site.last_seen, now),
            str(site.contributed),
            str(site.missed),
        )
    console.print(table)
    for where, since in study.drifting.items():
        say(f"  {where} pulls away from the consortium since round {since} (docs/drift.md)")
    for release in study.releases:
        say(f"  release {release.id} (round {release.round}): {release.state} {release.reason}")
        for where, why in release.suspended_at.items():
            say(f"    suspended at {where}: {why}")


@coordinator_app.command("status")
def coordinator_status(
    config: ConfigOption,
    study: Annotated[
        str | None, typer.Option(help="One study, by name or hash (6+ characters).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Every study: its open round and deadline, each site's state, last contact, rounds
    contributed, and the releases. Reads the coordinator's database; it may be running."""
    from fedcare.federation.status import find_study, overview

    with _coordinator_state(config) as (parsed, state, registry):
        chosen = study
        if chosen is None:
            hashes = [s.hash for s in state.studies()]
        else:
            hashes = [guarded(lambda: find_study(state, chosen))]
        views = guarded(lambda: [overview(state, h, registry) for h in hashes])
        seen = state.certificates()
    if as_json:
        print(json.dumps([v.model_dump(mode="json") for v in views], indent=2))
        return
    if not views:
        say("no studies yet: the coordinator records a study when it first serves it")
    now = time.time()
    for view in views:
        _print_overview(view, now)
    _print_certificates(parsed, seen, now)


EXPIRY_WARNING_DAYS = 30
"""``coordinator status`` warns this long before a certificate or the revocation list lapses."""


def _print_certificates(parsed: CoordinatorConfig, seen: list[SeenCertificate], now: float) -> None:
    from fedcare import pki

    rows: list[tuple[str, str, float]] = []
    for label, path in (("consortium CA", parsed.tls.ca), ("coordinator", parsed.tls.cert)):
        try:
            cert = pki.load_certificate(path)
        except pki.PkiError as exc:
            say(f"warning: {exc}")
            continue
        rows.append((label, f"{cert.serial_number:x}"[:16], cert.not_valid_after_utc.timestamp()))
    if parsed.tls.crl is not None and parsed.tls.crl.exists():
        try:
            crl = pki.load_crl(parsed.tls.crl, pki.load_certificate(parsed.tls.ca))
            if crl.next_update_utc is not None:
                rows.append(
                    ("revocation list", str(pki.crl_number(crl)), crl.next_update_utc.timestamp())
                )
        except pki.PkiError as exc:
            say(f"warning: {exc}")
    rows += [(f"{c.role} {c.name}", f"{c.serial:x}"[:16], c.not_after) for c in seen]
    table = Table(title="certificates (sites and operators: as last seen in a handshake)")
    for column in ("certificate", "serial", "valid until", "left"):
        table.add_column(column)
    warnings = []
    for label, serial, until in rows:
        days = (until - now) / 86400
        left = "expired" if days < 0 else f"{days:.0f} days"
        if days < EXPIRY_WARNING_DAYS:
            left = f"[bold red]{left}[/]"
            warnings.append(label)
        table.add_row(label, serial, time.strftime("%Y-%m-%d", time.gmtime(until)), left)
    console.print(table)
    for label in warnings:
        say(
            f"warning: {label} expires within {EXPIRY_WARNING_DAYS} days: renew it "
            "(fedcare provision renew NAME, or a new revocation list with any revoke)"
        )


def _set_standing(config: Path, study: str, site: str, reason: str, drop: bool) -> None:
    from fedcare.audit import AuditLog
    from fedcare.federation.service import set_standing
    from fedcare.federation.state import SiteState
    from fedcare.federation.status import find_study

    standing = SiteState.DROPPED if drop else SiteState.ACTIVE
    with _coordinator_state(config) as (parsed, state, _):
        study_hash = guarded(lambda: find_study(state, study))
        audit = AuditLog(parsed.audit_log, "coordinator")
        guarded(lambda: set_standing(state, study_hash, site, standing, reason, time.time(), audit))
    effect = (
        "the open round stops waiting for it and it is not selected again"
        if drop
        else "it can be selected again from the next round"
    )
    verb = "dropped from" if drop else "admitted again to"
    say(
        f"{site} {verb} study {study_hash[:12]} (recorded in {parsed.audit_log}); at a "
        f"running coordinator's next tick {effect}"
    )


@membership_app.command("add")
def site_add(
    study: Annotated[str, typer.Argument(help="The study, by name or hash (6+ characters).")],
    site: Annotated[str, typer.Argument(help="The new site (its certificate's name).")],
    reason: Annotated[str, typer.Option(help="Why; goes into the audit trail.")],
    config: ConfigOption,
) -> None:
    """Add a site to a running study that allows it (rounds.open_enrolment): it joins at
    the next round boundary. Its certificate comes from 'fedcare provision sign'."""
    from fedcare.audit import AuditLog
    from fedcare.federation.service import add_site
    from fedcare.federation.status import find_study

    with _coordinator_state(config) as (parsed, state, _):
        study_hash = guarded(lambda: find_study(state, study))
        audit = AuditLog(parsed.audit_log, "coordinator")
        added = guarded(lambda: add_site(state, study_hash, site, reason, time.time(), audit))
    if not added:
        say(f"{site} is already a member of study {study_hash[:12]}")
        return
    say(
        f"{site} added to study {study_hash[:12]} (recorded in {parsed.audit_log}); a running "
        "coordinator selects it from the next round it opens"
    )


@membership_app.command("drop")
def site_drop(
    study: Annotated[str, typer.Argument(help="The study, by name or hash (6+ characters).")],
    site: Annotated[str, typer.Argument(help="The site to take out.")],
    reason: Annotated[str, typer.Option(help="Why; goes into the audit trail.")],
    config: ConfigOption,
) -> None:
    """Take a site out of a running study: it is not selected again and the open round
    stops waiting for it. The study's hash does not change."""
    _set_standing(config, study, site, reason, drop=True)


@membership_app.command("admit")
def site_admit(
    study: Annotated[str, typer.Argument(help="The study, by name or hash (6+ characters).")],
    site: Annotated[str, typer.Argument(help="The site to bring back.")],
    reason: Annotated[str, typer.Option(help="Why; goes into the audit trail.")],
    config: ConfigOption,
) -> None:
    """Bring a dropped, withdrawn or inactive site back into a running study from its next
    round."""
    _set_standing(config, study, site, reason, drop=False)


provision_app = typer.Typer(
    help="Create a consortium (CA, coordinator, site and operator certificates, configs); "
    "then sign sites' requests, add, revoke and renew certificates.",
    invoke_without_command=True,
)


@provision_app.callback()
def provision(
    ctx: typer.Context,
    consortium: Annotated[
        str | None, typer.Option(help="The consortium's name; goes into every certificate.")
    ] = None,
    sites: Annotated[
        list[str] | None,
        typer.Option(
            "--sites",
            help="Site names, comma-separated or repeated; each becomes a certificate's CN.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the CA, certificates, keys and configs.")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The coordinator's port.")] = 8443,
    coordinator_host: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator-host",
            help="Extra DNS name or IP address for the coordinator's certificate "
            "(comma-separated or repeated); the first one is the address sites connect to.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA and certificates in --out.")
    ] = False,
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            "--passphrase-env",
            metavar="VAR",
            help="Encrypt ca.key with the passphrase held in this environment variable.",
        ),
    ] = None,
) -> None:
    """Create a consortium CA, coordinator, site and operator certificates for mutual TLS,
    and configs (--consortium, --sites and --out); or run one of the commands below."""
    if ctx.invoked_subcommand is not None:
        return
    from fedcare.provision import ProvisionResult, split_names
    from fedcare.provision import provision as write_consortium

    missing = [
        flag
        for flag, value in (("--consortium", consortium), ("--sites", sites), ("--out", out))
        if not value
    ]
    if consortium is None or sites is None or out is None:
        fail(f"give {', '.join(missing)} (or a command: see 'fedcare provision --help')")

    def run() -> ProvisionResult:
        return write_consortium(
            consortium,
            split_names(sites),
            out,
            port=port,
            coordinator_hosts=split_names(coordinator_host or []),
            force=force,
            ca_passphrase=_passphrase(passphrase_env),
        )

    result = guarded(run)

    say(f"provisioned consortium {result.consortium!r} in {result.out}")
    for cert in result.certificates:
        protection = "encrypted" if cert.key_encrypted else "unencrypted"
        say(f"{cert.role}: {cert.cert_path}")
        say(f"  subject      {cert.subject}")
        say(f"  sha256       {cert.fingerprint}")
        say(f"  valid until  {cert.not_after:%Y-%m-%d}")
        say(f"  private key  {cert.key_path} (mode 0600, {protection})")
    say(f"CA copies: {', '.join(str(p) for p in result.ca_copies)}")
    say(f"configs: {', '.join(str(p) for p in result.configs)}")
    say(f"sites connect to {result.coordinator_url}")
    say(
        f"dashboard: {result.coordinator_url}/ui, with operator/operator.p12 imported "
        "into the operator's browser"
    )
    for folder in result.stale_sites:
        say(f"warning: {folder} is left from an earlier run; its certificate is from the old CA")
    console.print(
        "next: move ca.key offline; ship each sites/<name>/ folder to its site over a trusted "
        "channel; compare fingerprints out of band (see docs/deployment.md).",
        style="dim",
        highlight=False,
    )


def _passphrase(variable: str | None) -> bytes | None:
    import os

    from fedcare.provision import ProvisionError

    if variable is None:
        return None
    value = os.environ.get(variable, "").encode()
    if not value:
        raise ProvisionError(f"environment variable {variable} is unset or empty")
    return value


def _ca(ca_dir: Path, passphrase_env: str | None) -> CaFolder:
    """The provisioned folder's CA, its key unlocked with the passphrase in the variable."""
    from fedcare.lifecycle import open_ca

    return open_ca(ca_dir, _passphrase(passphrase_env))


CaDirOption = Annotated[
    Path, typer.Option("--ca-dir", help="The folder 'fedcare provision' wrote (ca.crt, ca.key).")
]
PassphraseOption = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env", metavar="VAR", help="ca.key's passphrase is in this variable."
    ),
]


def _show(issued: object, verb: str) -> None:
    from fedcare.lifecycle import Issued

    assert isinstance(issued, Issued)
    say(f"{verb} {issued.name}: {issued.cert_path}")
    say(f"  serial       {issued.serial:x}")
    say(f"  sha256       {issued.fingerprint}")
    say(f"  valid until  {issued.not_after:%Y-%m-%d}")
    if issued.config is not None:
        say(f"  config       {issued.config}")


@provision_app.command("sign")
def provision_sign(
    csr: Annotated[Path, typer.Argument(help="The site's request (NAME.csr from 'site enrol').")],
    ca_dir: CaDirOption,
    passphrase_env: PassphraseOption = None,
) -> None:
    """Check a site's certificate signing request (name rules, role, key type, signature)
    and sign it with the consortium CA; write its certificate and a starter site.yaml."""
    from fedcare.lifecycle import sign

    issued = guarded(lambda: sign(_ca(ca_dir, passphrase_env), csr))
    _show(issued, "signed")
    console.print(
        f"next: send sites/{issued.name}/ ({issued.name}.crt, ca.crt, site.yaml) to the site; "
        "its key never left it. Add it to a study in coordinator.yaml.",
        style="dim",
        highlight=False,
    )


@provision_app.command("add-site")
def provision_add_site(
    name: Annotated[str, typer.Argument(help="The new site's name (its certificate's CN).")],
    ca_dir: CaDirOption,
    passphrase_env: PassphraseOption = None,
) -> None:
    """Enrol and sign in one step, the key made in the site's folder (a test consortium)."""
    from fedcare.lifecycle import add_site

    _show(guarded(lambda: add_site(_ca(ca_dir, passphrase_env), name)), "added")


@provision_app.command("revoke")
def provision_revoke(
    name: Annotated[str, typer.Argument(help="The site whose certificates to revoke.")],
    reason: Annotated[str, typer.Option(help="Why; goes into the CA's audit trail.")],
    ca_dir: CaDirOption,
    passphrase_env: PassphraseOption = None,
) -> None:
    """Put every certificate the CA issued to a site on the revocation list (crl.pem)."""
    from fedcare.lifecycle import revoke
    from fedcare.provision import CRL_FILE

    serials = guarded(lambda: revoke(_ca(ca_dir, passphrase_env), name, reason))
    say(f"revoked {name}: serial(s) {', '.join(f'{s:x}' for s in serials)}")
    say(f"revocation list: {ca_dir / CRL_FILE}")
    console.print(
        "next: copy crl.pem to the coordinator (tls.crl in coordinator.yaml); it takes effect "
        "at the next handshake, without a restart, and the site is dropped from its studies.",
        style="dim",
        highlight=False,
    )


@provision_app.command("renew")
def provision_renew(
    name: Annotated[str, typer.Argument(help="The site whose certificate to renew.")],
    ca_dir: CaDirOption,
    passphrase_env: PassphraseOption = None,
) -> None:
    """Re-issue a site's certificate from the same key, with a new validity."""
    from fedcare.lifecycle import renew

    _show(guarded(lambda: renew(_ca(ca_dir, passphrase_env), name)), "renewed")
