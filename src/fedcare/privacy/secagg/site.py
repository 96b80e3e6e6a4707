"""A site's part in a secure round: train as usual, then take part in SecAgg+.

The update never leaves the site in the clear: it is clipped, weighted,
quantised and masked here, and only the masked vector is sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from fedcare.federation.engine import derive_seed
from fedcare.federation.messages import SiteUpdate
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.keys import IdentitySigner, IdentityVerifier, SecAggError
from fedcare.privacy.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    ShareBundle,
    UnmaskReply,
    UnmaskRequest,
)
from fedcare.privacy.secagg.quantize import encode
from fedcare.privacy.secagg.session import RoundSetup
from fedcare.privacy.secagg.study import quantization_for, site_weight
from fedcare.privacy.secagg.wire import MaskedHeader, encode_masked
from fedcare.site.worker import SiteWorker


class SecureSite:
    """One site across secure rounds; one :class:`SecAggClient` per round."""

    def __init__(
        self,
        worker: SiteWorker,
        signer: IdentitySigner,
        certificate_pem: str,
        verifier: IdentityVerifier,
    ) -> None:
        self.worker = worker
        self.signer = signer
        self.certificate_pem = certificate_pem
        self.verifier = verifier
        self.plan = quantization_for(worker.study)
        # Refuse at once, not in the middle of a round, if this site's weight cannot fit.
        site_weight(worker.study, worker.data.n_train)
        self._client: SecAggClient | None = None
        self._update: SiteUpdate | None = None
        self._seed = 0
        self.train_s = 0.0

    @property
    def name(self) -> str:
        return self.worker.data.name

    def begin(self, task_bytes: bytes, setup: RoundSetup) -> KeyAdvertisement:
        """Train on the task, keep the update here, and advertise this round's keys."""
        if setup.study_hash != self.worker.study.content_hash:
            raise SecAggError("the secure round is for another study")
        started = time.perf_counter()
        task, update = self.worker.train(task_bytes)
        self.train_s = time.perf_counter() - started
        if task.header.round != setup.round:
            raise SecAggError(f"the task is for round {task.header.round}, not {setup.round}")
        self._update = update
        self._seed = derive_seed(task.header.seed, self.name, "secagg-rounding")
        self._client = SecAggClient(
            setup, self.name, self.signer, self.certificate_pem, self.verifier
        )
        return self._client.advertise()

    def _current(self) -> SecAggClient:
        if self._client is None:
            raise SecAggError(f"site '{self.name}' has no secure round in progress")
        return self._client

    def share_keys(self, advertisements: Sequence[KeyAdvertisement]) -> ShareBundle:
        return self._current().share_keys(advertisements)

    def masked_input(self, shares: Sequence[EncryptedShare]) -> bytes:
        """The encoded masked input: the only form in which this site's update leaves it."""
        client = self._current()
        assert self._update is not None
        weight = site_weight(self.worker.study, self._update.header.n_samples)
        encoded = encode(self._update.delta, weight, self.plan, np.random.default_rng(self._seed))
        masked = client.masked_input(shares, encoded)
        header = MaskedHeader(
            study_hash=client.setup.study_hash,
            round=client.setup.round,
            site=self.name,
            bits=client.setup.bits,
            loss=self._update.header.loss,
        )
        return encode_masked(header, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        return self._current().unmask(request)
