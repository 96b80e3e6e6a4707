"""Which secure-aggregation peers the consortium CA has revoked, as this site knows it.

The site fetches the CA's revocation list from the coordinator (``GET /v1/crl``) and
believes it only because the CA signed it: the coordinator cannot revoke a site, nor
un-revoke one by serving an older list (a list numbered below the last one seen is
refused). It can withhold a newer list; then the site goes on with the last it saw.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cryptography import x509

from fedcare.pki import PkiError, crl_number, parse_crl, revoked_serials
from fedcare.site.link import CoordinatorError, RetryableError

log = logging.getLogger("fedcare.site")

REFRESH_S = 10.0
"""How often the list is fetched again, at most (a secure round checks many signatures)."""


class PeerRevocations:
    """A callable giving the revoked serials, refreshed from ``fetch`` every ``refresh_s``."""

    def __init__(
        self,
        fetch: Callable[[], bytes | None],
        ca: x509.Certificate,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.ca = ca
        self.refresh_s = refresh_s
        self.clock = clock
        self.number = 0
        self.serials: frozenset[int] = frozenset()
        self._checked_at: float | None = None

    def __call__(self) -> frozenset[int]:
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.refresh_s:
            self._checked_at = now
            self._refresh()
        return self.serials

    def _refresh(self) -> None:
        try:
            data = self.fetch()
        except (CoordinatorError, RetryableError) as exc:
            log.warning("revocation list not fetched, keeping the last one: %s", exc)
            return
        if data is None:
            return
        try:
            crl = parse_crl(data, self.ca)
        except PkiError as exc:
            log.error("revocation list from the coordinator refused: %s", exc)
            return
        number = crl_number(crl)
        if number < self.number:
            log.error(
                "revocation list %d from the coordinator is older than %d, seen before: refused",
                number,
                self.number,
            )
            return
        self.number, self.serials = number, revoked_serials(crl)
