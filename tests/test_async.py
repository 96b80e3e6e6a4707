"""Asynchronous participation (FedBuff): the contract, the flush, staleness, replays,
restarts, secure flushes and the paced simulation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedcare.aggregation import staleness_factor
from fedcare.federation.messages import (
    Flush,
    Ready,
    SiteUpdate,
    TaskReply,
    TaskState,
    decode_update,
    encode_update,
)
from fedcare.federation.rounds import RoundError
from fedcare.federation.service import ConflictError, RoundReport, StudyService
from fedcare.federation.state import MemoryState
from fedcare.federation.state.sql import SqlState
from fedcare.privacy.dp.budget import Budget
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.privacy.secagg.inmemory import make_identities
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.study import setup_for
from fedcare.simulation.inprocess import InProcessLink, SimClock, run_in_process, secure_sites
from fedcare.simulation.pace import Pacing, Schedule, SitePace
from fedcare.site.client import CoordinatorError
from fedcare.site.dataset import SiteDataset
from fedcare.site.participant import CoordinatorLink
from fedcare.site.worker import SiteWorker
from fedcare.study import StalenessSpec, Study, StudyError

NAMES = ["alpha", "beta", "gamma"]
IDS = make_identities(NAMES)
SECURE = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}


def _async(study: Study, buffer: int = 2, max_staleness: int = 3, **rounds: object) -> Study:
    return study.replace(
        participation={"mode": "async", "buffer": buffer, "max_staleness": max_staleness},
        rounds={**study.rounds.model_dump(), **rounds},
        aggregation={"weighting": "equal"},
    )


def _workers(study: Study, sites: list[SiteDataset]) -> dict[str, SiteWorker]:
    return {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in sites}


# --- the contract ----------------------------------------------------------------------


def test_sync_stays_the_default_and_async_is_checked(toy_study: Study) -> None:
    assert toy_study.participation.mode.value == "sync"
    with pytest.raises(StudyError, match=r"needs participation.buffer"):
        toy_study.replace(participation={"mode": "async"})
    with pytest.raises(StudyError, match=r"below rounds.min_sites"):
        toy_study.replace(participation={"mode": "async", "buffer": 1})
    with pytest.raises(StudyError, match="applies to mode 'async' only"):
        toy_study.replace(participation={"buffer": 2})
    with pytest.raises(StudyError, match=r"rounds.fraction"):
        toy_study.replace(
            participation={"mode": "async", "buffer": 2},
            rounds={**toy_study.rounds.model_dump(), "fraction": 0.5},
        )
    assert _async(toy_study).content_hash != toy_study.content_hash


def test_the_staleness_factor_is_fedbuffs_polynomial() -> None:
    spec = StalenessSpec(exponent=0.5)
    assert [staleness_factor(s, spec) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert staleness_factor(7, StalenessSpec(kind="constant")) == 1.0
    with pytest.raises(ValueError, match="negative"):
        staleness_factor(-1, spec)


# --- the flush at the service -------------------------------------------------------------


def _start(study: Study, state: object | None = None) -> tuple[StudyService, SimClock]:
    clock = SimClock()
    service = StudyService(
        study,
        NAMES,
        state or MemoryState(),  # type: ignore[arg-type]
        clock=clock.now,
        identities=IDS.verifier,
    )
    for name in NAMES:
        service.task_for(name)
    return service, clock


def test_a_flush_takes_stale_updates_weighted_and_closes_at_the_buffer(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _async(toy_study, buffer=2, max_staleness=3, count=4)
    service, _ = _start(study)
    workers = _workers(study, toy_sites)
    first = service.task_for("gamma")
    slow_update = workers["gamma"].handle(first.payload)  # trained on version 0
    for _ in range(2):  # alpha and beta make versions 1 and 2 without gamma
        for name in ("alpha", "beta"):
            reply = service.task_for(name)
            assert reply.state is TaskState.READY
            service.submit(name, reply.round, workers[name].handle(reply.payload))
    assert service.federation.round_number == 2
    before = service.federation.params.copy()
    reply = service.task_for("alpha")
    fresh = workers["alpha"].handle(reply.payload)
    service.submit("alpha", reply.round, fresh)
    assert service.task_for("alpha").state is TaskState.WAIT  # one update per site per flush
    assert service.submit("gamma", 1, slow_update)  # two versions old: accepted
    assert service.federation.round_number == 3
    # FedAvg (server step 1): the weighted mean, gamma's weight scaled by (1 + 2)^-0.5.
    d_alpha = decode_update(fresh, service.n_params).delta.astype(np.float64)
    d_gamma = decode_update(slow_update, service.n_params).delta.astype(np.float64)
    w = 3**-0.5
    expected = before + ((d_alpha + w * d_gamma) / (1 + w)).astype(np.float32)
    np.testing.assert_allclose(service.federation.params, expected, rtol=1e-5, atol=1e-7)
    history = service.state.rounds(study.content_hash)
    assert history[2].participants == ("alpha", "gamma")


def test_a_stale_update_a_replay_and_a_changed_retry_are_refused(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _async(toy_study, buffer=2, max_staleness=1, count=6)
    service, _ = _start(study)
    workers = _workers(study, toy_sites)
    old = service.task_for("gamma")
    stale = workers["gamma"].handle(old.payload)
    accepted: dict[str, tuple[int, bytes]] = {}
    for _ in range(2):
        for name in ("alpha", "beta"):
            reply = service.task_for(name)
            body = workers[name].handle(reply.payload)
            service.submit(name, reply.round, body)
            accepted[name] = (reply.round, body)
    # Trained for round 1, offered to round 3 with max_staleness 1.
    with pytest.raises(ConflictError, match=r"stale: .* 2 model version"):
        service.submit("gamma", old.round, stale)
    assert service.stale == {"gamma": 1}
    # alpha's round-2 update was aggregated in round 2: sending it again is a replay.
    number, body = accepted["alpha"]
    with pytest.raises(ConflictError, match="replay"):
        service.submit("alpha", number, body)
    # A retry with changed data in the open flush is refused; the exact retry is harmless.
    reply = service.task_for("alpha")
    body = workers["alpha"].handle(reply.payload)
    assert service.submit("alpha", reply.round, body)
    sent = decode_update(body, service.n_params)
    other = encode_update(SiteUpdate(sent.header, sent.delta + np.float32(0.5)))
    with pytest.raises(RoundError, match="different update"):
        service.submit("alpha", reply.round, other)
    assert not service.submit("alpha", reply.round, body)
    assert service.federation.round_number == 2  # nothing was applied twice


def test_a_restart_keeps_the_partly_filled_buffer_and_applies_nothing_twice(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The buffer's accepted updates are durable; after a restart the flush goes on, a
    retried update is a duplicate, and the version sequence continues."""
    study = _async(toy_study, buffer=3, max_staleness=3, count=3)
    workers = _workers(study, toy_sites)

    def scripted(state_for: object) -> tuple[np.ndarray, list[int]]:
        service, _ = _start(study, state_for())  # type: ignore[operator]
        reply = service.task_for("alpha")
        alpha = workers["alpha"].handle(reply.payload)
        service.submit("alpha", reply.round, alpha)
        reply = service.task_for("beta")
        beta = workers["beta"].handle(reply.payload)
        service.submit("beta", reply.round, beta)
        if isinstance(service.state, SqlState):
            service.state.close()
            service, _ = _start(study, state_for())  # type: ignore[operator]
            assert service.round is not None
            assert sorted(service.round.updates) == ["alpha", "beta"]
            assert not service.submit("alpha", 1, alpha)  # the retry after the crash
        reply = service.task_for("gamma")
        service.submit("gamma", reply.round, workers["gamma"].handle(reply.payload))
        rounds = [r.number for r in service.state.rounds(study.content_hash)]
        return service.federation.params.copy(), rounds

    # Each site trains the same update for the same task seed: same inputs, same model.
    def memory() -> MemoryState:
        return MemoryState()

    def sql() -> SqlState:
        return SqlState(f"sqlite:///{tmp_path / 'state.db'}", tmp_path)

    uninterrupted, rounds = scripted(memory)
    restarted, rounds_after = scripted(sql)
    assert rounds == rounds_after == [1, 2]
    np.testing.assert_allclose(restarted, uninterrupted, rtol=1e-6)


