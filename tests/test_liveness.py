"""Studies that keep going when a site stops: withdrawal, inactivity, the operator's drop and
admit, early close, extensions, and a halt when too few sites are left.

Everything runs through the study service and each site's real Participant, in one
process (the network runs the same code; tests/test_one_engine.py compares them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcare.audit import AuditLog, read_entries
from fedcare.federation.messages import TaskState, Withdrawal, WithdrawReason
from fedcare.federation.rounds import RoundError
from fedcare.federation.service import (
    ConflictError,
    ForbiddenError,
    RoundReport,
    StudyService,
    add_site,
    set_standing,
)
from fedcare.federation.state import MemoryState, SiteState, StateError
from fedcare.models.wire import PayloadError
from fedcare.privacy.dp.accountant import epsilon
from fedcare.privacy.dp.budget import Budget
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.privacy.dp.plan import plan_site
from fedcare.simulation.inprocess import InProcessLink, SimClock, run_in_process
from fedcare.site.dataset import SiteDataset
from fedcare.site.participant import Participant, Step
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

NAMES = ["alpha", "beta", "gamma"]


def _rounds(study: Study, **changes: object) -> Study:
    return study.replace(rounds={**study.rounds.model_dump(), **changes})


def _workers(study: Study, sites: list[SiteDataset]) -> dict[str, SiteWorker]:
    n_params = study.feature_schema.n_inputs + 1
    return {s.name: SiteWorker(study, s, n_params) for s in sites}


def _withdrawal(study: Study, site: str, reason: WithdrawReason = WithdrawReason.BUDGET) -> bytes:
    message = Withdrawal(study_hash=study.content_hash, site=site, reason=reason)
    return message.model_dump_json().encode()


def _report(service: StudyService, workers: dict[str, SiteWorker], names: tuple[str, ...]) -> None:
    for name in names:
        reply = service.task_for(name)
        service.submit(name, reply.round, workers[name].handle(reply.payload))


def _alpha_and_beta_report(service: StudyService, workers: dict[str, SiteWorker]) -> None:
    """Every site checks in (the first round opens); alpha and beta report, gamma not yet."""
    for name in NAMES:
        service.task_for(name)
    _report(service, workers, ("alpha", "beta"))


def test_a_site_whose_budget_is_spent_withdraws_and_the_study_stops_waiting(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The scenario of the issue: one site's ledger refuses part-way through. Before, it
    stayed selected and every later round waited for its deadline."""
    study = _rounds(
        toy_study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-4}),
        count=6,
        deadline_s=600,
    )
    gamma = next(s for s in toy_sites if s.name == "gamma")
    plan = plan_site(study, gamma.n_train)
    two_rounds = epsilon([*plan.count, *[plan.round_mechanism] * 2], 1e-4)
    workers = _workers(study, toy_sites)
    for site in toy_sites:
        budget = Budget(two_rounds * 1.01 if site is gamma else 100.0, 1e-4)
        ledger = PrivacyLedger(tmp_path / f"{site.name}.sqlite")
        guard = PrivacyGuard(ledger, "icu", budget)
        workers[site.name] = SiteWorker(study, site, workers[site.name].n_params, privacy=guard)
    service = run_in_process(study, workers)
    history = service.state.rounds(study.content_hash)
    assert [r.status for r in history] == ["closed"] * 6
    assert ["gamma" in r.participants for r in history] == [True, True, False, False, False, False]
    # Round 3 was the one gamma refused: it closed as soon as alpha and beta reported.
    assert "gamma (no longer taking part)" in history[2].reason
    assert all(r.closed_at is not None and r.closed_at - r.opened_at < 60 for r in history)
    assert all("gamma" not in r.selected for r in history[3:])
    standing = service.standing("gamma")
    assert (standing.state, standing.reason) == (SiteState.WITHDRAWN, "budget")


