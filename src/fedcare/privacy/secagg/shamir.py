"""Shamir secret sharing over the prime field of p = 2^256 + 297, the smallest prime
above 2^256, so every 32-byte secret is a field element and a share is 33 bytes.

A secret of up to 32 bytes is the constant term of a random polynomial of
degree ``threshold - 1``; share ``x`` is its value at ``x`` (x >= 1). Any
``threshold`` shares give the secret back by Lagrange interpolation at zero;
fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = 2**256 + 297
SHARE_BYTES = 33
MAX_SECRET_BYTES = 32


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them recover it."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret is at most {MAX_SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 1..{len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


@lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The coefficients that interpolate a polynomial's value at zero from points ``xs``.

    Cached: in a round most secrets are rebuilt from the same share holders."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares (the first ones by x)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s), {threshold} needed")
    xs = tuple(sorted(shares)[:threshold])
    value = sum(c * shares[x] for c, x in zip(lagrange_at_zero(xs), xs, strict=True)) % PRIME
    if value >= 1 << (8 * length):
        raise ValueError("the shares do not agree on a secret of the expected size")
    return value.to_bytes(length, "big")
