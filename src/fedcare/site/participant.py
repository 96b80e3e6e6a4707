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
its clock.
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

from fedcare.audit import AuditLog
from fedcare.federation.messages import (
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
from fedcare.site.client import PAYLOAD, CoordinatorError
from fedcare.site.secagg import SecureSite
from fedcare.site.worker import SiteWorker

log = logging.getLogger("fedcare.site")
T = TypeVar("T")
JSON = "application/json"


class CoordinatorLink(Protocol):
    """The calls a site makes. Refusals raise :class:`CoordinatorError` with the status
    the coordinator answers (409: the round moved on)."""

    def task(self, study_hash: str) -> TaskReply: ...

    def submit(self, study_hash: str, round_number: int, payload: bytes) -> bool: ...

    def withdraw(self, study_hash: str, message: bytes) -> bool: ...

    def secure_sites(self, study_hash: str, round_number: int) -> tuple[str, ...]: ...

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> None: ...

    def secure_fetch(self, study_hash: str, round_number: int, stage: str) -> bytes | None: ...

    def validation_task(self, study_hash: str) -> tuple[int, bytes] | None: ...

    def send_verdict(self, study_hash: str, release: int, payload: bytes) -> dict[str, Any]: ...

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


@dataclass
class _Session:
    """This site's place in one secure session."""

    party: ClientParty
    round: int
    task_sha256: str
    stage: int = 0


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
    trained: int = 0
    withdrawn: WithdrawReason | None = None
    refused: str | None = None
    """Why this site stopped sending updates, in full (it stays here)."""
    final_round: int = 0
    final_model: bytes = b""
    _declined: set[str] = field(default_factory=set)
    _validated: set[int] = field(default_factory=set)
    _session: _Session | None = None

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
        if self.worker.study.validates_releases and self._validate():
            return Step.WORKED
        if self._session is not None:
            return self._advance_session()
        reply = self.retry(lambda: self.link.task(self.study_hash), "polling for a task")
        if reply.state is TaskState.FINISHED:
            if self.worker.study.validates_releases and self._validate():
                return Step.WORKED
            self._fetch_model()
            return Step.FINISHED
        if reply.state is TaskState.WAIT:
            return Step.IDLE
        if self.withdrawn is not None:
            return Step.HOLD
        if self.approved is not None and not self.approved():
            self._withdraw(
                WithdrawReason.APPROVAL,
                f"round {reply.round}: the site's approval of this study was withdrawn",
                reply.round,
            )
            return Step.WORKED
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
        train_s = time.perf_counter() - started
        # Recorded before the first byte leaves: a crash can only over-report.
        self._record(
            "update.sent",
            round=reply.round,
            to=self.recipient,
            bytes=len(update),
            sha256=hashlib.sha256(update).hexdigest(),
        )
        try:
            accepted = self.retry(
                partial(self.link.submit, self.study_hash, reply.round, update),
                f"uploading round {reply.round}",
            )
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            # The round closed while we trained (deadline): wait for the next one.
            log.warning("round %d: update not taken: %s", reply.round, exc.detail)
            return Step.WORKED
        self._trained(reply.round, train_s, accepted)
        log.info(
            "round %d: trained on %d rows, update %s",
            reply.round,
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
        try:
            sites = self.retry(
                partial(self.link.secure_sites, self.study_hash, reply.round),
                "fetching the round",
            )
        except CoordinatorError as exc:
            if exc.status != 409:
                raise
            return Step.WORKED
        study = self.worker.study
        setup = setup_for(study, reply.round, list(sites), self.worker.n_params, task_sha256)
        try:
            party = self.secure.start(reply.payload, setup, on_masked=self._masked_sent(reply))
        except BudgetExceededError as exc:
            self._withdraw(WithdrawReason.BUDGET, f"round {reply.round}: {exc}", reply.round)
            return Step.WORKED
        except SecAggError as exc:
            self._sit_out(reply.round, task_sha256, exc)
            return Step.WORKED
        self._session = _Session(party, reply.round, task_sha256)
        self._advance_session()
        return Step.WORKED

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
                relayed = None
                if stage is not Stage.ADVERTISE:
                    relayed = self.retry(
                        partial(self.link.secure_fetch, self.study_hash, session.round, stage),
                        f"waiting for the coordinator before {stage} of round {session.round}",
                    )
                    if relayed is None:
                        return Step.WORKED if worked else Step.IDLE
                body = session.party.respond(stage, relayed)
                content_type = PAYLOAD if stage is Stage.MASKED else JSON
                self.retry(
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

    # --- releases and the end -------------------------------------------------------

    def _validate(self) -> bool:
        """Validate the next candidate release this site owes (once each). True if it did."""
        task = self.retry(
            lambda: self.link.validation_task(self.study_hash), "asking for validation work"
        )
        if task is None or task[0] in self._validated:
            return False
        release, payload = task
        self._validated.add(release)
        reply = self.worker.validate(payload)
        # Recorded before the first byte leaves, like every update.
        self._record(
            "validation.sent",
            release=release,
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
