"""Signed heads: a party's signature over the ``(seq, hash)`` of its log's last entry.

A hash chain shows that a log is consistent with itself, not that it is the log
that was written: whoever can rewrite the whole file can rebuild a consistent
chain, and cutting entries off the end leaves a shorter chain that is still
valid. A signed head, kept where the log's own host cannot rewrite it (with the
coordinator, the compliance officer, an external reviewer), pins the log as it
was when the head was signed: a later log must contain that entry, unchanged.

The signed message is the canonical JSON of every field but ``signature``,
including ``"format": "fedcare-audit-head/1"``. That prefix keeps these
signatures apart from anything else the party's key signs (its TLS handshakes
sign binary transcripts that never start with ``{``).

Keys: the party's provisioned ECDSA P-256 key (``fedcare.pki``), or Ed25519.
This module does no file I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedcare.audit.chain import (
    PARTY_NAME,
    JsonValue,
    canonical_json,
    is_timestamp,
    sha256_hex,
)
from fedcare.audit.errors import HeadError

HEAD_FORMAT = "fedcare-audit-head/1"
ECDSA_P256 = "ecdsa-p256-sha256"
ED25519 = "ed25519"

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_FIELDS = frozenset(
    {"format", "party", "seq", "hash", "signed_at", "algorithm", "key_id", "signature"}
)


@dataclass(frozen=True)
class SignedHead:
    """A signature by ``party`` over entry ``seq`` of its log having hash ``hash``."""

    party: str
    seq: int
    hash: str
    signed_at: str
    algorithm: str
    key_id: str
    signature: str
    """Base64: DER for ECDSA, the raw 64 bytes for Ed25519."""

    def body(self) -> dict[str, JsonValue]:
        """The signed fields."""
        return {
            "format": HEAD_FORMAT,
            "party": self.party,
            "seq": self.seq,
            "hash": self.hash,
            "signed_at": self.signed_at,
            "algorithm": self.algorithm,
            "key_id": self.key_id,
        }

    def message(self) -> bytes:
        """The bytes the signature covers."""
        return canonical_json(self.body())

    def to_json(self) -> dict[str, JsonValue]:
        """The head as a JSON object (to write to a file, send, or log as a detail)."""
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_json(cls, obj: object) -> SignedHead:
        """Parse a head read from JSON; :class:`HeadError` says what is wrong.

        This checks the shape only; :func:`check_signature` checks the signature.
        """
        if not isinstance(obj, dict):
            raise HeadError("a signed head must be a JSON object")
        if set(obj) != _FIELDS:
            raise HeadError(f"a signed head has exactly the fields {sorted(_FIELDS)}")
        if obj["format"] != HEAD_FORMAT:
            raise HeadError(f"unknown head format {obj['format']!r} (expected {HEAD_FORMAT!r})")
        party, seq, digest = obj["party"], obj["seq"], obj["hash"]
        signed_at, algorithm, key, signature = (
            obj["signed_at"],
            obj["algorithm"],
            obj["key_id"],
            obj["signature"],
        )
        if not isinstance(party, str) or not PARTY_NAME.fullmatch(party):
            raise HeadError("the head's party is not a valid party name")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise HeadError("the head's seq is not a positive integer")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise HeadError("the head's hash is not 64 lower-case hex digits")
        if not is_timestamp(signed_at):
            raise HeadError("the head's signed_at is not an ISO 8601 UTC timestamp")
        if algorithm not in (ECDSA_P256, ED25519):
            raise HeadError(f"unsupported head algorithm {algorithm!r}")
        if not isinstance(key, str) or not _KEY_ID.fullmatch(key):
            raise HeadError("the head's key_id is not 'sha256:' and 64 hex digits")
        if not isinstance(signature, str):
            raise HeadError("the head's signature is not base64 text")
        return cls(party, seq, digest, signed_at, algorithm, key, signature)


def key_id(public_key: VerifyingKey) -> str:
    """``sha256:`` and the hex SHA-256 of the public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + sha256_hex(der)


def algorithm_of(key: SigningKey | VerifyingKey) -> str:
    """The head algorithm for ``key``; :class:`HeadError` for keys this module refuses."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return ECDSA_P256
        raise HeadError(f"unsupported elliptic curve {key.curve.name}: use P-256 or Ed25519")
    raise HeadError(f"unsupported key type {type(key).__name__}: use ECDSA P-256 or Ed25519")


def sign(party: str, seq: int, digest: str, signed_at: str, key: SigningKey) -> SignedHead:
    """A head for entry ``seq`` with hash ``digest``, signed with ``key``."""
    algorithm = algorithm_of(key)
    unsigned = SignedHead(party, seq, digest, signed_at, algorithm, key_id(key.public_key()), "")
    message = unsigned.message()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.sign(message)
    else:
        raw = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return SignedHead(
        party,
        seq,
        digest,
        signed_at,
        algorithm,
        unsigned.key_id,
        base64.b64encode(raw).decode("ascii"),
    )


def check_signature(head: SignedHead, public_key: VerifyingKey) -> str | None:
    """Why ``head`` is not a valid signature by ``public_key``, or None if it is."""
    try:
        algorithm = algorithm_of(public_key)
    except HeadError as exc:
        return str(exc)
    if algorithm != head.algorithm:
        return f"the head says {head.algorithm} but the given key is {algorithm}"
    if key_id(public_key) != head.key_id:
        return "the head names another signing key than the one given (wrong certificate?)"
    try:
        raw = base64.b64decode(head.signature, validate=True)
    except (binascii.Error, ValueError):
        return "the head's signature is not valid base64"
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(raw, head.message())
        else:
            public_key.verify(raw, head.message(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "the head's signature does not verify: the head was forged or altered"
    return None
