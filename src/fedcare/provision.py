"""``fedcare provision``: a consortium's certificates and starter configs, in one folder.

Layout of the output folder::

    ca.crt  ca.key                      the consortium CA (keep ca.key offline)
    ca-audit.jsonl                      the CA's audit trail: every certificate it issued
    crl.pem                             the CA-signed revocation list (empty at first)
    coordinator.crt  coordinator.key    the coordinator's TLS server certificate
    coordinator.yaml                    a CoordinatorConfig, ready to edit
    sites/<name>/<name>.crt  <name>.key the site's TLS client certificate (CN = <name>)
    sites/<name>/ca.crt                 a copy of the CA, so the folder can ship alone
    sites/<name>/site.yaml              a SiteConfig, ready to edit
    operator/operator.crt  operator.key the operator's client certificate (OU operator): it
    operator/operator.p12               opens the dashboard (/ui) and cannot act as a site;
    operator/ca.crt                     the .p12 bundle is for importing into a browser

Private keys are created with mode 0600 and never printed. Config files are
written as text (so their comments survive) and then loaded back through
:func:`fedcare.config.load_config` to prove they validate.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedcare import pki
from fedcare.audit import AuditLog
from fedcare.config import ConfigError, CoordinatorConfig, SiteConfig, load_config

DEFAULT_PORT = 8443
SITES_DIR = "sites"
CA_AUDIT = "ca-audit.jsonl"
"""The CA's audit trail: every certificate it issued, renewed or revoked."""
CA_PARTY = "consortium-ca"
CRL_FILE = "crl.pem"
"""The CA-signed list of revoked certificates (empty until the first revocation)."""
OPERATOR_DIR = "operator"
OPERATOR_NAME = "operator"
_RESERVED = ("ca", pki.COORDINATOR_CN)  # "ca" would clash with the CA copy in a site folder


class ProvisionError(ValueError):
    """Provisioning input that cannot be used, or an output folder it must not touch."""


@dataclass(frozen=True)
class WrittenCert:
    """One certificate and key the command wrote, for the summary."""

    role: str
    cert_path: Path
    key_path: Path
    subject: str
    fingerprint: str
    not_after: datetime
    key_encrypted: bool = False


@dataclass(frozen=True)
class ProvisionResult:
    """Everything :func:`provision` wrote."""

    out: Path
    consortium: str
    coordinator_url: str
    certificates: list[WrittenCert]
    configs: list[Path]
    ca_copies: list[Path]
    stale_sites: list[Path]
    """Site folders left from an earlier run (``--force``) that are not in this site list."""


def split_names(values: Iterable[str]) -> list[str]:
    """Names given as comma lists and/or repeated options, whitespace stripped, in order."""
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                raise ProvisionError(f"empty name in {value!r}")
            names.append(name)
    return names


def validate_sites(sites: Sequence[str]) -> list[str]:
    """The site names if all are valid, unique (ignoring case) and not reserved."""
    if not sites:
        raise ProvisionError("give at least one site name (--sites a,b,c)")
    seen: dict[str, str] = {}
    for site in sites:
        if site.lower() in _RESERVED:
            raise ProvisionError(
                f"{site!r} cannot be a site name: "
                f"{', '.join(repr(r) for r in _RESERVED)} are reserved"
            )
        try:
            pki.check_site_name(site)
        except pki.PkiError as exc:
            raise ProvisionError(str(exc)) from None
        if site.lower() in seen:
            raise ProvisionError(
                f"duplicate site name {site!r} (site names must differ, ignoring case; "
                f"{seen[site.lower()]!r} is already listed)"
            )
        seen[site.lower()] = site
    return list(sites)


def coordinator_url(port: int, hosts: Sequence[str] = ()) -> str:
    """The URL sites use: the first extra coordinator host if any, else 127.0.0.1."""
    host = hosts[0] if hosts else "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"https://{host}:{port}"


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML): no 'yes' or '1e5' surprises."""
    return json.dumps(value)


def _tls_block(
    cert: str, key: str, cert_note: str, key_note: str, ca_note: str, crl: bool = False
) -> str:
    lines = [
        (f"  cert: {_q(cert)}", cert_note),
        (f"  key: {_q(key)}", key_note),
        (f"  ca: {_q('ca.crt')}", ca_note),
    ]
    if crl:
        lines.append((f"  crl: {_q(CRL_FILE)}", "revoked certificates: checked at every handshake"))
    width = max(len(text) for text, _ in lines)
    return "tls:\n" + "".join(f"{text.ljust(width)}  # {note}\n" for text, note in lines)


def coordinator_yaml(consortium: str, port: int, sites: Sequence[str]) -> str:
    """The text of ``coordinator.yaml``, with comments for the operator."""
    site_list = ", ".join(_q(s) for s in sites)
    return f"""\
