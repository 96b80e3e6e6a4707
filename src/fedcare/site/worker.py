"""A site's handling of one round: decode the task, train locally, encode the update.

It also validates candidate releases: decode the model, report on held-out data,
check the study's and the site's own gates, encode the reply.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedcare.drift.alignment import cosine, log_loss
from fedcare.federation.messages import (
    RoundAlignment,
    SiteUpdate,
    Task,
    UpdateHeader,
    decode_task,
    encode_update,
)
from fedcare.federation.rounds import RoundError
from fedcare.ids import derive_seed
from fedcare.privacy.dp.counts import bucket, noisy_count
from fedcare.privacy.dp.guard import PrivacyGuard, dp_settings
from fedcare.privacy.dp.plan import SitePlan, needs_count, plan_site
from fedcare.site.dataset import SiteDataset
from fedcare.site.validation import validate_candidate
from fedcare.study import PersonalizationMethod, Study
from fedcare.training import predict_proba, train_local
from fedcare.training.batched import SharedRound
from fedcare.training.dp_sgd import DpSgdSettings
from fedcare.training.personal import local_positions, train_personal, with_local
from fedcare.validation.messages import (
    ValidationReply,
    ValidationTaskHeader,
    decode_validation_task,
    encode_validation_reply,
)
from fedcare.validation_spec import GateSpec

MAX_REPORTED_COUNT = 10**9
"""Upper clamp of a noisy count sent in the clear (plain aggregation)."""


@dataclass(frozen=True)
class CandidateValidation:
    """A candidate release as this site validated it."""

    header: ValidationTaskHeader
    params: NDArray[np.float32]
    reply: ValidationReply


class SiteWorker:
    """Turns a task payload into an update payload for one site and one study."""

    def __init__(
        self,
        study: Study,
        data: SiteDataset,
        n_params: int,
        site_gates: Sequence[GateSpec] = (),
        min_cohort: int = 1,
        *,
        privacy: PrivacyGuard | None = None,
        shared: SharedRound | None = None,
        noise_seed: int | None = None,
    ) -> None:
        """``site_gates`` and ``min_cohort`` come from the site's policy and govern its
        validation reports. ``privacy``: the site's ledger and budget. Without it a DP
        study still trains with DP-SGD (fresh secret seed each round) but nothing is
        recorded: for simulations and benchmarks, never for a site agent. ``shared``:
        in a simulation, the sites' training batched across sites (this site joins it).
        ``noise_seed``: without a guard, each round's DP secret seed is derived from it, the
        site and the round instead of drawn fresh, so a privacy-utility sweep gives the same
        table wherever its runs execute; never for a site agent, whose seeds are secret."""
        if noise_seed is not None and privacy is not None:
            raise ValueError("a site with a privacy ledger draws its DP seeds from the ledger")
        if data.n_train > study.aggregation.max_records:
            # Refused here, at start, not by the coordinator in the middle of a round.
            raise RoundError(
                f"site '{data.name}' has {data.n_train} training records; study "
                f"{study.name} allows at most {study.aggregation.max_records} "
                "(aggregation.max_records)"
            )
        self.study = study
        self.data = data
        self.n_params = n_params
        self.site_gates = tuple(site_gates)
        self.min_cohort = min_cohort
        self.privacy = privacy
        self.noise_seed = noise_seed
        self._plan: SitePlan | None = None
        # A site with a ledger is admitted when it is asked, so it trains on its own.
        self.shared = shared if privacy is None else None
        if self.shared is not None:
            dp = self._simulated_dp if study.privacy.dp else None
            self.shared.register(data.name, data.x_train, data.y_train, dp)
        self._last: tuple[int, NDArray[np.float32], NDArray[np.float32]] | None = None
        self.alignment: RoundAlignment | None = None
        """The last update's alignment with the consortium's step, until it is sent."""
        self._noisy_count: int | None = None
        self.personal: NDArray[np.float32] | None = None
        """Ditto's personal model, or under FedBN the site's last trained model (whose
        normalisation layers are its own), after the last round this site trained; it
        stays here."""

    def _check_study(self, study_hash: str) -> None:
        if study_hash != self.study.content_hash:
            raise RoundError(
                f"site '{self.data.name}' refuses a task for study {study_hash[:12]}; "
                f"it runs study {self.study.content_hash[:12]}"
            )

    def _align(self, task: Task) -> None:
        """Before training on a later model: how this site's last update relates to the
        step the consortium took from the model it was trained on (docs/drift.md); only
        for a study that monitors drift (nothing else reads it)."""
        if self.study.monitoring is None:
            return
        if self._last is None or task.header.round <= self._last[0]:
            return
        number, start, delta = self._last
        similarity = cosine(delta, task.params - start)
        if similarity is None:
            return
        loss = None
        cohort = max(self.min_cohort, self.study.disclosure.min_cohort_size)
        # Under DP only what DP-SGD released may leave; the loss on raw rows is not that.
        if not self.study.privacy.dp and self.data.n_test >= cohort:
            scores = predict_proba(self.study.model, task.params, self.data.x_test)
            loss = log_loss(self.data.y_test, scores)
        self.alignment = RoundAlignment(
            study_hash=self.study.content_hash,
            site=self.data.name,
            round=number,
            cosine=similarity,
            loss=loss,
        )

    def handle(self, task_bytes: bytes) -> bytes:
        """Train on local data from the task's global model; return the encoded delta."""
        return encode_update(self.train(task_bytes)[1])

    def train(self, task_bytes: bytes) -> tuple[Task, SiteUpdate]:
        """The decoded task and this site's update for it (kept local under secure aggregation)."""
        task = decode_task(task_bytes, self.n_params)
        self._check_study(task.header.study_hash)
        self._align(task)
        reported = self.reported_count()
        spec = self.study.personalization
        fedbn = spec is not None and spec.method is PersonalizationMethod.FEDBN
        start = with_local(self.study, task.params, self.personal) if fedbn else task.params
        if self.shared is not None and not fedbn:
            result = self.shared.train(self.data.name, start, task.header.seed, task.header.round)
        else:
            dp = self._dp(task.header.round, task_bytes)
            result = train_local(
                self.study.model,
                self.study.training,
                start,
                self.data.x_train,
                self.data.y_train,
                seed=derive_seed(task.header.seed, self.data.name),
                dp=dp,
            )
        delta = result.params - task.params
        if fedbn:
            # The normalisation layers stay here: nothing of them is in the update.
            self.personal = result.params
            delta = np.where(local_positions(self.study), np.float32(0), delta).astype(np.float32)
        update = SiteUpdate(
            header=UpdateHeader(
                study_hash=self.study.content_hash,
                round=task.header.round,
                site=self.data.name,
                n_samples=reported,
                # Under DP the loss is computed from the rows without noise: it stays here.
                loss=None if self.study.privacy.dp else result.loss,
            ),
            delta=delta,
        )
        self._last = (task.header.round, task.params, update.delta)
        if spec is not None and spec.method is PersonalizationMethod.DITTO:
            self.personal = train_personal(
                self.study,
                spec,
                task.params if self.personal is None else self.personal,
                self.data.x_train,
                self.data.y_train,
                seed=derive_seed(task.header.seed, f"{self.data.name}/personal"),
                anchor=task.params,
            )
        return task, update

    def personal_model(self, final_global: NDArray[np.float32]) -> NDArray[np.float32] | None:
        """This site's personal model once the study has finished: fine-tuned from
        ``final_global``, Ditto's, or ``final_global`` with this site's normalisation
        layers (FedBN); None without personalisation (or if this site never trained a
        Ditto or FedBN round)."""
        spec = self.study.personalization
        if spec is None:
            return None
        if spec.method is PersonalizationMethod.DITTO:
            return self.personal
        if spec.method is PersonalizationMethod.FEDBN:
            return (
                None
                if self.personal is None
                else with_local(self.study, final_global, self.personal)
            )
        return train_personal(
            self.study,
            spec,
            final_global,
            self.data.x_train,
            self.data.y_train,
            seed=derive_seed(self.study.seed, f"{self.data.name}/finetune"),
        )

    def validate(self, task_bytes: bytes) -> bytes:
        """Validate a candidate release on held-out data; return the encoded report and verdict."""
        return encode_validation_reply(self.validation(task_bytes).reply)

    def validation(self, task_bytes: bytes) -> CandidateValidation:
        """Validate a candidate release on held-out data: the candidate and the reply."""
        header, params = decode_validation_task(task_bytes, self.n_params)
        self._check_study(header.study_hash)
        spec = self.study.personalization
        if spec is not None and spec.method is PersonalizationMethod.FEDBN:
            # Under FedBN a site runs the shared model with its own normalisation layers:
            # that is what it validates (the candidate's own are untrained).
            params = with_local(self.study, params, self.personal)
        reply = validate_candidate(
            self.study, self.data, header, params, self.site_gates, self.min_cohort
        )
        return CandidateValidation(header, params, reply)

    def reported_count(self) -> int:
        """The record count this site reports (docs/privacy.md): under DP a noisy count,
        released once (1, releasing nothing, when sites are weighted equally); a public
        bucket under secure aggregation; else the exact count."""
        n = self.data.n_train
        study = self.study
        secure = study.secure_aggregation
        largest = secure.max_records if secure.enabled else MAX_REPORTED_COUNT
        if study.privacy.dp and not needs_count(study):
            return 1
        if study.privacy.dp:
            # Released once: the ledger returns the same value for the same rows anyway.
            if self._noisy_count is None:
                if self.privacy is not None:
                    self._noisy_count = self.privacy.count(
                        study,
                        n,
                        self.data.fingerprint,
                        self.data.preprocessor.model_dump_json(),
                        largest,
                    )
                else:
                    seed = self._simulated_seed("dp-count", 0)
                    self._noisy_count = noisy_count(n, study.privacy.count_noise, seed, largest)
            return self._noisy_count
        if secure.enabled:
            return bucket(n)
        return n

    def _dp(self, round_number: int, task_bytes: bytes) -> DpSgdSettings | None:
        """This round's DP-SGD settings; with a guard, recorded in the ledger first (or refused)."""
        if self.privacy is not None:
            return self.privacy.admit(
                self.study,
                self.data.n_train,
                round_number,
                task_bytes,
                self.data.fingerprint,
                self.data.preprocessor.model_dump_json(),
            )
        if not self.study.privacy.dp:
            return None
        return self._simulated_dp(round_number)

    def _simulated_dp(self, round_number: int) -> DpSgdSettings:
        """A round's DP-SGD settings for a site without a ledger (a simulation's)."""
        if self._plan is None:
            self._plan = plan_site(self.study, self.data.n_train)
        return dp_settings(self._plan, self._simulated_seed("dp-noise", round_number))

    def _simulated_seed(self, purpose: str, round_number: int) -> int:
        """A DP secret seed without a ledger: fresh, or derived from ``noise_seed``."""
        if self.noise_seed is None:
            return secrets.randbits(63)
        return derive_seed(self.noise_seed, purpose, self.data.name, round_number)
