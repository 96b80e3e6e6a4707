"""Identifiers and seeds every layer shares: the patterns of a content hash and a site
name, the roles a certificate can carry, and seeds derived from labels."""

from __future__ import annotations

import hashlib

SHA256_HEX = r"^[0-9a-f]{64}$"
SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

ROLE_SITE = "site"
"""A client certificate that speaks for a hospital: it trains, validates and reports."""
ROLE_OPERATOR = "operator"
"""A client certificate that may read the coordinator's dashboard and nothing else."""
ROLES = (ROLE_SITE, ROLE_OPERATOR)
"""Values of a client certificate's organizational unit (OU); a certificate without one
was issued before roles existed and is a site's."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any labels; stable across processes and machines."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