# --- the paced simulation ---------------------------------------------------------------


def test_an_availability_schedule_is_seeded_and_keeps_its_share() -> None:
    pace = SitePace(availability=0.7, offline_s=100.0)
    a = Schedule(pace, 0.0, seed=3, site="kestrel")
    b = Schedule(pace, 0.0, seed=3, site="kestrel")
    times = np.arange(0.0, 2_000_000.0, 50.0)
    online = np.array([a.online(t) for t in times])
    assert np.array_equal(online, [b.online(t) for t in times])
    assert 0.65 < online.mean() < 0.75
    offline_at = float(times[np.argmin(online)])
    assert a.next_online(offline_at) > offline_at
    assert a.online(a.next_online(offline_at))
    assert Schedule(SitePace(), 0.0, 3, "x").online(123.0)


def _paced(slow: tuple[str, ...], factor: float = 10.0, availability: float = 1.0) -> Pacing:
    return Pacing(
        reference_train_s=60.0,
        sites={s: SitePace(speed=1 / factor, availability=availability) for s in slow},
    )


def test_async_goes_ahead_of_a_slow_site_and_still_counts_it(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    sync = toy_study.replace(rounds={**toy_study.rounds.model_dump(), "count": 6})
    study = _async(toy_study, buffer=2, max_staleness=8, count=6)
    times: dict[str, list[float]] = {"sync": [], "async": []}

    def timed(kind: str) -> Callable[[RoundReport], None]:
        def record(report: RoundReport) -> None:
            times[kind].append(report.elapsed_s)

        return record

    pacing = _paced(("gamma",), factor=4.0)
    run_in_process(sync, _workers(sync, toy_sites), on_round=timed("sync"), pacing=pacing)
    service = run_in_process(
        study, _workers(study, toy_sites), on_round=timed("async"), pacing=pacing
    )
    history = service.state.rounds(study.content_hash)
    assert [r.status for r in history] == ["closed"] * 6
    # Every sync round waits for gamma's four minutes; async versions come every minute.
    assert times["sync"][-1] == pytest.approx(6 * 240.0)
    assert times["async"][-1] < times["sync"][-1] / 2
    with_gamma = [r for r in history if "gamma" in r.participants]
    assert with_gamma, "the slow site never counted"
    assert service.standing("gamma").state.value == "active"


def test_dp_charges_every_trained_update_even_one_refused_as_stale(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _async(
        toy_study.replace(privacy={"dp": True, "epsilon": 8.0, "delta": 1e-4}),
        buffer=2,
        max_staleness=1,
        count=12,
    )
    workers = _workers(study, toy_sites)
    ledgers = {}
    for site in toy_sites:
        ledgers[site.name] = PrivacyLedger(tmp_path / f"{site.name}.sqlite")
        guard = PrivacyGuard(ledgers[site.name], "icu", Budget(100.0, 1e-4))
        workers[site.name] = SiteWorker(study, site, workers[site.name].n_params, privacy=guard)
    service = run_in_process(study, workers, pacing=_paced(("gamma",), factor=5.0))
    assert service.stale.get("gamma", 0) >= 1  # five times slower, one version allowed
    history = service.state.rounds(study.content_hash)
    accepted = sum("gamma" in r.participants for r in history)
    charged = ledgers["gamma"].mechanisms("icu")
    # Every training is in the ledger: the accepted ones and the refused ones.
    assert len(charged) >= accepted + service.stale["gamma"]


# --- secure flushes -----------------------------------------------------------------------


def test_secure_async_matches_plain_async_within_quantisation(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """Every flush's secure sum is the sum of exactly its sites' weighted updates: the
    same paced run, plain and secure, ends at the same model."""
    plain_study = _async(toy_study, buffer=2, max_staleness=8, count=5)
    secure_study = plain_study.replace(secure_aggregation=SECURE)
    pacing = _paced(("gamma",), factor=3.0)
    plain = run_in_process(plain_study, _workers(plain_study, toy_sites), pacing=pacing)
    secure = run_in_process(secure_study, _workers(secure_study, toy_sites), pacing=pacing)
    plain_rounds = plain.state.rounds(plain_study.content_hash)
    secure_rounds = secure.state.rounds(secure_study.content_hash)
    assert [r.status for r in secure_rounds] == ["closed"] * 5
    assert [r.participants for r in secure_rounds] == [r.participants for r in plain_rounds]
    assert any("gamma" in r.participants for r in secure_rounds)
    assert all(len(r.participants) <= 2 for r in secure_rounds)
    np.testing.assert_allclose(secure.federation.params, plain.federation.params, atol=1e-5)
    assert not np.array_equal(secure.federation.params, plain.federation.params)


class _ShowsAnotherFlush:
    """An active coordinator: it shows one site a flush with another nonce (so another
    session) than the one the other sites see."""

    def __init__(self, link: CoordinatorLink) -> None:
        self.link = link
        self.forged = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.link, name)

    def task(self, study_hash: str) -> TaskReply:
        reply = self.link.task(study_hash)
        if reply.state is not TaskState.JOIN:
            return reply
        flush = Flush.model_validate_json(reply.payload)
        forged = flush.model_copy(update={"nonce": "0" * 32})
        self.forged += 1
        return TaskReply(reply.state, forged.model_dump_json().encode(), reply.round)


def test_a_site_shown_another_flush_is_refused_by_the_others_and_no_sum_includes_it(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _async(toy_study, buffer=3, max_staleness=4, count=3).replace(secure_aggregation=SECURE)
    wrapped: dict[str, _ShowsAnotherFlush] = {}

    def wrap(name: str, link: CoordinatorLink) -> CoordinatorLink:
        if name != "gamma":
            return link
        wrapped[name] = _ShowsAnotherFlush(link)
        return wrapped[name]  # type: ignore[return-value]

    service = run_in_process(study, _workers(study, toy_sites), wrap=wrap)
    assert wrapped["gamma"].forged >= 1
    history = service.state.rounds(study.content_hash)
    # gamma's session is not the others': no aggregate ever contains gamma's input.
    assert all("gamma" not in r.participants for r in history)


def test_ready_messages_are_checked(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    study = _async(toy_study, buffer=3, max_staleness=1, count=4).replace(secure_aggregation=SECURE)
    service, _ = _start(study)
    h = study.content_hash

    def ready(site: str, number: int, sender: str | None = None) -> bool:
        message = Ready(study_hash=h, site=site, round=number)
        return service.ready(sender or site, message.model_dump_json().encode())

    with pytest.raises(Exception, match="claims to come from 'beta'"):
        ready("beta", 1, sender="alpha")
    with pytest.raises(ConflictError, match="not open yet"):
        ready("alpha", 2)
    assert ready("alpha", 1)
    assert not ready("alpha", 1)  # said twice: harmless
    assert service.task_for("alpha").state is TaskState.WAIT
    link = InProcessLink(service, "beta")
    with pytest.raises(CoordinatorError) as refused:
        link.submit(h, 1, b"anything")
    assert refused.value.status == 403  # no individual update under secure aggregation


def test_one_update_joins_one_session_only(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    """An active coordinator that puts a kept update in a second flush gets a refusal."""
    study = _async(toy_study, buffer=3, max_staleness=3).replace(secure_aggregation=SECURE)
    workers = _workers(study, toy_sites)
    site = secure_sites(workers, IDS)["alpha"]
    service, _ = _start(study)
    trained = site.train(service.task_for("alpha").payload)
    first = setup_for(study, 1, NAMES, service.n_params, "ab" * 32)
    second = setup_for(study, 2, NAMES, service.n_params, "cd" * 32)
    site.join(trained, first)
    # The first session's masked input leaves: the site records it before the send.
    assert site.record.record_masked(study.content_hash, trained.task_sha256, first.session)
    with pytest.raises(SecAggError, match="already left this site"):
        site.join(trained, second)


class _ReplaysReady:
    """A link that, each time its site says it is ready again, first resends its first
    ready message (an update already aggregated)."""

    def __init__(self, link: CoordinatorLink) -> None:
        self.link = link
        self.first: bytes | None = None
        self.refusals: list[CoordinatorError] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.link, name)

    def ready(self, study_hash: str, message: bytes) -> bool:
        if self.first is None:
            self.first = message
        elif message != self.first:
            try:
                self.link.ready(study_hash, self.first)
            except CoordinatorError as exc:
                self.refusals.append(exc)
        return self.link.ready(study_hash, message)


def test_a_replayed_ready_message_is_refused(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _async(toy_study, buffer=3, max_staleness=3, count=3).replace(secure_aggregation=SECURE)
    replays: dict[str, _ReplaysReady] = {}

    def wrap(name: str, link: CoordinatorLink) -> CoordinatorLink:
        replays[name] = _ReplaysReady(link)
        return replays[name]  # type: ignore[return-value]

    service = run_in_process(study, _workers(study, toy_sites), wrap=wrap)
    assert [r.status for r in service.state.rounds(study.content_hash)] == ["closed"] * 3
    refusals = replays["alpha"].refusals
    assert len(refusals) == 2
    assert all(r.status == 409 and "replay" in r.detail for r in refusals)
