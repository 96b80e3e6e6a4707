"""Secure rounds in one process: every site and the coordinator exchange SecAgg+ messages.

The session runs through :func:`fedcare.privacy.secagg.protocol.run_session`, the
stage sequence the network drives too, with every message in its wire form. The
round receives only the unmasked sum; sites that are offline never answer, as if
they had dropped before advertising keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from fedcare.federation.rounds import Round
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.local import make_identities
from fedcare.privacy.secagg.protocol import Party, ServerSession, run_session
from fedcare.privacy.secagg.site import SecureSite
from fedcare.privacy.secagg.study import secure_sum, setup_for
from fedcare.site.worker import SiteWorker
from fedcare.study import Study


def secure_sites(workers: Mapping[str, SiteWorker]) -> dict[str, SecureSite]:
    """Each worker as a secure site, with identity certificates from an in-memory CA."""
    ids = make_identities(sorted(workers))
    return {
        name: SecureSite(worker, ids.signers[name], ids.signers[name].certificate_pem, ids.verifier)
        for name, worker in workers.items()
    }


def run_secure_round(
    study: Study,
    round_: Round,
    task: bytes,
    sites: Mapping[str, SecureSite],
    n_params: int,
    offline: frozenset[str] = frozenset(),
) -> None:
    """Run SecAgg+ for ``round_``: it gets the survivors' sum, or fails with the reason."""
    setup = setup_for(
        study, round_.number, round_.selected, n_params, hashlib.sha256(task).hexdigest()
    )
    session = ServerSession(setup)
    try:
        parties: dict[str, Party] = {
            name: sites[name].start(task, setup) for name in round_.selected if name not in offline
        }
        total, survivors = run_session(session, parties)
    except SecAggError as exc:
        round_.fail(f"secure aggregation failed: {exc}")
        return
    round_.submit_sum(secure_sum(study, total, survivors, session.losses))
