"""Secure rounds in one process: every site and the coordinator exchange SecAgg+ messages.

The messages are the objects the network carries (the masked input as its
encoded bytes). The round receives only the unmasked sum; sites that are
offline never answer, as if they had dropped before advertising keys.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from fedcare.federation.rounds import Round, SummedUpdate
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.local import make_identities
from fedcare.privacy.secagg.quantize import decode_sum
from fedcare.privacy.secagg.server import SecAggServer
from fedcare.privacy.secagg.site import SecureSite
from fedcare.privacy.secagg.study import quantization_for, setup_for
from fedcare.privacy.secagg.wire import decode_masked
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
    setup = setup_for(study, round_.number, round_.selected, n_params)
    server = SecAggServer(setup)
    active = [s for s in round_.selected if s not in offline]
    losses: dict[str, float] = {}
    try:
        for name in active:
            server.receive_advertisement(sites[name].begin(task, setup))
        server.close_advertising()
        for name in server.advertised:
            server.receive_shares(sites[name].share_keys(server.advertisements_for(name)))
        server.close_sharing()
        for name in server.shared:
            payload = sites[name].masked_input(server.shares_for(name))
            header, masked = decode_masked(payload, setup.length, setup.bits)
            if header.site != name:
                raise SecAggError(f"site '{name}' sent a masked input labelled '{header.site}'")
            server.receive_masked(name, masked)
            losses[name] = header.loss
        request = server.close_masking()
        for name in request.survivors:
            server.receive_unmask(sites[name].unmask(request))
        total = server.finish()
    except SecAggError as exc:
        round_.fail(f"secure aggregation failed: {exc}")
        return
    weighted, weight_sum = decode_sum(total, quantization_for(study))
    round_.submit_sum(
        SummedUpdate(
            participants=request.survivors,
            weighted_sum=weighted,
            weight_sum=weight_sum,
            mean_loss=statistics.fmean(losses[s] for s in request.survivors),
        )
    )
