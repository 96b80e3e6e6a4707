"""Identities for an in-process federation, and one secure session over raw inputs.

The session runs through :func:`fedcare.privacy.secagg.protocol.run_session`, the
same stage sequence the simulation and the network drive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from numpy.typing import NDArray

from fedcare import pki
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentityVerifier
from fedcare.privacy.secagg.protocol import ClientParty, Party, ServerSession, Stage, run_session
from fedcare.privacy.secagg.session import RoundSetup


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


def client_for(setup: RoundSetup, site: str, identities: Identities) -> SecAggClient:
    """A fresh client for ``site`` signing with its identity."""
    signer = identities.signers[site]
    return SecAggClient(setup, site, signer, signer.certificate_pem, identities.verifier)


def parties_for(
    setup: RoundSetup, inputs: Mapping[str, NDArray[np.unsignedinteger]], identities: Identities
) -> dict[str, Party]:
    """A party per site with an input; sites without one never answer."""

    return {
        site: ClientParty(client_for(setup, site, identities), partial(_fixed, inputs[site]))
        for site in setup.sites
        if site in inputs
    }


def _fixed(
    encoded: NDArray[np.unsignedinteger],
) -> tuple[NDArray[np.unsignedinteger], float | None]:
    return encoded, None


def run_local_round(
    setup: RoundSetup,
    inputs: Mapping[str, NDArray[np.unsignedinteger]],
    identities: Identities,
    drops: Mapping[str, Stage] | None = None,
) -> tuple[NDArray[np.unsignedinteger], tuple[str, ...]]:
    """The unmasked sum of the surviving sites' inputs, and who they are.

    Sites in ``setup.sites`` without an input never answer at all; a site in
    ``drops`` stops answering from that stage on. Raises
    :class:`SecAggFailedError` when the session cannot complete.
    """
    return run_session(
        ServerSession(setup, identities.verifier), parties_for(setup, inputs, identities), drops
    )
