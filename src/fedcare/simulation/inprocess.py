"""A study in one process: the study service over in-memory state, and every site's
:class:`~fedcare.site.participant.Participant` calling it directly.

Nothing here decides anything about rounds: the service opens, extends, closes
and fails them exactly as the networked coordinator does, and each site runs the
code a hospital's agent runs. Only the transport and the clock differ: a link is
a function call (bytes in their wire form, refusals with the status the
coordinator would answer), and the clock is virtual. Each site acts when its
last action is done (training and messages take the time its
:class:`~fedcare.simulation.pace.SitePace` declares; nothing without one) and
while it is online; when no site can act, the clock jumps to the next moment
one can, or to the next deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedcare.federation.messages import TaskReply
from fedcare.federation.service import RoundReport, StudyService, refusal_status
from fedcare.federation.state import MemoryState
from fedcare.privacy.secagg.inmemory import Identities, make_identities
from fedcare.releases.registry import ReleaseRegistry
from fedcare.simulation.pace import Pacing, Schedule, SitePace
from fedcare.site.link import CoordinatorError
from fedcare.site.participant import CoordinatorLink, Participant, Step
from fedcare.site.profiles import ProfileStore
from fedcare.site.secagg import SecureSite
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

T = TypeVar("T")

STEPS_PER_SITE_ROUND = 200
"""Bound on the simulation's loop: steps per site per round (and release) before it is
declared stuck. A round takes a handful."""


class SimulationStuckError(RuntimeError):
    """The in-process study stopped making progress (a bug, never a normal outcome)."""


class SiteGoneError(Exception):
    """Raised by a link whose site went away for good (a wrapped link in a fault test)."""


class SimClock:
    """Virtual time: it starts at the wall clock's reading and moves only by jumps."""

    def __init__(self) -> None:
        self.start = time.time()
        self.offset = 0.0

    def now(self) -> float:
        return self.start + self.offset

    def jump_to(self, moment: float) -> None:
        gap = moment - self.now()
        if gap > 0:
            self.offset += gap


class InProcessLink:
    """A site's :class:`~fedcare.site.participant.CoordinatorLink` in this process: the
    study service called as the authenticated ``site``."""

    def __init__(self, service: StudyService, site: str) -> None:
        self.service = service
        self.site = site

    def _call(self, study_hash: str, call: Callable[[], T]) -> T:
        if study_hash != self.service.hash:
            raise CoordinatorError(404, f"no study {study_hash[:12]} for site '{self.site}'")
        try:
            return call()
        except Exception as exc:
            status = refusal_status(exc)
            if status is None:
                raise
            raise CoordinatorError(status, str(exc)) from exc

    def task(self, study_hash: str) -> TaskReply:
        return self._call(study_hash, lambda: self.service.task_for(self.site))

    def submit(self, study_hash: str, round_number: int, payload: bytes) -> bool:
        return self._call(study_hash, lambda: self.service.submit(self.site, round_number, payload))

    def withdraw(self, study_hash: str, message: bytes) -> bool:
        return self._call(study_hash, lambda: self.service.withdraw(self.site, message))

    def ready(self, study_hash: str, message: bytes) -> bool:
        return self._call(study_hash, lambda: self.service.ready(self.site, message))

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        del content_type

        def post() -> bytes | None:
            if self.service.secure_post(self.site, round_number, stage, body) is not None:
                return None  # the stage still collects: nothing follows yet
            return self.service.secure_next(self.site, round_number, stage)

        return self._call(study_hash, post)

    def secure_fetch(self, study_hash: str, round_number: int, stage: str) -> bytes | None:
        return self._call(
            study_hash, lambda: self.service.secure_fetch(self.site, round_number, stage)
        )

    def validation_task(self, study_hash: str) -> tuple[int, bytes] | None:
        return self._call(study_hash, lambda: self.service.validation_task_for(self.site))

    def send_verdict(self, study_hash: str, release: int, payload: bytes) -> dict[str, Any]:
        _, verdict = self._call(
            study_hash, lambda: self.service.receive_verdict(self.site, release, payload)
        )
        return {"passed": verdict.passed, "reasons": list(verdict.reasons)}

    def send_alignment(self, study_hash: str, body: bytes) -> bool:
        return self._call(study_hash, lambda: self.service.receive_alignment(self.site, body))

    def release_states(self, study_hash: str) -> dict[int, str]:
        return self._call(study_hash, lambda: self.service.release_states(self.site))

    def model(self, study_hash: str) -> bytes:
        return self._call(study_hash, self.service.model_bytes)


