"""A site's part in a secure session: train as usual, then take part in SecAgg+.

The update never leaves the site in the clear: it is clipped, weighted,
quantised and masked here, and only the masked vector is sent. A site takes
part in at most one session per task: a second session over the same update
(after a coordinator restart, say) would let the coordinator subtract two sums
over different survivors and recover this site's update.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedcare import pki
from fedcare.config import SiteConfig
from fedcare.federation.messages import SiteUpdate
from fedcare.ids import derive_seed
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentitySigner, IdentityVerifier, SecAggError
from fedcare.privacy.secagg.protocol import ClientParty
from fedcare.privacy.secagg.quantize import encode
from fedcare.privacy.secagg.session import RoundSetup
from fedcare.privacy.secagg.study import quantization_for, site_weight
from fedcare.site.worker import SiteWorker


class SessionRecord(Protocol):
    """Where a site records, durably, each task it sent a masked input for."""

    def masked_sent(self, study_hash: str, task_sha256: str) -> bool:
        """True if a masked input for this task has already left the site."""
        ...

    def record_masked(self, study_hash: str, task_sha256: str, session: str) -> bool:
        """Record the send before it happens; False if one was recorded already."""
        ...


class MemorySessionRecord:
    """:class:`SessionRecord` for one process (simulations)."""

    def __init__(self) -> None:
        self._sent: dict[tuple[str, str], str] = {}

    def masked_sent(self, study_hash: str, task_sha256: str) -> bool:
        return (study_hash, task_sha256) in self._sent

    def record_masked(self, study_hash: str, task_sha256: str, session: str) -> bool:
        if (study_hash, task_sha256) in self._sent:
            return False
        self._sent[(study_hash, task_sha256)] = session
        return True


def already_sent(task_sha256: str) -> str:
    return (
        f"refused: a masked input for task {task_sha256[:12]} already left this site; a "
        "second secure session over the same update would let the coordinator difference "
        "two sums (the coordinator must issue a new task)"
    )


@dataclass(frozen=True)
class TrainedUpdate:
    """An update trained at the site and kept there until a secure session takes it."""

    task_sha256: str
    round: int
    """The round of the task it was trained on."""
    seed: int
    update: SiteUpdate


class SecureSite:
    """One site across secure sessions; one :class:`SecAggClient` per session."""

    def __init__(
        self,
        worker: SiteWorker,
        signer: IdentitySigner,
        certificate_pem: str,
        verifier: IdentityVerifier,
        record: SessionRecord | None = None,
    ) -> None:
        self.worker = worker
        self.signer = signer
        self.certificate_pem = certificate_pem
        self.verifier = verifier
        self.record: SessionRecord = record if record is not None else MemorySessionRecord()
        self.plan = quantization_for(worker.study)
        # Refuse at once, not in the middle of a round, if this site's weight cannot fit.
        site_weight(worker.study, worker.data.n_train)
        self.train_s = 0.0

    @property
    def name(self) -> str:
        return self.worker.data.name

    def train(self, task_bytes: bytes) -> TrainedUpdate:
        """Train on a task and keep the update here (its ledger entry is written first)."""
        study_hash = self.worker.study.content_hash
        task_sha256 = hashlib.sha256(task_bytes).hexdigest()
        if self.record.masked_sent(study_hash, task_sha256):
            raise SecAggError(already_sent(task_sha256))
        started = time.perf_counter()
        task, update = self.worker.train(task_bytes)
        self.train_s = time.perf_counter() - started
        return TrainedUpdate(task_sha256, task.header.round, task.header.seed, update)

    def join(
        self,
        trained: TrainedUpdate,
        setup: RoundSetup,
        weight_factor: float = 1.0,
        on_masked: Callable[[bytes], None] | None = None,
    ) -> ClientParty:
        """The party that brings ``trained`` into one session, its weight scaled by
        ``weight_factor`` (an asynchronous update's staleness factor, in (0, 1]).

        ``on_masked`` sees the masked input after the send is recorded, before it
        leaves (the site agent writes its audit entry there)."""
        study_hash = self.worker.study.content_hash
        if setup.study_hash != study_hash:
            raise SecAggError("the secure round is for another study")
        if not 0.0 < weight_factor <= 1.0:
            raise SecAggError(f"a weight factor of {weight_factor} is outside (0, 1]")
        if self.record.masked_sent(study_hash, trained.task_sha256):
            raise SecAggError(already_sent(trained.task_sha256))
        rounding = derive_seed(trained.seed, self.name, "secagg-rounding")
        client = SecAggClient(setup, self.name, self.signer, self.certificate_pem, self.verifier)

        def source() -> tuple[NDArray[np.unsignedinteger], float | None]:
            return self._encode(trained.update, rounding, weight_factor), trained.update.header.loss

        def before_masked(body: bytes) -> None:
            if not self.record.record_masked(study_hash, trained.task_sha256, setup.session):
                raise SecAggError(already_sent(trained.task_sha256))
            if on_masked is not None:
                on_masked(body)

        return ClientParty(client, source, before_masked)

    def start(
        self,
        task_bytes: bytes,
        setup: RoundSetup,
        on_masked: Callable[[bytes], None] | None = None,
    ) -> ClientParty:
        """A synchronous round: train on the task and join its session (the one for this
        very task)."""
        if setup.study_hash != self.worker.study.content_hash:
            raise SecAggError("the secure round is for another study")
        if setup.task_sha256 != hashlib.sha256(task_bytes).hexdigest():
            raise SecAggError("the secure session is for another task than the one received")
        trained = self.train(task_bytes)
        if trained.round != setup.round:
            raise SecAggError(f"the task is for round {trained.round}, not {setup.round}")
        return self.join(trained, setup, on_masked=on_masked)

    def _encode(self, update: SiteUpdate, seed: int, factor: float) -> NDArray[np.unsignedinteger]:
        weight = site_weight(self.worker.study, update.header.n_samples) * factor
        return encode(update.delta, weight, self.plan, np.random.default_rng(seed))


def secure_site(
    config: SiteConfig,
    worker: SiteWorker,
    record: SessionRecord,
    revoked: Callable[[], Collection[int]] = frozenset,
) -> SecureSite:
    """The site's secure side, signing with its provisioned certificate key; ``record``
    keeps, durably, the tasks it sent masked inputs for; ``revoked`` gives the serials
    the consortium CA revoked (peers holding them are refused)."""
    cert = pki.load_certificate(config.tls.cert)
    signer = EcdsaSigner(pki.load_private_key(config.tls.key), cert)
    verifier = IdentityVerifier(pki.load_certificate(config.tls.ca), revoked=revoked)
    return SecureSite(worker, signer, signer.certificate_pem, verifier, record)
