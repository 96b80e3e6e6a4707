"""The consortium's certificates: a private CA, the coordinator's server certificate
and one client certificate per site, for mutual TLS.

Keys are ECDSA P-256, which every TLS stack (OpenSSL, Python's ``ssl``, httpx,
browsers) accepts for both server and client authentication. Certificates are
built with ``cryptography``'s x509 API; nothing here calls ``openssl``.

A client certificate names a role in its organizational unit (OU): ``site`` for a
hospital, ``operator`` for a person who reads the coordinator's dashboard. A site's
identity is the common name (CN) of a ``site`` certificate, exactly as spelt in the
consortium's site list; :func:`peer_from_peercert` reads the role and name back, and
:func:`site_identity` refuses any certificate that is not a site's.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.ids import ROLE_OPERATOR, ROLE_SITE, ROLES, SITE_NAME

PrivateKey = ec.EllipticCurvePrivateKey

CA_DAYS = 5 * 365
"""Validity of the consortium CA."""
LEAF_DAYS = 2 * 365
"""Validity of the coordinator and site certificates (never beyond the CA's)."""
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are valid from a little before their issue time, for clocks that lag."""
COORDINATOR_CN = "coordinator"
DEFAULT_COORDINATOR_HOSTS = ("localhost", "127.0.0.1", "::1")

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")
_MAX_CN = 64  # ub-common-name in RFC 5280


class PkiError(ValueError):
    """A name or file that cannot go into, or come out of, a certificate."""


@dataclass(frozen=True)
class Peer:
    """Who a verified client certificate speaks for: a site or an operator, by name."""

    name: str
    role: str

    @property
    def is_site(self) -> bool:
        return self.role == ROLE_SITE


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


def new_key() -> PrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now.astimezone(UTC)


def check_consortium_name(consortium: str) -> str:
    """The consortium name, if it fits in a certificate subject; else :class:`PkiError`."""
    if not consortium or consortium != consortium.strip():
        raise PkiError("the consortium name must be non-empty, without surrounding spaces")
    if not consortium.isprintable():
        raise PkiError("the consortium name must not contain control characters")
    if len(f"{consortium} CA") > _MAX_CN:
        raise PkiError(f"the consortium name is too long (at most {_MAX_CN - 3} characters)")
    return consortium


def check_site_name(site: str) -> str:
    """The site name, if it matches the wire protocol's ``SITE_NAME``; else :class:`PkiError`.

    ``coordinator`` (in any case) is reserved: it is the coordinator's own CN.
    """
    if not re.fullmatch(SITE_NAME, site):
        raise PkiError(
            f"invalid site name {site!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if site.lower() == COORDINATOR_CN:
        raise PkiError(f"{site!r} cannot be a site name: it is reserved for the coordinator")
    return site


def _subject(common_name: str, consortium: str, role: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium)]
    if role is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def make_ca(consortium: str, *, days: int = CA_DAYS, now: datetime | None = None) -> Issued:
    """A self-signed consortium CA that may sign end-entity certificates only."""
    check_consortium_name(consortium)
    key = new_key()
    start = _now(now)
    name = _subject(f"{consortium} CA", consortium)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _build(
    ca: Issued,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    days: int,
    now: datetime | None,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    start = _now(now)
    end = min(start + timedelta(days=days), ca.cert.not_valid_after_utc)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _issue(
    ca: Issued,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    days: int,
    now: datetime | None,
    san: x509.SubjectAlternativeName | None = None,
) -> Issued:
    key = new_key()
    return Issued(_build(ca, subject, key.public_key(), usage, days, now, san), key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise PkiError(f"invalid coordinator host name {host!r}: give a DNS name or an IP address")
    return x509.DNSName(host.rstrip(".").lower())


def coordinator_names(extra_hosts: Iterable[str] = ()) -> list[str]:
    """The names the coordinator certificate covers: loopback plus ``extra_hosts``, deduplicated."""
    names: list[str] = []
    for host in (*DEFAULT_COORDINATOR_HOSTS, *extra_hosts):
        _general_name(host)  # validates
        if host not in names:
            names.append(host)
    return names


def issue_server_cert(
    ca: Issued,
    consortium: str,
    hosts: Sequence[str] = DEFAULT_COORDINATOR_HOSTS,
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> Issued:
    """The coordinator's TLS server certificate (CN ``coordinator``), valid for ``hosts``."""
    if not hosts:
        raise PkiError("the coordinator certificate needs at least one host name")
    san = x509.SubjectAlternativeName(list(dict.fromkeys(_general_name(h) for h in hosts)))
    subject = _subject(COORDINATOR_CN, check_consortium_name(consortium))
    return _issue(ca, subject, ExtendedKeyUsageOID.SERVER_AUTH, days, now, san)


def issue_client_cert(
    ca: Issued,
    consortium: str,
    site: str,
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> Issued:
    """A site's TLS client certificate; its CN is the site name, exactly (OU ``site``)."""
    subject = _subject(check_site_name(site), check_consortium_name(consortium), ROLE_SITE)
    return _issue(ca, subject, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def issue_operator_cert(
    ca: Issued,
    consortium: str,
    name: str,
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> Issued:
    """An operator's TLS client certificate (OU ``operator``): it opens the coordinator's
    dashboard and cannot act as a site, whatever its name."""
    subject = _subject(check_site_name(name), check_consortium_name(consortium), ROLE_OPERATOR)
    return _issue(ca, subject, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def make_csr(key: PrivateKey, name: str, role: str = ROLE_SITE) -> x509.CertificateSigningRequest:
    """A certificate signing request for ``name`` in ``role``, signed with ``key`` (which
    never leaves the party that made it)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, check_site_name(name)),
        ]
    )
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def check_csr(csr: x509.CertificateSigningRequest) -> Peer:
    """The peer a CSR asks a certificate for, if the CA may sign it: a valid self-signature,
    one valid name, the site role, an ECDSA P-256 key. Else :class:`PkiError` naming why."""
    try:
        valid = csr.is_signature_valid
    except ValueError:
        valid = False  # a key that does not even parse
    if not valid:
        raise PkiError("the request's signature does not verify (was it altered?)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise PkiError(f"the request's key is {kind}; the consortium uses ECDSA P-256")
    allowed = {NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.ORGANIZATION_NAME}
    other = [a.rfc4514_string() for a in csr.subject if a.oid not in allowed]
    if other:
        raise PkiError(f"the request's subject has fields the CA does not sign: {other}")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise PkiError(f"expected one common name in the request, found {len(names)}")
    units = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    peer = Peer(check_site_name(names[0].value), _role(units))
    if not peer.is_site:
        raise PkiError(f"the request asks for an {peer.role} certificate; only sites enrol")
    return peer


def issue_from_csr(
    ca: Issued,
    consortium: str,
    csr: x509.CertificateSigningRequest,
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> x509.Certificate:
    """A site certificate for a checked CSR's key: the subject is the CA's own (the
    consortium, the role, the name), never copied from the request."""
    peer = check_csr(csr)
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # check_csr guarantees it
    subject = _subject(peer.name, check_consortium_name(consortium), ROLE_SITE)
    return _build(ca, subject, key, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def reissue(
    ca: Issued, cert: x509.Certificate, *, days: int = LEAF_DAYS, now: datetime | None = None
) -> x509.Certificate:
    """The same name, role and key as ``cert``, a new serial and a new validity."""
    cert.verify_directly_issued_by(ca.cert)
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError("only ECDSA certificates can be renewed")
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return _build(ca, cert.subject, key, next(iter(usage)), days, now)


@dataclass(frozen=True)
class Revoked:
    """One certificate on the consortium's revocation list (the reason is kept in the
    CA's audit trail, not in the list)."""

    serial: int
    revoked_at: datetime


CRL_DAYS = 365
"""A revocation list is valid this long; past it, handshakes fail, so ``coordinator
status`` warns 30 days ahead and any revocation writes a fresh one."""


def make_crl(
    ca: Issued, revoked: Sequence[Revoked], number: int, *, now: datetime | None = None
) -> x509.CertificateRevocationList:
    """The CA-signed revocation list of ``revoked``, numbered ``number``."""
    start = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(start - CLOCK_SKEW)
        .next_update(start + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def parse_crl(data: bytes, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """A PEM revocation list, if ``ca`` signed it; else :class:`PkiError`."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError("not a PEM revocation list") from exc
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(ca_key):
        raise PkiError("the revocation list is not signed by the consortium CA")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The list's sequence number: a later list has a higher one."""
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def load_crl(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """Read a PEM revocation list and check that ``ca`` signed it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the revocation list: {exc.strerror}") from exc
    try:
        return parse_crl(data, ca)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from None


def revoked_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    """The serial numbers a (checked) revocation list revokes."""
    return frozenset(entry.serial_number for entry in crl)


def write_crl(crl: x509.CertificateRevocationList, path: Path) -> None:
    """Replace ``path`` with ``crl`` in one step (a reader never sees half a list)."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.chmod(partial, 0o644)
    partial.replace(path)


def write_csr(csr: x509.CertificateSigningRequest, path: Path) -> None:
    """Write a CSR as PEM to a new file."""
    _create_exclusive(path, csr.public_bytes(serialization.Encoding.PEM), 0o644)


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    """Read a PEM certificate signing request."""
    try:
        return x509.load_pem_x509_csr(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the request: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate signing request") from exc


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write a new file created with ``mode`` from the start; refuse if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_private_key(key: PrivateKey, path: Path, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM to a new file that is created with mode 0600.

    Unencrypted unless ``passphrase`` is given. The file must not exist yet.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    _create_exclusive(path, pem, 0o600)


def write_pkcs12(issued: Issued, ca: x509.Certificate, name: str, path: Path) -> None:
    """Write ``issued`` with the CA as a PKCS#12 bundle a browser imports (mode 0600,
    no passphrase: it holds a private key, so it is kept like one)."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    bundle = pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"), issued.key, issued.cert, [ca], serialization.NoEncryption()
    )
    _create_exclusive(path, bundle, 0o600)


def write_certificate(cert: x509.Certificate, path: Path) -> None:
    """Write ``cert`` as PEM to a new file (mode 0644: certificates are public)."""
    _create_exclusive(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the certificate: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate") from exc


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Read a PEM private key (PKCS#8, optionally encrypted); it must be an EC key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the private key: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a readable PEM private key (wrong passphrase?)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    return cert.public_key() == key.public_key()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex (as ``openssl x509 -fingerprint -sha256``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def common_name(cert: x509.Certificate) -> str:
    """The subject's single common name; :class:`PkiError` if there is none or several."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError(f"expected one common name in the subject, found {len(names)}")
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8")


def _role(units: Sequence[object]) -> str:
    if not units:
        return ROLE_SITE
    if len(units) != 1 or units[0] not in ROLES:
        raise PkiError(f"the certificate's role (OU) {list(units)!r} is not one of {list(ROLES)}")
    return str(units[0])


def peer(cert: x509.Certificate) -> Peer:
    """The role and name a client certificate speaks for.

    Call this only on a certificate that TLS has already verified against the
    consortium CA; it checks the subject, not the signature.
    """
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return Peer(check_site_name(common_name(cert)), _role(units))


def site_identity(cert: x509.Certificate) -> str:
    """The site a client certificate speaks for; :class:`PkiError` for an operator's."""
    who = peer(cert)
    if not who.is_site:
        raise PkiError(f"the certificate of '{who.name}' is an {who.role}'s, not a site's")
    return who.name


def peer_from_peercert(peercert: Mapping[str, object]) -> Peer:
    """The peer from :meth:`ssl.SSLSocket.getpeercert` (the verified peer's decoded dict).

    The dict's ``subject`` is a tuple of RDNs, each a tuple of ``(key, value)`` pairs,
    e.g. ``((("organizationName", "X"),), (("commonName", "a"),))``.
    """
    subject = peercert.get("subject")
    if not isinstance(subject, tuple):
        raise PkiError("the peer certificate has no subject (was it verified?)")
    pairs = [
        pair
        for rdn in subject
        if isinstance(rdn, tuple)
        for pair in rdn
        if isinstance(pair, tuple) and len(pair) == 2
    ]
    names = [value for key, value in pairs if key == "commonName"]
    if len(names) != 1 or not isinstance(names[0], str):
        raise PkiError(f"expected one common name in the peer certificate, found {len(names)}")
    units = [value for key, value in pairs if key == "organizationalUnitName"]
    return Peer(check_site_name(names[0]), _role(units))


def site_identity_from_peercert(peercert: Mapping[str, object]) -> str:
    """The site name of a verified peer; :class:`PkiError` for an operator's certificate."""
    who = peer_from_peercert(peercert)
    if not who.is_site:
        raise PkiError(f"the certificate of '{who.name}' is an {who.role}'s, not a site's")
    return who.name