# fedcare coordinator configuration, written by `fedcare provision`.
# Relative paths are resolved against this file's folder, so the folder can move as a whole.
consortium: {_q(consortium)}
# Address to listen on. 127.0.0.1 accepts connections from this machine only;
# use 0.0.0.0 (or the server's own address) when sites connect over the network.
host: {_q("127.0.0.1")}
port: {port}
{
        _tls_block(
            "coordinator.crt",
            "coordinator.key",
            "this server's certificate (TLS server authentication)",
            "its private key: readable by the coordinator's user only (0600)",
            "the consortium CA: only site certificates it issued get in",
            crl=True,
        )
    }# SQLAlchemy URL; a relative SQLite path is relative to this file.
database: {_q("sqlite:///coordinator.db")}
storage: {_q("models")}  # folder for model files
# Studies this coordinator runs, each with the sites that take part (their certificate
# names). To add one, replace `studies: []` below with, for example:
# studies:
#   - file: "studies/my-study.yaml"   # the study file, relative to this folder
#     sites: [{site_list}]
studies: []
"""


def site_yaml(site: str, consortium: str, url: str) -> str:
    """The text of ``sites/<site>/site.yaml``, with commented placeholders."""
    return f"""\
# fedcare site agent configuration for site {_q(site)} of consortium {_q(consortium)},
# written by `fedcare provision`. This folder can be shipped to the site on its own;
# relative paths are resolved against this file's folder.
site: {_q(site)}
coordinator: {_q(url)}
{
        _tls_block(
            f"{site}.crt",
            f"{site}.key",
            "this site's certificate; its name (CN) is the site's identity",
            "its private key: readable by the site agent's user only (0600)",
            "the consortium CA, to check the coordinator's certificate",
        )
    }# The study this site runs: the exact file the consortium distributed.
