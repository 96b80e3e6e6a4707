"""Key agreement, key derivation and identity signatures for secure aggregation.

Every pairwise secret is an X25519 agreement run through HKDF-SHA256 with a
label naming its purpose, so the key that encrypts shares is never the key that
expands masks. Key advertisements are signed with the site's identity key (the
ECDSA P-256 key of its consortium certificate), and checked against a
certificate the consortium CA issued to that site, so the coordinator that
relays them cannot substitute its own keys.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcare.ids import ROLE_SITE

KEY_BYTES = 32


class SecAggError(ValueError):
    """A secure-aggregation message or request that an honest party refuses."""


def new_exchange_key() -> X25519PrivateKey:
    """A fresh X25519 key pair, used for one round only."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return public_bytes(X25519PrivateKey.from_private_bytes(private))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, label: bytes) -> bytes:
    """A 256-bit key shared by two parties: X25519, then HKDF-SHA256 bound to ``label``.

    ``label`` names the purpose, study and round, so no key serves twice.
    """
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from exc
    return _derive(shared, label)


def _derive(shared: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(shared)


class IdentitySigner(Protocol):
    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with this site's identity key."""
        ...


class EcdsaSigner:
    """Signs with a site's ECDSA P-256 certificate key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


class IdentityVerifier:
    """Checks a site's signature against a certificate the consortium CA issued to that site."""

    def __init__(
        self,
        ca: x509.Certificate,
        now: datetime | None = None,
        revoked: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        self.ca = ca
        self.now = now
        self.revoked = revoked
        """The serials the consortium CA has revoked (its signed list, as the site last
        fetched it); a revoked peer is refused even after its key was first accepted."""
        self._known: dict[tuple[str, str], tuple[int, ec.EllipticCurvePublicKey]] = {}
        """Certificates already checked, by site and PEM: a renewed certificate is checked
        afresh, never answered with the key of the one it replaced."""

    def _site_key(self, site: str, certificate_pem: str) -> tuple[int, ec.EllipticCurvePublicKey]:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise SecAggError(
                f"site '{site}' presented a certificate not issued by the CA"
            ) from exc
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if len(names) != 1 or names[0].value != site:
            raise SecAggError(f"the certificate presented for '{site}' names another site")
        units = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
        if any(unit.value != ROLE_SITE for unit in units):
            # An operator's certificate may carry a site's name; it never speaks for one.
            raise SecAggError(f"the certificate presented for '{site}' is not a site's")
        now = self.now or datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecAggError(f"the certificate presented for '{site}' is not valid now")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise SecAggError(f"the certificate presented for '{site}' has no ECDSA key")
        return cert.serial_number, key

    def verify(
        self,
        site: str,
        certificate_pem: str,
        data: bytes,
        signature: bytes,
        what: str = "key advertisement",
    ) -> None:
        """Raise :class:`SecAggError` unless ``site`` signed ``data``."""
        known = (site, certificate_pem)
        serial, key = self._known.get(known) or self._site_key(site, certificate_pem)
        if serial in self.revoked():
            raise SecAggError(f"the certificate of '{site}' has been revoked by the consortium CA")
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise SecAggError(f"the {what} of '{site}' has a bad signature") from exc
        self._known[known] = (serial, key)


_PROBE = X25519PrivateKey.generate()
"""Any key finds a low-order point: X25519 clamps every scalar to a multiple of the
cofactor, so each agreement with such a point is the all-zero secret. The probe's own
secret is never used for anything else."""


def check_exchange_key(site: str, public: bytes, what: str) -> None:
    """Raise :class:`SecAggError` if ``public`` is not a usable X25519 key: a low-order
    point makes every agreement with it the all-zero secret, which a peer refuses."""
    _exchange(_PROBE, site, public, what)


def agree_checked(
    private: X25519PrivateKey, site: str, peer_public: bytes, what: str, label: bytes
) -> bytes:
    """:func:`agree` with a key ``site`` advertised as its ``what``: the check of
    :func:`check_exchange_key` and the agreement in one exchange."""
    return _derive(_exchange(private, site, peer_public, what), label)


def _exchange(private: X25519PrivateKey, site: str, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecAggError(f"the {what} advertised by '{site}' is not a usable key") from exc


def signed_by_certificate(certificate_pem: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with the ECDSA key of the PEM
    certificate (not checked against any CA: the relay's filter, not a site's check)."""
    try:
        key = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def pinned_verifier(ca: x509.Certificate, certificates: Mapping[str, str]) -> IdentityVerifier:
    """A verifier that already trusts the given sites' certificates (after checking them)."""
    verifier = IdentityVerifier(ca)
    for site, pem in certificates.items():
        verifier._known[(site, pem)] = verifier._site_key(site, pem)
    return verifier
