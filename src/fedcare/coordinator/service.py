"""One study at the coordinator: the shared round logic, made durable.

:class:`StudyCoordinator` wraps :class:`fedcare.federation.engine.Federation`
(the same class the simulation drives) with the SQL store, so every transition
is committed before it is acted on. It knows nothing about HTTP; the web layer
calls it and maps its exceptions to status codes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fedcare.aggregation import make_server_optimizer
from fedcare.audit import AuditLog, JsonInput
from fedcare.coordinator.secure import SecureRelay
from fedcare.coordinator.store import SqlStore, StoredRound, sha256_hex
from fedcare.federation.engine import Federation
from fedcare.federation.messages import (
    SHA256_HEX,
    SiteUpdate,
    Task,
    TaskReply,
    TaskState,
    decode_update,
    encode_task,
)
from fedcare.federation.rounds import Round, RoundError, RoundStatus
from fedcare.models.builders import initial_parameters
from fedcare.models.wire import decode, encode
from fedcare.releases.desk import ReleaseDesk
from fedcare.releases.registry import ReleaseRegistry
from fedcare.study import Study
from fedcare.validation.gates import Verdict


class ForbiddenError(PermissionError):
    """A caller acting outside its identity or its study membership."""


class ConflictError(RoundError):
    """An update for a round that is not open: late, replayed or premature."""


class ModelHeader(BaseModel):
    """Header of a stored or served global model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=0)


class OpenRoundView(BaseModel):
    number: int
    status: str
    selected: list[str]
    reported: list[str]
    deadline: float


class StudyStatus(BaseModel):
    """What anyone in the study may see: progress, never an update."""

    study_hash: str
    name: str
    status: str
    rounds_total: int
    last_round: int
    sites: list[str]
    open_round: OpenRoundView | None
    history: list[dict[str, object]]


def encode_model(
    study_hash: str, number: int, params: NDArray[np.float32], state: dict[str, NDArray[np.float32]]
) -> bytes:
    vectors = {"params": params, **{f"opt.{k}": v for k, v in state.items()}}
    return encode(vectors, ModelHeader(study_hash=study_hash, round=number))


def decode_model(
    data: bytes, n_params: int, state_names: tuple[str, ...]
) -> tuple[ModelHeader, NDArray[np.float32], dict[str, NDArray[np.float32]]]:
    """Parse a model payload holding the parameters and exactly ``state_names`` of state.

    Stored model files carry the server optimiser's state (written after it has
    stepped at least once); models served to sites carry parameters only (``()``).
    """
    expected = {"params": n_params, **{f"opt.{k}": n_params for k in state_names}}
    header, vectors = decode(data, ModelHeader, expected, max_bytes=len(data))
    state = {k.removeprefix("opt."): v for k, v in vectors.items() if k.startswith("opt.")}
    return header, vectors["params"], state


