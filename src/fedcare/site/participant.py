"""A site's part in a study, one step at a time: the same code at a hospital and in a
simulation.

:class:`Participant` asks the coordinator for work through a
:class:`CoordinatorLink` (HTTPS with mutual TLS for the site agent, a direct
call into the study service for the simulation), trains with the real
:class:`~fedcare.site.worker.SiteWorker`, takes part in secure sessions stage by
stage, validates candidate releases, and withdraws, with a reason category only,
when it cannot go on (its privacy budget is spent, its approval was withdrawn).

Each :meth:`Participant.step` does what can be done now and says whether it did
anything. Over the network the link's calls long-poll, so an idle step has
waited; in a simulation an idle step returns at once and the simulation moves
its clock. Training is a step of its own (:attr:`Step.TRAINED`): what it made
leaves on the next step, so a simulation can charge the training's time between.

In an asynchronous study a site trains on whatever model is current when it is
ready and sends the update tagged with that round; under secure aggregation it
keeps the update, says it is ready, and joins the flush the coordinator then
offers, weighting its input by its staleness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from fedcare.aggregation import staleness_factor
from fedcare.audit import AuditLog
from fedcare.federation.messages import (
    Flush,
    Ready,
    TaskReply,
    TaskState,
    Withdrawal,
    WithdrawReason,
    decode_model,
)
from fedcare.federation.rounds import RoundError
from fedcare.privacy.dp.budget import BudgetExceededError
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.protocol import STAGES, ClientParty, Stage
from fedcare.privacy.secagg.study import setup_for
from fedcare.site.link import PAYLOAD, CoordinatorError
from fedcare.site.profiles import ProfileStore, candidate_profile
from fedcare.site.secagg import SecureSite, TrainedUpdate
from fedcare.site.worker import SiteWorker
from fedcare.validation.messages import encode_validation_reply

log = logging.getLogger("fedcare.site")
T = TypeVar("T")
JSON = "application/json"


class CoordinatorLink(Protocol):
    """The calls a site makes. Refusals raise :class:`CoordinatorError` with the status
    the coordinator answers (409: the round moved on)."""

    def task(self, study_hash: str) -> TaskReply: ...

    def submit(self, study_hash: str, round_number: int, payload: bytes) -> bool: ...

    def withdraw(self, study_hash: str, message: bytes) -> bool: ...

    def ready(self, study_hash: str, message: bytes) -> bool: ...

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        """Post one stage's message; the next stage's relay if it has opened, else None."""
        ...

    def secure_fetch(self, study_hash: str, round_number: int, stage: str) -> bytes | None: ...

    def validation_task(self, study_hash: str) -> tuple[int, bytes] | None: ...

    def send_verdict(self, study_hash: str, release: int, payload: bytes) -> dict[str, Any]: ...

    def release_states(self, study_hash: str) -> dict[int, str]: ...

    def send_alignment(self, study_hash: str, body: bytes) -> bool: ...

    def model(self, study_hash: str) -> bytes: ...


class Retry(Protocol):
    def __call__(self, call: Callable[[], T], what: str) -> T:
        """Run ``call``, retrying network failures."""
        ...


def _once(call: Callable[[], T], what: str) -> T:
    del what
    return call()


class Step(StrEnum):
    WORKED = "worked"
    IDLE = "idle"
    """Nothing to do until the coordinator moves on."""
    HOLD = "hold"
    """Offered work this site will not take (it withdrew, or sat that task out): ask
    again later, not at once."""
    FINISHED = "finished"
    TRAINED = "trained"
    """Trained an update; it leaves on the next step."""


@dataclass(frozen=True)
class _Outgoing:
    """A trained plain update not yet sent."""

    round: int
    payload: bytes
    train_s: float


@dataclass
class _Session:
    """This site's place in one secure session."""

    party: ClientParty
    round: int
    task_sha256: str
    stage: int = 0
    relayed: bytes | None = None
    """The relay for ``stage``, when it came back with the post of the stage before."""


