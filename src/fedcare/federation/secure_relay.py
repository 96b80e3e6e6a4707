"""The study service's relay for a securely aggregated round (SecAgg+, message by message).

Sites post each stage's message and fetch what the next stage needs, as
:mod:`fedcare.privacy.secagg.protocol` defines them; a stage closes when every
site expected has answered or its deadline has passed (dropouts). The relay
keeps only the running masked total, in memory: it never receives, stores or
logs a site's update in the clear. A coordinator that restarts in the middle of
a secure round issues the round's task again with a new nonce: a new task and a
new session, which each site's ledger charges as a new release.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedcare.federation.rounds import Round, RoundError, SummedUpdate
from fedcare.fixed_point import QuantizationError
from fedcare.privacy.secagg.keys import IdentityVerifier, SecAggError
from fedcare.privacy.secagg.protocol import STAGES, ServerSession, Stage, stage_named
from fedcare.privacy.secagg.quantize import check_sum_bound, decode_sum
from fedcare.privacy.secagg.study import quantization_for, setup_for
from fedcare.study import Study

log = logging.getLogger("fedcare.coordinator.secure")


class SecureRelayError(RoundError):
    """A secure-aggregation message the relay refuses (maps to 409)."""


@dataclass(frozen=True)
class ClosedSession:
    """Who posted each stage of a secure session that succeeded: enough to answer a post
    retried after its round closed (the reply to it was lost) as the repeat it is. The
    session itself, masked inputs and all, is not kept."""

    round_number: int
    posted: Mapping[Stage, frozenset[str]]

    def repeat(self, site: str, stage: str) -> None:
        """Nothing if ``site`` posted ``stage`` in this session (its first post counted,
        a repeat changes nothing); else :class:`SecureRelayError`."""
        try:
            named = stage_named(stage)
        except SecAggError as exc:
            raise SecureRelayError(str(exc)) from exc
        if site not in self.posted[named]:
            raise SecureRelayError(
                f"'{site}' posts to stage {stage} of secure round {self.round_number}, "
                "but the session is over"
            )


class SecureRelay:
    """One secure session (one task of one round) at the coordinator."""

    def __init__(
        self,
        study: Study,
        round_: Round,
        n_params: int,
        task_sha256: str,
        now: float,
        max_bytes: int,
        verifier: IdentityVerifier,
        participants: Sequence[str] | None = None,
    ) -> None:
        """A session among ``participants`` (default: every site selected for the round);
        an asynchronous flush's session gets a full stage deadline from ``now``;
        ``verifier`` checks each key advertisement before it is relayed."""
        self.study = study
        self.participants = tuple(round_.selected if participants is None else participants)
        self.setup = setup_for(study, round_.number, self.participants, n_params, task_sha256)
        self.session = ServerSession(self.setup, verifier, max_bytes)
        self.stage_s = study.rounds.deadline_s
        first = round_.deadline if participants is None else now + self.stage_s
        self.stage_deadline = max(first, now)
        self.round_number = round_.number
        self.stage_opened = now

    def closed(self) -> ClosedSession | None:
        """Who posted what, once the session has succeeded; else None."""
        session = self.session
        if not session.succeeded:
            return None
        posted = {stage: frozenset(session.posted(stage)) for stage in STAGES}
        return ClosedSession(self.round_number, posted)

    @property
    def deadline(self) -> float:
        """When the current stage closes with whoever has posted."""
        return self.stage_deadline

    @property
    def submitted(self) -> tuple[str, ...]:
        return self.session.server.submitted

    def wants_task(self, site: str) -> bool:
        """True while ``site`` can still join this session by advertising keys."""
        session = self.session
        return session.stage is Stage.ADVERTISE and site not in session.posted(Stage.ADVERTISE)

    def post(self, site: str, stage: str, body: bytes) -> None:
        """Take one message from an authenticated ``site``."""
        try:
            self.session.post(site, stage_named(stage), body)
        except SecAggError as exc:
            raise SecureRelayError(str(exc)) from exc

    def fetch(self, site: str, stage: str) -> bytes | None:
        """What ``site`` needs before posting ``stage``, or None while the stage before is
        still open."""
        try:
            return self.session.relay(site, stage_named(stage))
        except SecAggError as exc:
            raise SecureRelayError(str(exc)) from exc

    def advance(self, now: float, round_: Round) -> bool:
        """Close stages that are complete or past their deadline. True once the round has
        its secure sum or has failed."""
        session = self.session
        try:
            while session.stage is not None:
                if not (now >= self.stage_deadline or session.complete(round_.excused)):
                    return False
                stage, started = session.stage, time.perf_counter()
                session.close()
                # One line per stage: how long it stayed open (the sites' pace plus the
                # round trips) and what closing it cost here (benchmarks/secure_rounds.py).
                log.info(
                    "secure round %d stage %s closed: open %.4f s, close %.4f s, %d posted",
                    self.round_number,
                    stage,
                    now - self.stage_opened,
                    time.perf_counter() - started,
                    len(session.posted(stage)),
                )
                self.stage_deadline = now + self.stage_s
                self.stage_opened = now
        except SecAggError as exc:
            round_.fail(f"secure aggregation failed: {exc}")
            return True
        total, survivors = session.result()
        try:
            summed = secure_sum(self.study, total, survivors, session.losses)
        except QuantizationError as exc:
            round_.fail(f"secure aggregation refused the sum: {exc}; the model does not move")
            return True
        round_.submit_sum(summed)
        return True


def secure_sum(
    study: Study,
    total: NDArray[np.unsignedinteger],
    survivors: Sequence[str],
    losses: Mapping[str, float | None],
) -> SummedUpdate:
    """A session's unmasked total as the round's weighted sum (and the sites' mean loss,
    when they reported one); :class:`QuantizationError` for a sum no honest, clipped
    inputs could produce."""
    plan = quantization_for(study)
    weighted, weight_sum = decode_sum(total, plan)
    check_sum_bound(weighted, weight_sum, len(survivors), plan)
    reported = [v for s in survivors if (v := losses.get(s)) is not None]
    return SummedUpdate(
        participants=tuple(survivors),
        weighted_sum=weighted,
        weight_sum=weight_sum,
        mean_loss=statistics.fmean(reported) if reported else None,
    )
