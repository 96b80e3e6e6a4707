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

from pydantic import ValidationError

from fedcare import pki
from fedcare.audit import AuditLog
from fedcare.config import SiteConfig
from fedcare.federation.messages import TaskReply
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentityVerifier, SecAggError
from fedcare.privacy.secagg.protocol import STAGES, Stage
from fedcare.privacy.secagg.site import SecureSite, SessionRecord
from fedcare.privacy.secagg.study import setup_for
from fedcare.site.client import PAYLOAD, CoordinatorClient, CoordinatorError
from fedcare.site.worker import SiteWorker

log = logging.getLogger("fedcare.site")
T = TypeVar("T")
JSON = "application/json"


class Retry(Protocol):
    def __call__(self, call: Callable[[], T], what: str) -> T:
        """Run ``call``, retrying network failures."""
        ...


def secure_site(config: SiteConfig, worker: SiteWorker, record: SessionRecord) -> SecureSite:
    """The site's secure side, signing with its provisioned certificate key; ``record``
    keeps, durably, the tasks it sent masked inputs for."""
    cert = pki.load_certificate(config.tls.cert)
    signer = EcdsaSigner(pki.load_private_key(config.tls.key), cert)
    verifier = IdentityVerifier(pki.load_certificate(config.tls.ca))
    return SecureSite(worker, signer, signer.certificate_pem, verifier, record)


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
    task_sha256 = hashlib.sha256(reply.payload).hexdigest()
    setup = setup_for(study, number, list(open_round["selected"]), n_params, task_sha256)

    def post(stage: Stage, body: bytes) -> None:
        content_type = PAYLOAD if stage is Stage.MASKED else JSON
        retry(
            partial(client.secure_post, study_hash, number, stage.value, body, content_type),
            f"sending {stage} for round {number}",
        )

    def fetch(stage: Stage) -> bytes:
        while True:
            data = retry(
                partial(client.secure_fetch, study_hash, number, stage.value),
                f"waiting for the coordinator before {stage} of round {number}",
            )
            if data is not None:
                return data

    def record_send(body: bytes) -> None:
        # Recorded before the first byte leaves: a crash can only over-report.
        audit.append(
            "update.sent",
            study=study_hash,
            round=number,
            to="coordinator (masked, secure aggregation)",
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
        )

    party = site.start(reply.payload, setup, on_masked=record_send)
    for stage in STAGES:
        relayed = None if stage is Stage.ADVERTISE else fetch(stage)
        post(stage, party.respond(stage, relayed))
    log.info("round %d: secure session completed", number)
