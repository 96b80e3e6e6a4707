"""Reading the keys that sign and check heads: a party's PEM private key, and the
public key from its certificate (optionally checked against the consortium CA)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedcare.audit.errors import HeadError
from fedcare.audit.heads import SignedHead, SigningKey, VerifyingKey, algorithm_of
from fedcare.audit.log import read_head


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """A PEM private key (the party's provisioned ECDSA P-256 key, or Ed25519)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=passphrase)
    except OSError as exc:
        raise HeadError(f"{path}: cannot read the private key: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise HeadError(f"{path}: not a readable PEM private key (wrong passphrase?)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise HeadError(f"{path}: expected an ECDSA P-256 or Ed25519 key, got {type(key).__name__}")
    algorithm_of(key)  # refuses curves other than P-256
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise HeadError(f"{path}: cannot read the certificate: {exc.strerror}") from None
    except ValueError:
        raise HeadError(f"{path}: not a PEM certificate") from None


def certificate_key(
    cert_path: Path, *, party: str | None = None, ca_path: Path | None = None
) -> VerifyingKey:
    """The public key of the certificate at ``cert_path``.

    With ``party``, the certificate's common name must be that party (sites' and the
    coordinator's certificates are named so). With ``ca_path``, it must have been
    issued by that CA, so a key made by whoever forged a head is not taken on trust.
    """
    cert = _load_cert(cert_path)
    if ca_path is not None:
        try:
            cert.verify_directly_issued_by(_load_cert(ca_path))
        except (ValueError, TypeError, InvalidSignature):
            raise HeadError(f"{cert_path} was not issued by the CA in {ca_path}") from None
    if party is not None:
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if names != [party]:
            raise HeadError(f"{cert_path} is not {party!r}'s certificate (its CN is {names})")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise HeadError(f"{cert_path}: expected an ECDSA P-256 or Ed25519 key")
    algorithm_of(key)
    return key


def load_trusted_head(head_path: Path, cert_path: Path) -> tuple[SignedHead, VerifyingKey]:
    """A signed head and the key of the certificate that must have signed it, for
    :class:`~fedcare.audit.AuditLog`'s ``trusted_head``."""
    return read_head(head_path), certificate_key(cert_path)