def test_a_withdrawal_is_only_ever_the_senders_own_and_carries_a_category_only(
    toy_study: Study,
) -> None:
    service = StudyService(toy_study, NAMES, MemoryState())
    with pytest.raises(ForbiddenError, match="claims to come from 'beta'"):
        service.withdraw("alpha", _withdrawal(toy_study, "beta"))
    with pytest.raises(ForbiddenError, match="not a member"):
        service.withdraw("mallory", _withdrawal(toy_study, "alpha"))
    other = toy_study.replace(seed=99)
    with pytest.raises(ConflictError, match="for study"):
        service.withdraw("alpha", _withdrawal(other, "alpha"))
    chatty = json.dumps(
        {"study_hash": toy_study.content_hash, "site": "alpha", "reason": "budget", "spent": 7.9}
    ).encode()
    with pytest.raises(PayloadError, match="not a withdrawal"):
        service.withdraw("alpha", chatty)
    with pytest.raises(PayloadError, match="not a withdrawal"):
        service.withdraw("alpha", b'{"reason": "my epsilon is 7.9 of 8"}')
    assert service.standing("alpha").state is SiteState.ACTIVE
    assert service.withdraw("alpha", _withdrawal(toy_study, "alpha")) is True
    assert service.withdraw("alpha", _withdrawal(toy_study, "alpha")) is False