# study: "study.yaml"
# The site's local data (CSV or Parquet). It never leaves this machine.
# data: "/path/to/local/data.csv"
# How local columns and units map to the study's feature schema
# (start from `fedcare init mapping`; reference: docs/reference/mapping.md).
# mapping: "mapping.yaml"
# The site's own rules: approved studies, privacy budget, jurisdiction, gates. The
# agent runs only studies this policy approves (start from `fedcare init policy`;
# reference: docs/reference/policy.md).
# policy: "policy.yaml"
# Where the agent keeps its privacy ledger and fitted preprocessing.
# state_dir: "state"
"""


def _plan(out: Path, sites: Sequence[str]) -> list[Path]:
    files = [
        out / "ca.crt",
        out / "ca.key",
        out / CA_AUDIT,
        out / CRL_FILE,
        out / "coordinator.crt",
        out / "coordinator.key",
        out / "coordinator.yaml",
    ]
    for site in sites:
        folder = out / SITES_DIR / site
        files += [folder / f"{site}.crt", folder / f"{site}.key", folder / "ca.crt"]
        files += [folder / "site.yaml"]
    operator = out / OPERATOR_DIR
    files += [operator / f"{OPERATOR_NAME}.{ext}" for ext in ("crt", "key", "p12")]
    return [*files, operator / "ca.crt"]


def _clear_targets(out: Path, files: Sequence[Path], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"{out} exists and is not a folder")
    existing = [f for f in files if f.exists() or f.is_symlink()]
    if not existing:
        return
    if not force:
        ca = [f for f in existing if f.parent == out and f.name in ("ca.crt", "ca.key")]
        if ca:
            raise ProvisionError(
                f"{out} already contains a consortium CA ({ca[0]}); refusing to overwrite it. "
                "Pass --force to replace the CA and every certificate in this folder "
                "(certificates issued by the old CA stop working)"
            )
        shown = ", ".join(str(f) for f in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise ProvisionError(
            f"{out} already has files this would overwrite ({shown}); pass --force to replace them"
        )
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            raise ProvisionError(f"{path} is a folder; remove it by hand")
        path.unlink()


def _write_text(path: Path, text: str) -> None:
    with path.open("x", encoding="utf-8") as handle:
        handle.write(text)


def _record(
    role: str, issued: pki.Issued, cert_path: Path, key_path: Path, *, encrypted: bool
) -> WrittenCert:
    return WrittenCert(
        role=role,
        cert_path=cert_path,
        key_path=key_path,
        subject=issued.cert.subject.rfc4514_string(),
        fingerprint=pki.fingerprint(issued.cert),
        not_after=issued.cert.not_valid_after_utc,
        key_encrypted=encrypted,
    )


def _check_configs(
    coordinator: Path, site_files: dict[str, Path], consortium: str, port: int
) -> None:
    try:
        loaded = load_config(coordinator, CoordinatorConfig)
        if loaded.consortium != consortium or loaded.port != port:
            raise ProvisionError(f"{coordinator}: did not read back as written")
        for site, path in site_files.items():
            if load_config(path, SiteConfig).site != site:
                raise ProvisionError(f"{path}: did not read back as written")
    except ConfigError as exc:
        raise ProvisionError(f"a written config does not validate: {exc}") from exc


def provision(
    consortium: str,
    sites: Sequence[str],
    out: Path,
    *,
    port: int = DEFAULT_PORT,
    coordinator_hosts: Sequence[str] = (),
    force: bool = False,
    ca_passphrase: bytes | None = None,
    now: datetime | None = None,
) -> ProvisionResult:
    """Create the CA, the coordinator's and each site's certificate, and starter configs.

    Everything is validated before anything is written. ``ca_passphrase``, if given,
    encrypts ``ca.key`` only: the CA key is needed just to issue certificates, while
    the coordinator and site keys must be readable by unattended services.
    """
    try:
        pki.check_consortium_name(consortium)
        hosts = pki.coordinator_names(coordinator_hosts)
    except pki.PkiError as exc:
        raise ProvisionError(str(exc)) from None
    sites = validate_sites(sites)
    if not 1 <= port <= 65535:
        raise ProvisionError(f"port {port} is out of range 1-65535")
    url = coordinator_url(port, coordinator_hosts)
    files = _plan(out, sites)
    _clear_targets(out, files, force)

    ca = pki.make_ca(consortium, now=now)
    server = pki.issue_server_cert(ca, consortium, hosts, now=now)
    clients = {site: pki.issue_client_cert(ca, consortium, site, now=now) for site in sites}
    operator = pki.issue_operator_cert(ca, consortium, OPERATOR_NAME, now=now)

    out.mkdir(parents=True, exist_ok=True)
    written: list[WrittenCert] = []

    def emit(role: str, issued: pki.Issued, cert_path: Path, key_path: Path) -> None:
        pki.write_certificate(issued.cert, cert_path)
        encrypt = ca_passphrase if issued is ca else None
        pki.write_private_key(issued.key, key_path, encrypt)
        written.append(_record(role, issued, cert_path, key_path, encrypted=bool(encrypt)))

    emit("consortium CA", ca, out / "ca.crt", out / "ca.key")
    emit("coordinator", server, out / "coordinator.crt", out / "coordinator.key")
    coordinator_config = out / "coordinator.yaml"
    _write_text(coordinator_config, coordinator_yaml(consortium, port, sites))
    copies: list[Path] = []
    site_configs: dict[str, Path] = {}
    for site, issued in clients.items():
        folder = out / SITES_DIR / site
        folder.mkdir(parents=True, exist_ok=True)
        emit(f"site {site}", issued, folder / f"{site}.crt", folder / f"{site}.key")
        pki.write_certificate(ca.cert, folder / "ca.crt")
        copies.append(folder / "ca.crt")
        site_configs[site] = folder / "site.yaml"
        _write_text(site_configs[site], site_yaml(site, consortium, url))

    folder = out / OPERATOR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / OPERATOR_NAME
    emit("operator (dashboard)", operator, stem.with_suffix(".crt"), stem.with_suffix(".key"))
    pki.write_pkcs12(operator, ca.cert, OPERATOR_NAME, stem.with_suffix(".p12"))
    pki.write_certificate(ca.cert, folder / "ca.crt")
    copies.append(folder / "ca.crt")

    pki.write_crl(pki.make_crl(ca, [], 1, now=now), out / CRL_FILE)
    trail = AuditLog(out / CA_AUDIT, CA_PARTY)
    trail.append("consortium.provisioned", consortium=consortium, ca=pki.fingerprint(ca.cert))
    for name, issued in [*clients.items(), (OPERATOR_NAME, operator)]:
        trail.append(
            "certificate.issued",
            site=name,
            role=pki.peer(issued.cert).role,
            serial=str(issued.cert.serial_number),
            sha256=pki.fingerprint(issued.cert),
            not_after=issued.cert.not_valid_after_utc.isoformat(),
        )

    _check_configs(coordinator_config, site_configs, consortium, port)
    stale = sorted(
        p for p in (out / SITES_DIR).iterdir() if p.is_dir() and p.name not in site_configs
    )
    return ProvisionResult(
        out=out,
        consortium=consortium,
        coordinator_url=url,
        certificates=written,
        configs=[coordinator_config, *site_configs.values()],
        ca_copies=copies,
        stale_sites=stale,
    )
