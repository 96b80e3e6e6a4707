"""A site's secure rounds over the network: SecAgg+ messages through the coordinator.

The update is trained and kept here; what leaves is the signed key
advertisement, the sealed shares, the masked input and, for the unmasking
step, shares of other sites' secrets. Every fetch long-polls the coordinator.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError

from fedcare import pki
from fedcare.audit import AuditLog
from fedcare.config import SiteConfig
from fedcare.federation.messages import TaskReply
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentityVerifier, SecAggError
from fedcare.privacy.secagg.messages import EncryptedShare, KeyAdvertisement, UnmaskRequest
from fedcare.privacy.secagg.site import SecureSite
from fedcare.privacy.secagg.study import setup_for
from fedcare.site.client import PAYLOAD, CoordinatorClient, CoordinatorError
from fedcare.site.worker import SiteWorker

log = logging.getLogger("fedcare.site")
T = TypeVar("T")
JSON = "application/json"
_ADVERTS = TypeAdapter(tuple[KeyAdvertisement, ...])
_SHARES = TypeAdapter(tuple[EncryptedShare, ...])


class Retry(Protocol):
    def __call__(self, call: Callable[[], T], what: str) -> T:
        """Run ``call``, retrying network failures."""
        ...


def secure_site(config: SiteConfig, worker: SiteWorker) -> SecureSite:
    """The site's secure side, signing with its provisioned certificate key."""
    cert = pki.load_certificate(config.tls.cert)
    signer = EcdsaSigner(pki.load_private_key(config.tls.key), cert)
    verifier = IdentityVerifier(pki.load_certificate(config.tls.ca))
    return SecureSite(worker, signer, signer.certificate_pem, verifier)


def take_part(
    client: CoordinatorClient,
    site: SecureSite,
    reply: TaskReply,
    n_params: int,
    retry: Retry,
    audit: AuditLog,
) -> bool:
    """Run one secure round for a task. False if this site did not complete it: the round
    moved on (409: closed, failed, or the coordinator restarted it), or this site refused
    something an honest site must refuse (recorded in its audit trail)."""
    try:
        _exchange(client, site, reply, n_params, retry, audit)
    except CoordinatorError as exc:
        if exc.status != 409:
            raise
        log.warning("round %d: secure round not completed: %s", reply.round, exc.detail)
        return False
    except (SecAggError, ValidationError) as exc:
        # Includes malformed relays from the coordinator: the site sits the round out.
        log.error("round %d: refused in secure aggregation: %s", reply.round, exc)
        study_hash = site.worker.study.content_hash
        audit.append("secagg.refused", study=study_hash, round=reply.round, reason=str(exc))
        return False
    return True


def _exchange(
    client: CoordinatorClient,
    site: SecureSite,
    reply: TaskReply,
    n_params: int,
    retry: Retry,
    audit: AuditLog,
) -> None:
    study = site.worker.study
    study_hash = study.content_hash
    number = reply.round
    status = retry(partial(client.status, study_hash), "fetching the round")
    open_round = status.get("open_round") or {}
    if open_round.get("number") != number:
        raise CoordinatorError(409, f"round {number} is no longer open")
    setup = setup_for(study, number, list(open_round["selected"]), n_params)

    def post(stage: str, body: bytes, content_type: str = JSON) -> None:
        retry(
            partial(client.secure_post, study_hash, number, stage, body, content_type),
            f"sending {stage} for round {number}",
        )

    def fetch(stage: str) -> bytes:
        while True:
            data = retry(
                partial(client.secure_fetch, study_hash, number, stage),
                f"waiting for {stage} of round {number}",
            )
            if data is not None:
                return data

    post("advertise", site.begin(reply.payload, setup).model_dump_json().encode())
    bundle = site.share_keys(_ADVERTS.validate_json(fetch("keys")))
    post("shares", bundle.model_dump_json().encode())
    masked = site.masked_input(_SHARES.validate_json(fetch("shares")))
    # Recorded before the first byte leaves: a crash can only over-report.
    audit.append(
        "update.sent",
        study=study_hash,
        round=number,
        to="coordinator (masked, secure aggregation)",
        bytes=len(masked),
        sha256=hashlib.sha256(masked).hexdigest(),
    )
    post("masked", masked, PAYLOAD)
    request = UnmaskRequest.model_validate_json(fetch("unmask"))
    post("unmask", site.unmask(request).model_dump_json().encode())
    log.info("round %d: masked input sent, %d site(s) summed", number, len(request.survivors))
