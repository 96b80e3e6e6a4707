"""A provisioned consortium after day one: enrol a site without moving its key, sign its
request, add a site in one step, revoke a certificate, renew one.

The site runs :func:`enrol` on its own machine: its private key is made there and never
leaves; only the certificate signing request (CSR) travels. The CA's holder runs
:func:`sign`, which checks the request (signature, name rules, role, key type) and issues
a certificate with the CA's own subject and validity, never copied from the request.
Every act is recorded in the CA folder's hash-chained audit trail (``ca-audit.jsonl``,
party ``consortium-ca``); :func:`enrol` records the request in the site's own trail.

Revocation keeps one CA-signed list, ``crl.pem``, in the CA folder: the coordinator
checks it at every TLS handshake (``tls.crl`` in coordinator.yaml) and reloads it when
the file changes; it serves the list to sites, which check it for their
secure-aggregation peers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from fedcare import pki
from fedcare.audit import AuditLog, read_entries
from fedcare.config import ConfigError, CoordinatorConfig, SiteConfig, load_config
from fedcare.provision import (
    CA_AUDIT,
    CA_PARTY,
    CRL_FILE,
    SITES_DIR,
    ProvisionError,
    coordinator_url,
    site_yaml,
    validate_sites,
)


@dataclass(frozen=True)
class Enrolment:
    """What :func:`enrol` wrote at the site."""

    name: str
    key: Path
    csr: Path
    key_sha256: str
    """SHA-256 of the request's public key: compare it out of band with what the CA signs."""


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued, renewed or revoked."""

    name: str
    cert_path: Path
    serial: int
    fingerprint: str
    not_after: datetime
    config: Path | None = None


@dataclass
class CaFolder:
    """A provisioned folder with its CA, opened for signing."""

    path: Path
    ca: pki.Issued
    consortium: str
    url: str

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.path / CA_AUDIT, CA_PARTY)

    def site_cert(self, name: str) -> Path:
        return self.path / SITES_DIR / name / f"{name}.crt"


def public_key_sha256(key: CertificatePublicKeyTypes) -> str:
    """SHA-256 of a public key's DER encoding (SubjectPublicKeyInfo)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def enrol(name: str, out: Path) -> Enrolment:
    """Make the site's key and its certificate signing request in ``out``."""
    try:
        pki.check_site_name(name)
        validate_sites([name])
    except pki.PkiError as exc:
        raise ProvisionError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    for path in (key_path, csr_path):
        if path.exists():
            raise ProvisionError(f"{path} already exists; enrol into an empty folder")
    key = pki.new_key()
    csr = pki.make_csr(key, name)
    pki.write_private_key(key, key_path)
    pki.write_csr(csr, csr_path)
    digest = public_key_sha256(key.public_key())
    AuditLog(out / "audit.jsonl", name).append(
        "certificate.requested",
        site=name,
        csr=str(csr_path),
        csr_sha256=hashlib.sha256(csr_path.read_bytes()).hexdigest(),
        public_key_sha256=digest,
    )
    return Enrolment(name, key_path, csr_path, digest)


def open_ca(path: Path, passphrase: bytes | None = None) -> CaFolder:
    """The CA of a folder ``fedcare provision`` wrote."""
    cert_file, key_file = path / "ca.crt", path / "ca.key"
    for needed in (cert_file, key_file):
        if not needed.is_file():
            raise ProvisionError(f"{needed} not found: give the folder 'fedcare provision' wrote")
    try:
        ca = pki.Issued(pki.load_certificate(cert_file), pki.load_private_key(key_file, passphrase))
    except pki.PkiError as exc:
        raise ProvisionError(str(exc)) from None
    names = ca.cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    consortium = str(names[0].value) if names else ""
    return CaFolder(path, ca, consortium, _url(path))


def _url(path: Path) -> str:
    """The address sites use: from an existing site's config, else the coordinator's port."""
    for config in sorted((path / SITES_DIR).glob("*/site.yaml")):
        try:
            return str(load_config(config, SiteConfig).coordinator).rstrip("/")
        except ConfigError:
            continue
    try:
        return coordinator_url(load_config(path / "coordinator.yaml", CoordinatorConfig).port)
    except ConfigError as exc:
        raise ProvisionError(f"cannot tell the coordinator's address: {exc}") from None


def _issued(name: str, cert: x509.Certificate, path: Path, config: Path | None = None) -> Issued:
    return Issued(
        name, path, cert.serial_number, pki.fingerprint(cert), cert.not_valid_after_utc, config
    )


def issued_serials(folder: CaFolder, name: str) -> list[int]:
    """Every serial the CA issued to ``name``, from its audit trail."""
    trail = folder.path / CA_AUDIT
    if not trail.exists():
        return []
    return [
        int(str(e.details["serial"]))
        for e in read_entries(trail)
        if e.event in ("certificate.issued", "certificate.renewed") and e.details["site"] == name
    ]


