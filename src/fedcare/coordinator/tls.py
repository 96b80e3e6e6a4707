"""Mutual TLS for the coordinator: who is on the other end of a connection, and whether
the consortium CA still vouches for them.

uvicorn verifies the client certificate during the handshake (``CERT_REQUIRED``
against the consortium CA only) but does not pass it to the application. This
protocol class reads the verified peer certificate when the connection is made
and puts the peer (its role, site or operator, and its name, both from the
certificate subject) into the per-request state, where the endpoints read it.

:class:`Revocations` checks the CA's revocation list in every handshake: each
handshake is switched (through the SNI callback, which OpenSSL calls for every
ClientHello) to a context that holds the newest list the CA signed, so a revoked
certificate fails the handshake itself, and a new list takes effect without a
restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from fedcare.federation.state.sql import SeenCertificate
from fedcare.ids import ROLE_SITE
from fedcare.pki import (
    Peer,
    PkiError,
    load_certificate,
    load_crl,
    peer_from_peercert,
    revoked_serials,
)

log = logging.getLogger("fedcare.coordinator")

PEER_KEY = "peer"


class PeerIdentityProtocol(H11Protocol):
    """HTTP/1.1 protocol that records the authenticated peer for every request."""

    certificates: CertificateBook | None = None
    """Set by the server: where peers' certificates are noted, for expiry warnings and
    for dropping a site whose certificate is revoked."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        peer: Peer | None
        try:
            peer = peer_from_peercert(peercert) if peercert else None
            if peer is not None and peercert and self.certificates is not None:
                self.certificates.note(peer, peercert)
        except PkiError:
            # A CA-issued certificate that names no valid peer (the coordinator's own,
            # say) authenticates nobody; the endpoints answer 401.
            peer = None
        # app_state is copied into each request's scope["state"]; a per-connection
        # copy keeps one connection's identity out of every other's.
        self.app_state = {**self.app_state, PEER_KEY: peer}


class Revocations:
    """The consortium's revocation list as the coordinator enforces it.

    ``make_context`` builds the server's TLS context (certificate, key, the CA,
    ``CERT_REQUIRED``); this class adds the CA-signed list from ``crl`` and CRL checking
    of the client's certificate, and rebuilds it when the file changes. A list that
    does not verify against the CA is refused and the last good one stays in force.
    """

    def __init__(self, crl: Path, ca: Path, make_context: Callable[[], ssl.SSLContext]) -> None:
        self.crl = crl
        self.ca = load_certificate(ca)
        self._make = make_context
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._context: ssl.SSLContext | None = None
        self._revoked: frozenset[int] = frozenset()
        self.refresh()

    def refresh(self) -> ssl.SSLContext:
        """The context with the newest good list (re-read when the file changed)."""
        with self._lock:
            try:
                stat = self.crl.stat()
                key = (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:
                key = None
            if self._context is None or key != self._seen:
                self._reload(key)
            assert self._context is not None
            return self._context

    def _reload(self, key: tuple[int, int] | None) -> None:
        try:
            crl = load_crl(self.crl, self.ca)
        except PkiError as exc:
            if self._context is None:
                raise
            log.error("revocation list not reloaded, the last good one stays: %s", exc)
            self._seen = key
            return
        context = self._make()
        context.load_verify_locations(cafile=str(self.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        self._context, self._revoked, self._seen = context, revoked_serials(crl), key
        log.info("revocation list loaded: %d certificate(s) revoked", len(self._revoked))

    def select(self, connection: ssl.SSLObject, _name: str | None, _: ssl.SSLContext) -> None:
        """The SNI callback: this handshake uses the current context."""
        connection.context = self.refresh()

    def serials(self) -> frozenset[int]:
        """The serials on the newest good list (re-read first if it changed)."""
        self.refresh()
        return self._revoked

    def revoked_sites(self, serials: Mapping[str, int]) -> list[str]:
        """Of the sites with the serials they last connected with, those now on the list
        (re-read first if it changed)."""
        self.refresh()
        return sorted(site for site, serial in serials.items() if serial in self._revoked)


def serial_of(peercert: Mapping[str, object]) -> int | None:
    """The serial number in :meth:`ssl.SSLSocket.getpeercert`'s dict (a hex string)."""
    value = peercert.get("serialNumber")
    return int(value, 16) if isinstance(value, str) else None


class CertificateBook:
    """The certificates peers connect with, collected by the protocol (on the event
    loop) and written to the store by the ticker (off it), once per new certificate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], int] = {}
        self._new: list[SeenCertificate] = []

    def note(self, peer: Peer, peercert: Mapping[str, object]) -> None:
        serial, expiry = serial_of(peercert), peercert.get("notAfter")
        if serial is None or not isinstance(expiry, str):
            return
        with self._lock:
            if self._known.get((peer.name, peer.role)) == serial:
                return
            self._known[(peer.name, peer.role)] = serial
            self._new.append(
                SeenCertificate(
                    peer.name, peer.role, serial, ssl.cert_time_to_seconds(expiry), time.time()
                )
            )

    def take_new(self) -> list[SeenCertificate]:
        with self._lock:
            new, self._new = self._new, []
            return new

    def site_serials(self) -> dict[str, int]:
        """The serial each site last connected with (what revocation checks against)."""
        with self._lock:
            return {
                name: serial for (name, role), serial in self._known.items() if role == ROLE_SITE
            }
