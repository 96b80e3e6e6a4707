"""Mutual TLS for the coordinator: who is on the other end of a connection.

uvicorn verifies the client certificate during the handshake (``CERT_REQUIRED``
against the consortium CA only) but does not pass it to the application. This
protocol class reads the verified peer certificate when the connection is made
and puts the peer (its role, site or operator, and its name, both from the
certificate subject) into the per-request state, where the endpoints read it.
"""

from __future__ import annotations

import asyncio
import ssl

from uvicorn.protocols.http.h11_impl import H11Protocol

from fedcare.pki import Peer, PkiError, peer_from_peercert

PEER_KEY = "peer"


class PeerIdentityProtocol(H11Protocol):
    """HTTP/1.1 protocol that records the authenticated peer for every request."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        peer: Peer | None
        try:
            peer = peer_from_peercert(peercert) if peercert else None
        except PkiError:
            # A CA-issued certificate that names no valid peer (the coordinator's own,
            # say) authenticates nobody; the endpoints answer 401.
            peer = None
        # app_state is copied into each request's scope["state"]; a per-connection
        # copy keeps one connection's identity out of every other's.
        self.app_state = {**self.app_state, PEER_KEY: peer}