def test_a_withdrawn_site_gets_no_task_and_its_update_is_refused(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    clock = SimClock()
    service = StudyService(toy_study, NAMES, MemoryState(), clock=clock.now)
    for name in NAMES:
        service.task_for(name)
    task = service.task_for("gamma")
    assert task.state is TaskState.READY
    update = _workers(toy_study, toy_sites)["gamma"].handle(task.payload)
    service.withdraw("gamma", _withdrawal(toy_study, "gamma", WithdrawReason.APPROVAL))
    assert service.task_for("gamma").state is TaskState.WAIT
    with pytest.raises(RoundError, match="no longer takes part"):
        service.submit("gamma", task.round, update)


def test_a_round_closes_at_once_when_every_site_still_taking_part_reported(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    clock = SimClock()
    study = _rounds(toy_study, deadline_s=600)
    service = StudyService(study, NAMES, MemoryState(), clock=clock.now)
    workers = _workers(study, toy_sites)
    _alpha_and_beta_report(service, workers)
    assert service.federation.round_number == 0  # still waiting for gamma
    service.withdraw("gamma", _withdrawal(study, "gamma", WithdrawReason.DATA))
    assert service.federation.round_number == 1  # no deadline passed
    assert service.round is not None
    assert service.round.selected == ("alpha", "beta")


def test_a_site_that_misses_rounds_is_inactive_until_it_asks_for_work_again(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _rounds(toy_study, count=8, inactive_after=2)
    clock = SimClock()
    service = StudyService(study, NAMES, MemoryState(), clock=clock.now)
    workers = _workers(study, toy_sites)
    links = {n: InProcessLink(service, n) for n in NAMES}
    sites = {n: Participant(workers[n], links[n]) for n in NAMES}

    def play(names: list[str]) -> None:
        """One round: the named sites act until idle, then the deadline passes."""
        number = service.federation.round_number
        while service.federation.round_number == number:
            worked = [sites[n].step() in (Step.WORKED, Step.TRAINED) for n in names]
            if not any(worked):
                deadline = service.next_deadline()
                assert deadline is not None
                clock.jump_to(deadline)
                service.tick()

    for name in NAMES:
        service.task_for(name)
    play(["alpha", "beta"])
    play(["alpha", "beta"])
    history = service.state.rounds(study.content_hash)
    assert [r.selected for r in history[:2]] == [tuple(NAMES)] * 2
    standing = service.standing("gamma")
    assert standing.state is SiteState.INACTIVE
    assert standing.missed == 2
    assert service.round is not None
    assert "gamma" not in service.round.selected
    play(["alpha", "beta"])
    # gamma is back: it asks for work, is active again, and is selected at the next round.
    assert sites["gamma"].step() is Step.IDLE
    assert service.standing("gamma").state is SiteState.ACTIVE
    play(["alpha", "beta", "gamma"])
    assert service.round is not None
    assert "gamma" in service.round.selected
    play(["alpha", "beta", "gamma"])
    last = [r for r in service.state.rounds(study.content_hash) if r.closed_at][-1]
    assert last.participants == tuple(NAMES)
    assert service.standing("gamma").contributed == 1  # round 5, its first


def test_the_operator_drops_and_admits_a_site_in_a_running_study(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _rounds(toy_study, count=6, deadline_s=600)
    clock = SimClock()
    state = MemoryState()
    audit = AuditLog(tmp_path / "audit.log", "coordinator")
    service = StudyService(study, NAMES, state, clock=clock.now, audit=audit)
    workers = _workers(study, toy_sites)
    _alpha_and_beta_report(service, workers)
    assert service.federation.round_number == 0
    # From another process (the CLI): only the state and the audit trail are touched.
    set_standing(state, study.content_hash, "gamma", SiteState.DROPPED, "site offline", 1.0, audit)
    service.tick()
    assert service.federation.round_number == 1
    assert service.round is not None
    assert service.round.selected == ("alpha", "beta")
    assert service.task_for("gamma").state is TaskState.WAIT  # it asks; it stays dropped
    assert service.standing("gamma").state is SiteState.DROPPED
    set_standing(state, study.content_hash, "gamma", SiteState.ACTIVE, "back online", 2.0, audit)
    service.tick()
    _report(service, workers, ("alpha", "beta"))
    assert service.round is not None
    assert service.round.selected == tuple(NAMES)
    assert service.hash == study.content_hash
    events = [e.event for e in read_entries(tmp_path / "audit.log")]
    assert events.count("site.dropped") == 1
    assert events.count("site.admitted") == 1
    with pytest.raises(ValueError, match="drops a site or admits"):
        set_standing(state, study.content_hash, "gamma", SiteState.WITHDRAWN, "", 3.0)


def test_extensions_in_simulation_end_and_too_few_sites_halt_the_study(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """Before, a simulated round short of min_sites with extensions reopened forever."""
    study = _rounds(toy_study, count=10, min_sites=3, extensions=2, deadline_s=100)
    outcomes: list[RoundReport] = []
    workers = _workers(study, toy_sites)
    # gamma answers round 1 only, then goes silent for good.
    gone = {"gamma": 1}

    def wrap(name: str, link: InProcessLink) -> InProcessLink:
        if name not in gone:
            return link
        return _SilentAfter(link, gone[name])  # type: ignore[return-value]

    service = run_in_process(study, workers, on_round=outcomes.append, wrap=wrap)  # type: ignore[arg-type]
    statuses = [r.outcome.status.value for r in outcomes]
    assert statuses[0] == "closed"
    assert statuses[1:] == ["failed"] * study.rounds.inactive_after
    history = service.state.rounds(study.content_hash)
    # Each failed round waited its deadline and both extensions, then failed.
    for stored in history[1:]:
        assert stored.closed_at is not None
        assert stored.closed_at - stored.opened_at == pytest.approx(300, abs=1)
        assert "only 2 of 3 site(s) reported by the deadline" in stored.reason
    assert "only 2 active site(s), the study needs 3" in service.halted


class _SilentAfter:
    """A link that stops delivering anything after round ``last`` (the site is gone)."""

    def __init__(self, inner: InProcessLink, last: int) -> None:
        self.inner = inner
        self.last = last

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def task(self, study_hash: str):  # type: ignore[no-untyped-def]
        from fedcare.simulation.inprocess import SiteGoneError

        reply = self.inner.task(study_hash)
        if reply.round > self.last:
            raise SiteGoneError
        return reply


def test_a_site_whose_approval_is_withdrawn_says_so_before_training(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    service = StudyService(toy_study, NAMES, MemoryState())
    workers = _workers(toy_study, toy_sites)
    approved = {"gamma": True}
    sites = {
        n: Participant(
            workers[n],
            InProcessLink(service, n),
            approved=(lambda: approved["gamma"]) if n == "gamma" else None,
        )
        for n in NAMES
    }
    for name in NAMES:
        service.task_for(name)  # every site checks in; the first round opens
    for participant in sites.values():
        assert participant.step() is Step.TRAINED  # round 1: trained...
        assert participant.step() is Step.WORKED  # ...and sent
    assert service.federation.round_number == 1
    approved["gamma"] = False  # the officer revoked the approval between rounds
    assert sites["gamma"].step() is Step.WORKED
    assert sites["gamma"].withdrawn is WithdrawReason.APPROVAL
    assert sites["gamma"].trained == 1
    assert service.standing("gamma").reason == "approval"
    assert service.round is not None
    assert service.round.excused == {"gamma"}


def test_a_site_sees_only_its_own_standing(toy_study: Study) -> None:
    service = StudyService(toy_study, NAMES, MemoryState())
    service.withdraw("gamma", _withdrawal(toy_study, "gamma"))
    assert [s.site for s in service.status("alpha").standings] == ["alpha"]
    assert [s.site for s in service.status("gamma").standings] == ["gamma"]
    assert [s.site for s in service.status().standings] == NAMES


def test_a_site_added_to_an_open_study_joins_at_the_next_round_boundary(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    closed = _rounds(toy_study, count=4, deadline_s=600)
    study = _rounds(toy_study, count=4, deadline_s=600, open_enrolment=True)
    clock = SimClock()
    state = MemoryState()
    audit = AuditLog(tmp_path / "audit.log", "coordinator")
    service = StudyService(study, ["alpha", "beta"], state, clock=clock.now, audit=audit)
    workers = _workers(study, toy_sites)
    for name in ("alpha", "beta"):
        service.task_for(name)
    _report(service, workers, ("alpha", "beta"))  # round 1 closes, round 2 opens
    assert service.round is not None
    assert service.round.number == 2
    with pytest.raises(ForbiddenError, match="not a member"):
        service.task_for("gamma")  # not a member yet
    assert add_site(state, study.content_hash, "gamma", "new hospital", 5.0, audit)
    assert not add_site(state, study.content_hash, "gamma", "again", 6.0, audit)
    service.tick()
    # Round 2 was selected before gamma joined; it waits for round 3.
    assert service.round.selected == ("alpha", "beta")
    assert service.task_for("gamma").state is TaskState.WAIT
    _report(service, workers, ("alpha", "beta"))
    assert service.round is not None
    assert service.round.number == 3
    assert service.round.selected == ("alpha", "beta", "gamma")
    _report(service, workers, ("alpha", "beta", "gamma"))
    assert service.federation.round_number == 3
    events = [(e.event, e.details) for e in read_entries(tmp_path / "audit.log")]
    joined = [d for event, d in events if event == "site.joined"]
    assert [(d["site"], d["from_round"]) for d in joined] == [("gamma", 3)]
    assert [event for event, _ in events].count("site.added") == 1
    # A restart with the config's original sites keeps the one that joined.
    again = StudyService(study, ["alpha", "beta"], state, clock=clock.now)
    assert again.federation.sites == ["alpha", "beta", "gamma"]
    # A study that did not declare open enrolment takes no one mid-way.
    StudyService(closed, ["alpha", "beta"], state, clock=clock.now)
    with pytest.raises(StateError, match="open_enrolment is false"):
        add_site(state, closed.content_hash, "gamma", "new hospital", 7.0)


def test_a_secure_study_at_max_sites_takes_no_one_more() -> None:
    state = MemoryState()
    spec = json.dumps(
        {
            "rounds": {"open_enrolment": True},
            "secure_aggregation": {"enabled": True, "max_sites": 3},
        }
    )
    state.register_study("d" * 64, "full", spec, NAMES, 1.0)
    with pytest.raises(StateError, match="max_sites is 3: no site can join"):
        add_site(state, "d" * 64, "delta", "new hospital", 2.0)
    assert state.study("d" * 64).sites == tuple(NAMES)
