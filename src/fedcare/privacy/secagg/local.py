"""One secure round with every party in this process: the simulation's and the tests' driver.

The messages are the same objects the network carries; dropouts are sites that
stop answering after a given stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedcare import pki
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentityVerifier
from fedcare.privacy.secagg.server import SecAggServer
from fedcare.privacy.secagg.session import RoundSetup


class DropAt(StrEnum):
    """The first stage a dropped site no longer answers."""

    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"


@dataclass(frozen=True)
class Identities:
    """Per-site identity keys and certificates from a throwaway consortium CA."""

    signers: dict[str, EcdsaSigner]
    verifier: IdentityVerifier


def make_identities(sites: Sequence[str], consortium: str = "simulation") -> Identities:
    """A CA and one certificate per site, made in memory for an in-process federation."""
    ca = pki.make_ca(consortium)
    signers = {}
    for site in sites:
        issued = pki.issue_client_cert(ca, consortium, site)
        signers[site] = EcdsaSigner(issued.key, issued.cert)
    return Identities(signers=signers, verifier=IdentityVerifier(ca.cert))


def run_local_round(
    setup: RoundSetup,
    inputs: Mapping[str, NDArray[np.unsignedinteger]],
    identities: Identities,
    drops: Mapping[str, DropAt] | None = None,
) -> tuple[NDArray[np.unsignedinteger], tuple[str, ...]]:
    """The unmasked sum of the surviving sites' inputs, and who they are.

    Sites in ``setup.sites`` without an input never answer at all. Raises
    :class:`SecAggFailedError` when the round cannot complete.
    """
    drops = dict(drops or {})
    server = SecAggServer(setup)
    clients = {
        site: SecAggClient(
            setup,
            site,
            identities.signers[site],
            identities.signers[site].certificate_pem,
            identities.verifier,
        )
        for site in setup.sites
        if site in inputs
    }

    def active(stage: DropAt) -> list[str]:
        order = list(DropAt)
        return [s for s in clients if s not in drops or order.index(drops[s]) > order.index(stage)]

    for client in clients.values():
        server.receive_advertisement(client.advertise())
    server.close_advertising()
    for site in active(DropAt.SHARE_KEYS):
        server.receive_shares(clients[site].share_keys(server.advertisements_for(site)))
    server.close_sharing()
    for site in active(DropAt.MASKED_INPUT):
        server.receive_masked(
            site, clients[site].masked_input(server.shares_for(site), inputs[site])
        )
    request = server.close_masking()
    for site in active(DropAt.UNMASK):
        server.receive_unmask(clients[site].unmask(request))
    return server.finish(), request.survivors
