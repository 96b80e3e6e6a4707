"""What every party of a round agrees on, and the sealing of shares between two sites."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcare.privacy.secagg.graph import neighbourhoods, threshold_for
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.shamir import SHARE_BYTES

NONCE_BYTES = 12


@dataclass(frozen=True)
class RoundSetup:
    """The public parameters of one secure round, computed identically by every party."""

    study_hash: str
    round: int
    sites: tuple[str, ...]
    neighbours: dict[str, tuple[str, ...]]
    threshold: int
    """Shares needed to rebuild a secret, out of the owner's neighbours plus itself."""
    bits: int
    length: int

    def index(self, site: str) -> int:
        """The site's Shamir share point (1-based position in the sorted site list)."""
        return self.sites.index(site) + 1

    def label(self, purpose: str) -> bytes:
        return f"fedcare-secagg-{purpose}\x1f{self.study_hash}\x1f{self.round}".encode()

    def share_context(self, sender: str, recipient: str) -> bytes:
        """Associated data of a sealed share: it opens only for this study, round and pair."""
        return self.label("share") + f"\x1f{sender}\x1f{recipient}".encode()


def round_setup(
    study_hash: str,
    round_number: int,
    sites: Sequence[str],
    *,
    degree: int | None,
    threshold_fraction: float,
    seed: int,
    bits: int,
    length: int,
) -> RoundSetup:
    """The graph and threshold for a round over ``sites``; the graph comes from ``seed``."""
    names = tuple(sorted(sites))
    graph = neighbourhoods(names, degree, seed)
    smallest = min((len(v) for v in graph.values()), default=0)
    if smallest < 1:
        raise SecAggError("secure aggregation needs at least two sites in a round")
    return RoundSetup(
        study_hash=study_hash,
        round=round_number,
        sites=names,
        neighbours=graph,
        threshold=threshold_for(smallest + 1, threshold_fraction),
        bits=bits,
        length=length,
    )


def seal(key: bytes, context: bytes, seed_share: int, key_share: int) -> bytes:
    """AES-256-GCM over both shares of one sender for one recipient, bound to ``context``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    plain = seed_share.to_bytes(SHARE_BYTES, "big") + key_share.to_bytes(SHARE_BYTES, "big")
    return nonce + AESGCM(key).encrypt(nonce, plain, context)


def open_sealed(key: bytes, context: bytes, ciphertext: bytes) -> tuple[int, int]:
    """The two shares, or :class:`SecAggError` if the ciphertext was altered or misdirected."""
    try:
        plain = AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], context)
    except (InvalidTag, ValueError) as exc:
        raise SecAggError("a share ciphertext failed authentication") from exc
    if len(plain) != 2 * SHARE_BYTES:
        raise SecAggError("a share ciphertext has the wrong length")
    return int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big")
