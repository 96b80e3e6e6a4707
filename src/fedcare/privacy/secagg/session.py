"""What every party of a secure session agrees on, and the sealing of shares between two sites."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcare.privacy.secagg.graph import neighbourhoods, threshold_for
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.shamir import SHARE_BYTES

NONCE_BYTES = 12


@dataclass(frozen=True)
class RoundSetup:
    """The public parameters of one secure session, computed identically by every party.

    A session is one task: ``task_sha256`` names the exact task (global model and
    its nonce) the inputs were computed for. :attr:`session` is a digest of all of
    it; every party signs it, so no party can be shown a different round.
    """

    study_hash: str
    round: int
    task_sha256: str
    sites: tuple[str, ...]
    neighbours: dict[str, tuple[str, ...]]
    threshold: int
    """Shares needed to rebuild a secret, out of the owner's neighbours plus itself."""
    bits: int
    length: int

    @cached_property
    def session(self) -> str:
        """SHA-256 over every parameter: participants, graph, threshold, task, encoding."""
        text = json.dumps(
            {
                "purpose": "fedcare-secagg-session",
                "study": self.study_hash,
                "round": self.round,
                "task": self.task_sha256,
                "sites": list(self.sites),
                "graph": {s: list(self.neighbours[s]) for s in self.sites},
                "threshold": self.threshold,
                "bits": self.bits,
                "length": self.length,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def index(self, site: str) -> int:
        """The site's Shamir share point (1-based position in the sorted site list)."""
        return self.sites.index(site) + 1

    def neighbourhood(self, site: str) -> frozenset[str]:
        """The site's neighbours and the site itself: where its shares live."""
        return frozenset((*self.neighbours[site], site))

    def label(self, purpose: str) -> bytes:
        return f"fedcare-secagg-{purpose}\x1f{self.session}".encode()

    def share_context(self, sender: str, recipient: str) -> bytes:
        """Associated data of a sealed share: it opens only for this session and pair."""
        return self.label("share") + f"\x1f{sender}\x1f{recipient}".encode()


def round_setup(
    study_hash: str,
    round_number: int,
    sites: Sequence[str],
    *,
    task_sha256: str,
    degree: int | None,
    threshold_fraction: float,
    seed: int,
    bits: int,
    length: int,
) -> RoundSetup:
    """The graph and threshold for a session over ``sites``; the graph comes from ``seed``."""
    names = tuple(sorted(sites))
    if len(set(names)) != len(names):
        raise SecAggError("a site is listed twice in the round")
    graph = neighbourhoods(names, degree, seed)
    smallest = min((len(v) for v in graph.values()), default=0)
    if smallest < 1:
        raise SecAggError("secure aggregation needs at least two sites in a round")
    return RoundSetup(
        study_hash=study_hash,
        round=round_number,
        task_sha256=task_sha256,
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