def revoked(folder: CaFolder) -> list[pki.Revoked]:
    """The entries of the folder's revocation list (none before the first revocation)."""
    path = folder.path / CRL_FILE
    if not path.exists():
        return []
    try:
        crl = pki.load_crl(path, folder.ca.cert)
    except pki.PkiError as exc:
        raise ProvisionError(str(exc)) from None
    return [pki.Revoked(e.serial_number, e.revocation_date_utc) for e in crl]


def _live(folder: CaFolder, name: str) -> x509.Certificate | None:
    path = folder.site_cert(name)
    if not path.exists():
        return None
    cert = pki.load_certificate(path)
    gone = {r.serial for r in revoked(folder)}
    return None if cert.serial_number in gone else cert


def sign(folder: CaFolder, csr_path: Path, *, now: datetime | None = None) -> Issued:
    """Check and sign a site's request; write its certificate, a CA copy and a starter
    ``site.yaml`` into ``sites/<name>/``."""
    try:
        csr = pki.load_csr(csr_path)
        peer = pki.check_csr(csr)
        validate_sites([peer.name])
    except pki.PkiError as exc:
        raise ProvisionError(f"{csr_path}: {exc}") from None
    if (live := _live(folder, peer.name)) is not None:
        raise ProvisionError(
            f"site '{peer.name}' already has a live certificate (serial {live.serial_number:x}); "
            "revoke it first, or renew it with 'fedcare provision renew'"
        )
    cert = pki.issue_from_csr(folder.ca, folder.consortium, csr, now=now)
    site_dir = folder.path / SITES_DIR / peer.name
    site_dir.mkdir(parents=True, exist_ok=True)
    cert_path = folder.site_cert(peer.name)
    cert_path.unlink(missing_ok=True)
    pki.write_certificate(cert, cert_path)
    if not (site_dir / "ca.crt").exists():
        pki.write_certificate(folder.ca.cert, site_dir / "ca.crt")
    config = site_dir / "site.yaml"
    if not config.exists():
        config.write_text(site_yaml(peer.name, folder.consortium, folder.url), encoding="utf-8")
    folder.audit.append(
        "certificate.issued",
        site=peer.name,
        serial=str(cert.serial_number),
        sha256=pki.fingerprint(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
        csr_sha256=hashlib.sha256(csr_path.read_bytes()).hexdigest(),
        public_key_sha256=public_key_sha256(csr.public_key()),
    )
    return _issued(peer.name, cert, cert_path, config)


def add_site(folder: CaFolder, name: str, *, now: datetime | None = None) -> Issued:
    """Enrol and sign in one step, the key made in the site's folder (a test consortium,
    or a site whose folder the CA's holder ships)."""
    site_dir = folder.path / SITES_DIR / name
    old_cert = folder.site_cert(name)
    if old_cert.exists() and _live(folder, name) is None:
        # A revoked site enrols again: its old key and certificate are kept, set aside.
        serial = f"{pki.load_certificate(old_cert).serial_number:x}"
        for old in (old_cert, site_dir / f"{name}.key"):
            if old.exists():
                old.rename(old.with_name(f"{old.name}.revoked-{serial}"))
    enrolment = enrol(name, site_dir)
    issued = sign(folder, enrolment.csr, now=now)
    enrolment.csr.unlink()
    return issued


def revoke(folder: CaFolder, name: str, reason: str, *, now: datetime | None = None) -> list[int]:
    """Put every certificate the CA issued to ``name`` on the revocation list; returns the
    serials newly revoked."""
    if not reason.strip():
        raise ProvisionError("give a reason for the revocation (--reason)")
    serials = issued_serials(folder, name)
    path = folder.site_cert(name)
    if path.exists():
        serials.append(pki.load_certificate(path).serial_number)
    if not serials:
        raise ProvisionError(f"the CA has issued no certificate to '{name}'")
    entries = revoked(folder)
    already = {e.serial for e in entries}
    fresh = sorted(set(serials) - already)
    if not fresh:
        raise ProvisionError(f"every certificate of '{name}' is already revoked")
    moment = now or datetime.now(UTC)
    entries += [pki.Revoked(serial, moment) for serial in fresh]
    number = 1
    crl_path = folder.path / CRL_FILE
    if crl_path.exists():
        current = pki.load_crl(crl_path, folder.ca.cert)
        number = pki.crl_number(current) + 1
    pki.write_crl(pki.make_crl(folder.ca, entries, number, now=now), crl_path)
    folder.audit.append(
        "certificate.revoked",
        site=name,
        serials=[str(s) for s in fresh],
        reason=reason,
        crl_number=number,
    )
    return fresh


def renew(folder: CaFolder, name: str, *, now: datetime | None = None) -> Issued:
    """Re-issue ``name``'s live certificate from the same key, with a new validity."""
    current = _live(folder, name)
    if current is None:
        raise ProvisionError(f"site '{name}' has no live certificate to renew")
    cert = pki.reissue(folder.ca, current, now=now)
    path = folder.site_cert(name)
    path.unlink()
    pki.write_certificate(cert, path)
    folder.audit.append(
        "certificate.renewed",
        site=name,
        serial=str(cert.serial_number),
        previous=str(current.serial_number),
        sha256=pki.fingerprint(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
    )
    return _issued(name, cert, path)