@dataclass
class Participant:
    """One site in one study."""

    worker: SiteWorker
    link: CoordinatorLink
    secure: SecureSite | None = None
    audit: AuditLog | None = None
    recipient: str = "coordinator"
    retry: Retry = _once
    approved: Callable[[], bool] | None = None
    """Asked before each round: False once the site's approval of the study is gone."""
    rounds_log: Path | None = None
    """Where to append one JSON line per round trained (the site's own record)."""
    profiles: ProfileStore | None = None
    """Where this site freezes the reference profile of each release it validated once
    the release is promoted (drift monitoring, docs/drift.md)."""
    trained: int = 0
    withdrawn: WithdrawReason | None = None
    refused: str | None = None
    """Why this site stopped sending updates, in full (it stays here)."""
    final_round: int = 0
    final_model: bytes = b""
    discarded: int = 0
    """Trained updates that never counted (refused as stale, or their flush failed)."""
    _declined: set[str] = field(default_factory=set)
    _validated: set[int] = field(default_factory=set)
    _session: _Session | None = None
    _outgoing: _Outgoing | None = None
    _held: TrainedUpdate | None = None
    _settle_since: float | None = None

    @property
    def study_hash(self) -> str:
        return self.worker.study.content_hash

    @property
    def name(self) -> str:
        return self.worker.data.name

    def _record(self, event: str, **details: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, study=self.study_hash, **details)

    def step(self) -> Step:
        """Do what can be done now."""
        self._send_alignment()
        # A candidate release opens when a round closes, so none can appear while this
        # site is in a round (a secure session, an update not yet sent): it asks between.
        between = self._session is None and self._outgoing is None
        if between and self.worker.study.validates_releases and self._validate():
            return Step.WORKED
        if self._session is not None:
            return self._advance_session()
        if self._outgoing is not None:
            return self._send(self._outgoing)
        reply = self.retry(lambda: self.link.task(self.study_hash), "polling for a task")
        if reply.state is TaskState.FINISHED:
            if self.worker.study.validates_releases and self._validate():
                return Step.WORKED
            if self._settle_profiles() and self._still_waiting():
                # The other sites' verdicts (or the validation deadline) decide it soon.
                return Step.HOLD
            self._fetch_model()
            return Step.FINISHED
        if reply.state is TaskState.WAIT:
            return Step.IDLE
        if self.withdrawn is not None:
            return Step.HOLD
        if reply.state is TaskState.JOIN:
            return self._join_flush(reply)
        if self.approved is not None and not self.approved():
            self._withdraw(
                WithdrawReason.APPROVAL,
                f"round {reply.round}: the site's approval of this study was withdrawn",
                reply.round,
            )
            return Step.WORKED
        if self.secure is not None and self.worker.study.participation.is_async:
            return self._ready_or_train(reply)
        if self.secure is not None:
            return self._start_session(reply)
        return self._train(reply)

    # --- plain rounds ---------------------------------------------------------------

    def _train(self, reply: TaskReply) -> Step:
        started = time.perf_counter()
        try:
            update = self.worker.handle(reply.payload)
        except BudgetExceededError as exc:
            self._withdraw(WithdrawReason.BUDGET, f"round {reply.round}: {exc}", reply.round)
            return Step.WORKED
        self._outgoing = _Outgoing(reply.round, update, time.perf_counter() - started)
        return Step.TRAINED

    def _send(self, outgoing: _Outgoing) -> Step:
        number, update = outgoing.round, outgoing.payload
        # Recorded before the first byte leaves: a crash can only over-report.
        self._record(
            "update.sent",
            round=number,
            to=self.recipient,
            bytes=len(update),
            sha256=hashlib.sha256(update).hexdigest(),
        )
        try:
            accepted = self.retry(
                partial(self.link.submit, self.study_hash, number, update),
                f"uploading round {number}",
            )
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            # The round closed while we trained (deadline), or the update is too stale
            # for an asynchronous study: train on the current model next.
            self._outgoing = None
            self.discarded += 1
            log.warning("round %d: update not taken: %s", number, exc.detail)
            return Step.WORKED
        self._outgoing = None
        self._trained(number, outgoing.train_s, accepted)
        log.info(
            "round %d: trained on %d rows, update %s",
            number,
            self.worker.data.n_train,
            "accepted" if accepted else "already recorded",
        )
        return Step.WORKED

    def _trained(self, number: int, train_s: float, accepted: bool) -> None:
        self.trained += 1
        if self.rounds_log is not None:
            self.rounds_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rounds_log, "a", encoding="utf-8") as handle:
                entry = {"round": number, "train_s": train_s, "accepted": accepted}
                handle.write(json.dumps(entry) + "\n")

    def _withdraw(self, reason: WithdrawReason, detail: str, number: int) -> None:
        """Refuse this round's update and every later one, and tell the coordinator why, by
        category only (the detail stays in the site's own audit trail)."""
        self.withdrawn = reason
        self.refused = detail
        self._record("update.refused", round=number, reason=detail)
        self._record("study.withdrawn", reason=reason.value)
        message = Withdrawal(study_hash=self.study_hash, site=self.name, reason=reason)
        try:
            self.retry(
                partial(self.link.withdraw, self.study_hash, message.model_dump_json().encode()),
                "telling the coordinator this site withdraws",
            )
        except CoordinatorError as exc:
            log.warning("the coordinator did not take the withdrawal: %s", exc.detail)
        log.warning("%s; withdrew from the study (%s)", detail, reason.value)

    # --- secure rounds --------------------------------------------------------------

    def _start_session(self, reply: TaskReply) -> Step:
        assert self.secure is not None
        task_sha256 = hashlib.sha256(reply.payload).hexdigest()
        if task_sha256 in self._declined:
            # A task this site sat out is offered again: it answers nothing more.
            return Step.HOLD
        study = self.worker.study
        try:
            if not reply.sites:
                raise SecAggError("the coordinator named no sites for the secure round")
            setup = setup_for(
                study, reply.round, list(reply.sites), self.worker.n_params, task_sha256
            )
            party = self.secure.start(reply.payload, setup, on_masked=self._masked_sent(reply))
        except BudgetExceededError as exc:
            self._withdraw(WithdrawReason.BUDGET, f"round {reply.round}: {exc}", reply.round)
            return Step.WORKED
        except SecAggError as exc:
            self._sit_out(reply.round, task_sha256, exc)
            return Step.WORKED
        self._session = _Session(party, reply.round, task_sha256)
        return Step.TRAINED

    # --- asynchronous secure aggregation --------------------------------------------

    def _ready_or_train(self, reply: TaskReply) -> Step:
        """Offered the current model: say the update kept here is ready, or train one."""
        assert self.secure is not None
        held = self._held
        limit = self.worker.study.participation.max_staleness
        if held is not None and reply.round - held.round > limit:
            self._discard(f"trained for round {held.round}, too stale for round {reply.round}")
            held = None
        if held is None:
            try:
                self._held = self.secure.train(reply.payload)
            except BudgetExceededError as exc:
                self._withdraw(WithdrawReason.BUDGET, f"round {reply.round}: {exc}", reply.round)
                return Step.WORKED
            except SecAggError as exc:
                self._sit_out(reply.round, hashlib.sha256(reply.payload).hexdigest(), exc)
                return Step.HOLD
            return Step.TRAINED
        message = Ready(study_hash=self.study_hash, site=self.name, round=held.round)
        try:
            self.retry(
                partial(self.link.ready, self.study_hash, message.model_dump_json().encode()),
                f"saying the update for round {held.round} is ready",
            )
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            self._discard(exc.detail)
        return Step.WORKED

    def _discard(self, why: str) -> None:
        self._held = None
        self.discarded += 1
        self._record("update.discarded", reason=why)
        log.warning("update discarded: %s", why)

    def _join_flush(self, reply: TaskReply) -> Step:
        """Join the secure session of one flush with the update kept here, or sit it out."""
        assert self.secure is not None
        flush_sha256 = hashlib.sha256(reply.payload).hexdigest()
        if flush_sha256 in self._declined:
            return Step.HOLD
        study = self.worker.study
        held, self._held = self._held, None
        try:
            flush = Flush.model_validate_json(reply.payload)
            if flush.study_hash != self.study_hash or flush.round != reply.round:
                raise SecAggError("the flush is for another study or round than announced")
            if self.name not in flush.sites:
                raise SecAggError("the flush does not list this site")
            if held is None:
                raise SecAggError("no update is kept here for a flush (the site restarted)")
            staleness = flush.round - held.round
            if not 0 <= staleness <= study.participation.max_staleness:
                raise SecAggError(
                    f"the update was trained for round {held.round}: it cannot join the flush "
                    f"of round {flush.round}"
                )
            setup = setup_for(
                study, flush.round, list(flush.sites), self.worker.n_params, flush_sha256
            )
            factor = staleness_factor(staleness, study.participation.staleness)
            party = self.secure.join(held, setup, factor, on_masked=self._masked_sent(reply))
        except (SecAggError, ValidationError) as exc:
            # Whatever went wrong, the update is not offered again: the site trains anew.
            self.discarded += held is not None
            self._sit_out(reply.round, flush_sha256, exc)
            return Step.WORKED
        self._session = _Session(party, flush.round, flush_sha256)
        return self._advance_session()

    def _masked_sent(self, reply: TaskReply) -> Callable[[bytes], None]:
        def record(body: bytes) -> None:
            # Recorded before the first byte leaves: a crash can only over-report.
            self._record(
                "update.sent",
                round=reply.round,
                to=f"{self.recipient} (masked, secure aggregation)",
                bytes=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
            )

        return record

    def _sit_out(self, number: int, task_sha256: str, exc: Exception) -> None:
        """An honest site refuses what it must refuse, and says so in its audit trail."""
        log.error("round %d: refused in secure aggregation: %s", number, exc)
        self._record("secagg.refused", round=number, reason=str(exc))
        self._declined.add(task_sha256)
        self._session = None

    def _advance_session(self) -> Step:
        session = self._session
        assert session is not None
        worked = False
        while session.stage < len(STAGES):
            stage = STAGES[session.stage]
            try:
                relayed, session.relayed = session.relayed, None
                if stage is not Stage.ADVERTISE and relayed is None:
                    relayed = self.retry(
                        partial(self.link.secure_fetch, self.study_hash, session.round, stage),
                        f"waiting for the coordinator before {stage} of round {session.round}",
                    )
                    if relayed is None:
                        return Step.WORKED if worked else Step.IDLE
                body = session.party.respond(stage, relayed)
                content_type = PAYLOAD if stage is Stage.MASKED else JSON
                session.relayed = self.retry(
                    partial(
                        self.link.secure_post,
                        self.study_hash,
                        session.round,
                        stage.value,
                        body,
                        content_type,
                    ),
                    f"sending {stage} for round {session.round}",
                )
            except CoordinatorError as exc:
                if exc.status != 409:
                    raise
                log.warning("round %d: secure round not completed: %s", session.round, exc.detail)
                self.discarded += 1
                self._declined.add(session.task_sha256)
                self._session = None
                return Step.WORKED
            except (SecAggError, ValidationError) as exc:
                # Includes malformed relays from the coordinator: the site sits the round out.
                self._sit_out(session.round, session.task_sha256, exc)
                return Step.WORKED
            session.stage += 1
            worked = True
        assert self.secure is not None
        self._trained(session.round, self.secure.train_s, True)
        log.info("round %d: secure session completed", session.round)
        self._session = None
        return Step.WORKED

    # --- drift during training -------------------------------------------------------

    def _send_alignment(self) -> None:
        """Send the last update's alignment with the consortium when the study monitors
        drift; it is recorded in the audit trail before it leaves."""
        alignment = self.worker.alignment
        if alignment is None:
            return
        self.worker.alignment = None
        if self.worker.study.monitoring is None:
            return
        body = alignment.model_dump_json().encode("utf-8")
        self._record(
            "alignment.sent",
            round=alignment.round,
            recipient=self.recipient,
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
        )
        try:
            self.retry(
                partial(self.link.send_alignment, self.study_hash, body),
                f"sending round {alignment.round}'s alignment",
            )
        except CoordinatorError as exc:
            log.warning("round %d: alignment not taken: %s", alignment.round, exc.detail)

    # --- releases and the end -------------------------------------------------------

    def _settle_profiles(self) -> bool:
        """Freeze the profiles of candidates that were promoted, drop the rejected ones;
        True while a candidate this site validated is still being decided."""
        if self.profiles is None or not self.profiles.pending():
            return False
        states = self.retry(
            lambda: self.link.release_states(self.study_hash), "asking how releases settled"
        )
        undecided = False
        for release in self.profiles.pending():
            state = states.get(release)
            undecided |= state == "candidate"
            if state is not None and self.profiles.settle(release, state):
                self._record("profile.frozen", release=release)
        return undecided

    def _still_waiting(self) -> bool:
        """Whether to keep waiting for undecided candidates: at most twice the study's
        validation deadline after the study finished, so a coordinator that never
        decides cannot keep the site running."""
        now = time.monotonic()
        if self._settle_since is None:
            self._settle_since = now
        if now - self._settle_since <= 2 * self.worker.study.validation.deadline_s:
            return True
        log.warning("releases still undecided; their reference profiles stay pending")
        return False

    def _validate(self) -> bool:
        """Validate the next candidate release this site owes (once each). True if it did."""
        self._settle_profiles()
        task = self.retry(
            lambda: self.link.validation_task(self.study_hash), "asking for validation work"
        )
        if task is None or task[0] in self._validated:
            return False
        release, payload = task
        self._validated.add(release)
        candidate = self.worker.validation(payload)
        if self.profiles is not None:
            self.profiles.keep_candidate(
                candidate_profile(self.worker, candidate), candidate.params
            )
        reply = encode_validation_reply(candidate.reply)
        # Recorded before the first byte leaves, like every update.
        self._record(
            "validation.sent",
            release=release,
            recipient=self.recipient,
            bytes=len(reply),
            sha256=hashlib.sha256(reply).hexdigest(),
        )
        try:
            stored = self.retry(
                partial(self.link.send_verdict, self.study_hash, release, reply),
                f"sending the validation of release {release}",
            )
        except CoordinatorError as exc:
            log.warning("release %d: validation not taken: %s", release, exc.detail)
            return True
        log.info(
            "release %d: validated, %s%s",
            release,
            "passed" if stored["passed"] else "failed",
            "" if stored["passed"] else ": " + "; ".join(stored["reasons"]),
        )
        return True

    def _fetch_model(self) -> None:
        payload = self.retry(lambda: self.link.model(self.study_hash), "fetching the model")
        header, _, _ = decode_model(payload, self.worker.n_params)
        if header.study_hash != self.study_hash:
            raise RoundError("the coordinator returned a model for another study")
        self.final_round = header.round
        self.final_model = payload
        self._record(
            "model.received", round=header.round, sha256=hashlib.sha256(payload).hexdigest()
        )