class StudyCoordinator:
    """The durable coordinator of one study. Thread-safe: every call holds one lock."""

    def __init__(
        self,
        study: Study,
        sites: list[str],
        store: SqlStore,
        clock: Callable[[], float] = time.time,
        max_update_bytes: int = 64 * 1024 * 1024,
        audit: AuditLog | None = None,
    ) -> None:
        self.study = study
        self.hash = study.content_hash
        self.store = store
        self.clock = clock
        self.max_update_bytes = max_update_bytes
        self._lock = threading.Lock()
        self.audit = audit
        initial = initial_parameters(study.model, study.feature_schema.n_inputs, study.seed)
        self.n_params = int(initial.shape[0])
        if store.register_study(self.hash, study.name, study.model_dump_json(by_alias=True), sites):
            self._audit("study.registered", name=study.name, sites=sorted(sites))
        _, last_round = store.study_progress(self.hash)
        params = initial
        state: dict[str, NDArray[np.float32]] = {}
        stored = store.latest_model(self.hash)
        if stored is not None:
            _, params, state = decode_model(
                store.read_model(stored),
                self.n_params,
                make_server_optimizer(study.aggregation).state_names,
            )
        self.federation = Federation(study, sites, params, round_number=last_round)
        self.federation.optimizer.load_state(state)
        self.releases: ReleaseDesk | None = None
        if study.validates_releases:
            registry = ReleaseRegistry(store.engine, store.storage / "releases")
            self.releases = ReleaseDesk(study, sites, registry, audit=self._audit)
            if stored is not None and self.releases.is_candidate_round(stored.round):
                # Idempotent: recreates the candidate only if a crash came between
                # committing the round and recording its release.
                self.releases.open_candidate(stored.round, params, self.clock())
        self.round: Round | None = None
        self.secure: SecureRelay | None = None
        self._task: Task | None = None
        self._task_bytes = b""
        # The first round opens once min_sites sites have asked for work, so a
        # deadline never runs out while the hospitals are still starting up.
        self._present: set[str] = set()
        open_round = store.open_round(self.hash)
        if open_round is not None:
            self._restore_round(open_round)
        elif not self.federation.done and last_round > 0:
            self._open_next()

    @property
    def finished(self) -> bool:
        return self.federation.done and self.round is None

    @property
    def waiting_for_sites(self) -> bool:
        """True before the first round, until min_sites sites have checked in."""
        return self.round is None and self.federation.round_number == 0

    def _restore_round(self, stored: StoredRound) -> None:
        self.round, self._task = self.federation.open_round(now=self.clock())
        if self.round.number != stored.number:
            raise RoundError(
                f"stored open round {stored.number} does not follow the last finished round "
                f"{self.federation.round_number}"
            )
        self.round.selected = stored.selected
        self.round.deadline = stored.deadline
        self.round.extensions_left = stored.extensions_left
        for payload in stored.submissions.values():
            self.round.submit(decode_update(payload, self.n_params))
        self._task_bytes = encode_task(self._task)
        self._start_secure()

    def _start_secure(self) -> None:
        """A fresh SecAgg+ relay for the open round when the study aggregates securely."""
        self.secure = None
        if self.study.secure_aggregation.enabled and self.round is not None:
            self.secure = SecureRelay(
                self.study,
                self.round,
                self.n_params,
                sha256_hex(self._task_bytes),
                self.clock(),
                self.max_update_bytes,
            )

    def _audit(self, event: str, **details: JsonInput) -> None:
        """Record an event that has been committed (so the trail never claims more)."""
        if self.audit is not None:
            self.audit.append(event, study=self.hash, **details)

    def _open_next(self) -> None:
        self.round, self._task = self.federation.open_round(now=self.clock())
        self.store.save_opened_round(
            self.hash,
            self.round.number,
            self.round.selected,
            self.round.min_sites,
            self.round.deadline,
            self.round.extensions_left,
        )
        self._task_bytes = encode_task(self._task)
        self._start_secure()
        self._audit(
            "round.opened",
            round=self.round.number,
            selected=list(self.round.selected),
            deadline=self.round.deadline,
        )

    def task_for(self, site: str) -> TaskReply:
        """The current task if ``site`` is selected and has not yet reported."""
        self._check_member(site)
        with self._lock:
            self._present.add(site)
            if self.waiting_for_sites and len(self._present) >= self.study.rounds.min_sites:
                self._open_next()
            if self.finished:
                return TaskReply(TaskState.FINISHED, round=self.federation.round_number)
            round_ = self.round
            if round_ is None or site not in round_.selected or site in round_.updates:
                return TaskReply(TaskState.WAIT)
            if self.secure is not None and not self.secure.wants_task(site):
                return TaskReply(TaskState.WAIT)
            return TaskReply(TaskState.READY, self._task_bytes, round_.number)

    def _check_member(self, site: str) -> None:
        if site not in self.federation.sites:
            raise ForbiddenError(f"site '{site}' is not a member of study {self.hash[:12]}")

    def submit(self, identity: str, round_number: int, body: bytes) -> bool:
        """Accept a site's update. Returns False for an exact resubmission.

        ``identity`` is the authenticated site (its certificate's subject); an
        update that claims any other site is refused.
        """
        self._check_member(identity)
        self.refuse_plain_updates()
        update: SiteUpdate = decode_update(body, self.n_params, self.max_update_bytes)
        header = update.header
        if header.site != identity:
            raise ForbiddenError(
                f"the client certificate identifies site '{identity}', "
                f"but the update claims to come from '{header.site}'"
            )
        if header.study_hash != self.hash:
            raise ConflictError(
                f"the update is for study {header.study_hash[:12]}, not {self.hash[:12]}"
            )
        if header.round != round_number:
            raise ConflictError(
                f"the update says round {header.round} but was sent to round {round_number}"
            )
        with self._lock:
            round_ = self.round
            if round_ is None or round_.number != round_number:
                current = "none" if round_ is None else str(round_.number)
                raise ConflictError(
                    f"round {round_number} is not open (the open round is {current}); "
                    "late or replayed updates are refused"
                )
            accepted = round_.submit(update)
            if accepted:
                try:
                    self.store.save_submission(
                        self.hash, round_.number, identity, header.n_samples, body
                    )
                except Exception:
                    # Not durable means not accepted: the site will retry.
                    del round_.updates[identity]
                    raise
                self._audit(
                    "update.received",
                    round=round_.number,
                    site=identity,
                    bytes=len(body),
                    sha256=sha256_hex(body),
                    n_samples=header.n_samples,
                )
            self._advance(self.clock())
            return accepted

    def refuse_plain_updates(self) -> None:
        """Under secure aggregation an individual update is refused before it is read."""
        if self.study.secure_aggregation.enabled:
            raise ForbiddenError(
                f"study {self.hash[:12]} uses secure aggregation: individual updates are "
                "refused; sites send masked inputs to the secagg endpoints"
            )

    def _secure_round(self, identity: str, round_number: int) -> SecureRelay:
        self._check_member(identity)
        round_ = self.round
        if self.secure is None or round_ is None or round_.number != round_number:
            current = "none" if round_ is None else str(round_.number)
            raise ConflictError(
                f"no secure aggregation for round {round_number} (the open round is {current})"
            )
        return self.secure

    def secure_post(self, identity: str, round_number: int, stage: str, body: bytes) -> None:
        """A SecAgg+ message from ``identity`` (its certificate's site) for the open round."""
        with self._lock:
            self._secure_round(identity, round_number).post(identity, stage, body)
            self._advance(self.clock())

    def secure_fetch(self, identity: str, round_number: int, stage: str) -> bytes | None:
        """What ``identity`` needs for its next SecAgg+ step; None until that stage opens."""
        with self._lock:
            self._advance(self.clock())
            return self._secure_round(identity, round_number).fetch(identity, stage)

    def tick(self) -> None:
        """Close the open round if it is due, open the next one, settle due releases."""
        with self._lock:
            self._advance(self.clock())
            if self.releases is not None:
                self.releases.settle(self.clock())

    def validation_task_for(self, site: str) -> tuple[int, bytes] | None:
        """(release id, validation task) this site still owes, or None."""
        self._check_member(site)
        if self.releases is None:
            return None
        with self._lock:
            return self.releases.task_for(site)

    def receive_verdict(self, identity: str, release_id: int, body: bytes) -> tuple[bool, Verdict]:
        """Check and store a site's validation reply (see :class:`ReleaseDesk`)."""
        self._check_member(identity)
        if self.releases is None:
            raise ConflictError(f"study {self.hash[:12]} does not validate releases")
        with self._lock:
            return self.releases.receive(identity, release_id, body, self.clock())

    def _advance(self, now: float) -> None:
        round_ = self.round
        if round_ is None:
            return
        secure = self.secure
        running = secure is not None and not round_.finished and round_.summed is None
        if running and secure is not None and not secure.advance(now, round_):
            return
        if not (round_.finished or round_.due(now)):
            return
        outcome = self.federation.finish_round(round_, now)
        if outcome.status in (RoundStatus.OPEN, RoundStatus.COLLECTING):
            self.store.save_extended(
                self.hash, round_.number, round_.deadline, round_.extensions_left
            )
            self._audit("round.extended", round=round_.number, deadline=round_.deadline)
            return
        model = None
        if outcome.status is RoundStatus.CLOSED:
            model = encode_model(
                self.hash,
                round_.number,
                self.federation.params,
                self.federation.optimizer.state(),
            )
        self.store.save_finished_round(
            self.hash,
            round_.number,
            outcome.status.value,
            outcome.reason,
            model,
            study_finished=self.federation.done,
        )
        self._audit(
            f"round.{outcome.status.value}",
            round=round_.number,
            participants=list(outcome.participants),
            reason=outcome.reason,
        )
        if (
            model is not None
            and self.releases is not None
            and self.releases.is_candidate_round(round_.number)
        ):
            self.releases.open_candidate(round_.number, self.federation.params, now)
        if self.federation.done:
            self._audit("study.finished", rounds=self.federation.round_number)
        self.round = None
        self.secure = None
        if not self.federation.done:
            self._open_next()

    def model_bytes(self) -> bytes:
        """The current global model (parameters only) as a checked payload."""
        with self._lock:
            return encode(
                {"params": self.federation.params},
                ModelHeader(study_hash=self.hash, round=self.federation.round_number),
            )

    def status(self) -> StudyStatus:
        with self._lock:
            round_ = self.round
            status, last_round = self.store.study_progress(self.hash)
            if status == "running" and self.waiting_for_sites:
                status = (
                    f"waiting for sites ({len(self._present)} of "
                    f"{self.study.rounds.min_sites} needed have checked in)"
                )
            return StudyStatus(
                study_hash=self.hash,
                name=self.study.name,
                status=status,
                rounds_total=self.study.rounds.count,
                last_round=last_round,
                sites=self.federation.sites,
                open_round=None
                if round_ is None
                else OpenRoundView(
                    number=round_.number,
                    status=round_.status.value,
                    selected=list(round_.selected),
                    reported=sorted(round_.updates)
                    if self.secure is None
                    else list(self.secure.submitted),
                    deadline=round_.deadline,
                ),
                history=self.store.round_history(self.hash),
            )