def secure_sites(workers: Mapping[str, SiteWorker], ids: Identities) -> dict[str, SecureSite]:
    """Each worker as a secure site, with identity certificates from an in-memory CA."""
    return {
        name: SecureSite(worker, ids.signers[name], ids.signers[name].certificate_pem, ids.verifier)
        for name, worker in workers.items()
    }


@dataclass
class _Paced:
    """A participant with its pace: when it is free to act again, and when it is online."""

    participant: Participant
    pace: SitePace
    schedule: Schedule
    train_s: float
    free_at: float

    def cost(self, step: Step) -> float:
        """Virtual seconds the step kept the site busy."""
        if step is Step.TRAINED:
            return self.train_s / self.pace.speed + self.pace.latency_s
        return self.pace.latency_s if step is Step.WORKED else 0.0

    def can_act(self, now: float) -> bool:
        return self.free_at <= now and self.schedule.online(now)

    def next_moment(self, now: float) -> float:
        """When this site can next act, if not now."""
        return self.schedule.next_online(max(self.free_at, now))


def run_in_process(
    study: Study,
    workers: Mapping[str, SiteWorker],
    offline: frozenset[str] = frozenset(),
    registry: ReleaseRegistry | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    wrap: Callable[[str, CoordinatorLink], CoordinatorLink] | None = None,
    pacing: Pacing | None = None,
    profiles_dir: Path | None = None,
) -> StudyService:
    """Run the study until it is finished and its releases settled, or until it halts
    (too few active sites); returns the service with the final state. Sites in
    ``offline`` never answer; ``wrap`` may put a site's link inside another (to make it
    fail on cue: a link that raises :class:`SiteGoneError` takes its site out);
    ``pacing`` gives sites their speed, latency and availability (without it every
    action is instantaneous); with ``profiles_dir`` each site freezes the reference
    profile of every release it validated and saw promoted in ``profiles_dir/<site>``."""
    clock = SimClock()
    ids = make_identities(sorted(workers)) if study.secure_aggregation.enabled else None
    service = StudyService(
        study,
        sorted(workers),
        MemoryState(),
        clock=clock.now,
        registry=registry,
        on_round=on_round,
        identities=None if ids is None else ids.verifier,
    )
    secure = {} if ids is None else secure_sites(workers, ids)
    links: dict[str, CoordinatorLink] = {
        name: InProcessLink(service, name) for name in sorted(workers) if name not in offline
    }
    if wrap is not None:
        links = {name: wrap(name, link) for name, link in links.items()}
    paced = []
    for name, link in links.items():
        pace = SitePace() if pacing is None else pacing.pace(name)
        paced.append(
            _Paced(
                Participant(
                    workers[name],
                    link,
                    secure=secure.get(name),
                    profiles=None
                    if profiles_dir is None
                    else ProfileStore(profiles_dir / name, study.content_hash),
                ),
                pace,
                Schedule(pace, clock.now(), study.seed, name),
                0.0 if pacing is None else pacing.reference_train_s,
                clock.now(),
            )
        )
    rounds = study.rounds.count * (1 + study.rounds.extensions) + 1
    budget = STEPS_PER_SITE_ROUND * (len(workers) + 1) * 2 * rounds
    with _quiet_sites():
        return _drive(service, paced, clock, budget)


@contextlib.contextmanager
def _quiet_sites() -> Iterator[None]:
    """A site's agent logs each round event; in one process the simulation's results say
    what happened (who withdrew, which rounds failed), so only errors are logged."""
    site_log = logging.getLogger("fedcare.site")
    level = site_log.level
    site_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        site_log.setLevel(level)


def _drive(
    service: StudyService, sites: list[_Paced], clock: SimClock, budget: int
) -> StudyService:
    for _ in range(budget):
        now = clock.now()
        acted = False
        for site in [s for s in sites if s.can_act(now)]:
            try:
                step = site.participant.step()
            except SiteGoneError:
                sites.remove(site)
                continue
            if step is Step.FINISHED:
                sites.remove(site)
                continue
            acted = acted or step in (Step.WORKED, Step.TRAINED)
            site.free_at = now + site.cost(step)
        service.tick()
        if not sites and service.settled:
            return service
        if acted:
            continue
        # Nobody can act now: move to the first moment someone can, or a deadline passes.
        moments = [s.next_moment(now) for s in sites if not s.can_act(now)]
        deadline = service.next_deadline()
        if deadline is not None:
            moments.append(deadline)
        moment = min((m for m in moments if m > now), default=math.inf)
        if math.isinf(moment):
            # Nobody will act and no deadline will pass: the study halted (too few active
            # sites), or it is over for every site that answers.
            return service
        clock.jump_to(moment)
        service.tick()
    raise SimulationStuckError(
        f"study {service.study.name} made no progress in {budget} steps (round "
        f"{service.federation.round_number}); please report this"
    )
