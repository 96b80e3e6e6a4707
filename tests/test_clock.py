"""Deadlines against a wall clock that steps (issue 21, point 4).

The attack: the coordinator's wall clock jumps two hours forward in the middle of
a study (an NTP step, an operator's ``date -s``). Before, the open round failed at
once and a candidate release was rejected for "no verdict by the validation
deadline". With the study service on a :class:`SteadyClock` the jump moves no
deadline; after a restart, stored deadlines are re-based to what the study allows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.clock import RESTART_GRACE_S, SteadyClock, rebase_deadline
from fedcare.federation.service import StudyService
from fedcare.federation.state import MemoryState
from fedcare.releases.registry import ReleaseRegistry
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study
from fedcare.validation.messages import encode_validation_reply

NAMES = ("alpha", "beta", "gamma")
TWO_HOURS = 2 * 3600.0


class SteppedWall:
    """A wall clock that an attacker (or NTP) steps; the monotonic one keeps going."""

    def __init__(self) -> None:
        self.wall = 1.9e9
        self.steady = 1000.0

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.steady += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds


def _study(toy_study: Study) -> Study:
    return toy_study.replace(
        rounds={**toy_study.rounds.model_dump(), "count": 2, "deadline_s": 600, "min_sites": 3},
        disclosure={"artefacts": ["model_updates", "metrics", "counts"], "min_cohort_size": 5},
        validation={
            "threshold": 0.5,
            "every": 1,
            "n_bootstrap": 20,
            "deadline_s": 900,
            "gates": [{"kind": "overall", "metric": "auroc", "op": ">=", "threshold": 0.0}],
        },
    )


def _service(
    study: Study, state: MemoryState, registry: ReleaseRegistry, clock: object
) -> StudyService:
    return StudyService(study, list(NAMES), state, clock=clock, registry=registry)  # type: ignore[arg-type]


def _run_with_a_jump(
    study: Study, sites: list[SiteDataset], tmp_path: Path, steady: bool
) -> tuple[StudyService, ReleaseRegistry]:
    """Round 1 with everyone; a candidate release; the clock jumps two hours while
    round 2 is open and the release waits for verdicts; the service ticks."""
    time = SteppedWall()
    clock = SteadyClock(lambda: time.wall, lambda: time.steady) if steady else (lambda: time.wall)
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = _service(study, MemoryState(), registry, clock)
    workers = {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in sites}
    for name in NAMES:
        service.task_for(name)
    for name in NAMES:
        reply = service.task_for(name)
        time.tick(5)
        service.submit(name, reply.round, workers[name].handle(reply.payload))
    assert service.round is not None
    assert service.round.number == 2
    time.step(TWO_HOURS)
    time.tick(1)
    service.tick()
    return service, registry


def test_a_wall_clock_read_directly_fails_the_round_and_the_release(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The attack, against deadlines read off the wall clock: it works."""
    study = _study(toy_study)
    service, registry = _run_with_a_jump(study, toy_sites, tmp_path, steady=False)
    (first,) = service.state.rounds(study.content_hash)[1:]
    assert first.status == "failed"
    (release,) = registry.releases(study.content_hash)
    assert release.state.value == "rejected"
    assert "by the validation deadline" in release.reason


def test_a_stepped_wall_clock_fails_no_round_and_no_release(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The same jump under the service's steady clock: round 2 stays open, the release
    stays a candidate, and both complete normally when the sites answer."""
    study = _study(toy_study)
    service, registry = _run_with_a_jump(study, toy_sites, tmp_path, steady=True)
    assert [r.status for r in service.state.rounds(study.content_hash)] == ["closed", "open"]
    (release,) = registry.releases(study.content_hash)
    assert release.state.value == "candidate"
    workers = {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in toy_sites}
    for name in NAMES:
        task = service.validation_task_for(name)
        assert task is not None
        reply = encode_validation_reply(workers[name].validation(task[1]).reply)
        service.receive_verdict(name, task[0], reply)
        round_task = service.task_for(name)
        service.submit(name, round_task.round, workers[name].handle(round_task.payload))
    assert [r.status for r in service.state.rounds(study.content_hash)] == ["closed", "closed"]
    assert registry.releases(study.content_hash)[0].state.value == "promoted"


def test_the_steady_clock_follows_the_monotonic_clock_only() -> None:
    time = SteppedWall()
    clock = SteadyClock(lambda: time.wall, lambda: time.steady)
    start = clock()
    assert start == pytest.approx(1.9e9)
    time.step(TWO_HOURS)
    assert clock() == start
    time.step(-TWO_HOURS * 3)
    time.tick(7)
    assert clock() == start + 7


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (10_000.0 + 300, 10_000.0 + 300),  # within bounds: kept as it was
        (10_000.0 - 7200, 10_000.0 + RESTART_GRACE_S),  # clock stepped forward: a grace
        (10_000.0 + 86_400, 10_000.0 + 600),  # clock stepped back: one full deadline at most
    ],
)
def test_a_stored_deadline_is_rebased_on_restart(stored: float, expected: float) -> None:
    assert rebase_deadline(stored, 10_000.0, 600.0) == expected
    assert rebase_deadline(stored, 10_000.0, 30.0) <= 10_000.0 + 30.0


def test_a_restart_after_a_forward_jump_gives_the_open_round_and_release_time(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The coordinator stops with round 2 open and a release waiting; it restarts on a
    clock two hours ahead. Nothing fails: both get the grace, stored as such."""
    study = _study(toy_study)
    time = SteppedWall()
    state = MemoryState()
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = _service(study, state, registry, lambda: time.wall)
    workers = {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in toy_sites}
    for name in NAMES:
        service.task_for(name)
    for name in NAMES:
        reply = service.task_for(name)
        service.submit(name, reply.round, workers[name].handle(reply.payload))
    time.step(TWO_HOURS)
    restarted = _service(study, state, registry, SteadyClock(lambda: time.wall))
    restarted.tick()
    assert [r.status for r in state.rounds(study.content_hash)] == ["closed", "open"]
    stored = state.open_round(study.content_hash)
    assert stored is not None
    assert stored.deadline == pytest.approx(time.wall + RESTART_GRACE_S)
    (release,) = registry.candidates(study.content_hash)
    assert release.deadline == pytest.approx(time.wall + RESTART_GRACE_S, abs=1.0)
