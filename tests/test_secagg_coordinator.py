"""The coordinator's secure rounds, driven in process: relay, dropouts, restarts, refusals."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from fedcare.federation.messages import TaskState
from fedcare.federation.rounds import RoundError
from fedcare.federation.service import ForbiddenError, StudyService
from fedcare.federation.state.sql import SqlState
from fedcare.privacy.secagg.inmemory import make_identities
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.protocol import STAGES, ClientParty, Party, Stage
from fedcare.privacy.secagg.study import setup_for
from fedcare.simulation.inprocess import secure_sites
from fedcare.simulation.runner import run_federation
from fedcare.site.dataset import SiteDataset
from fedcare.site.secagg import SecureSite
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

SECURE = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def study(toy_study: Study) -> Study:
    return toy_study.replace(
        secure_aggregation=SECURE, rounds={"count": 2, "min_sites": 2, "deadline_s": 60}
    )


IDS = make_identities(["alpha", "beta", "gamma"])


def _sites(study: Study, toy_sites: list[SiteDataset]) -> dict[str, SecureSite]:
    n_params = study.feature_schema.n_inputs + 1
    return secure_sites({s.name: SiteWorker(study, s, n_params) for s in toy_sites}, IDS)


def _coordinator(study: Study, tmp_path: Path, clock: Clock) -> StudyService:
    state = SqlState(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "models")
    return StudyService(
        study, ["alpha", "beta", "gamma"], state, clock=clock, identities=IDS.verifier
    )


def _advertise(
    coord: StudyService, sites: dict[str, SecureSite], names: list[str]
) -> tuple[int, dict[str, Party]]:
    """Each site takes its task, trains and advertises keys, as its agent would."""
    number = 0
    parties: dict[str, Party] = {}
    for name in names:
        coord.task_for(name)  # the first round opens once min_sites have checked in
    for name in names:
        reply = coord.task_for(name)
        assert reply.state is TaskState.READY
        number = reply.round
        assert coord.round is not None
        task_sha = hashlib.sha256(reply.payload).hexdigest()
        setup = setup_for(coord.study, number, coord.round.selected, coord.n_params, task_sha)
        parties[name] = sites[name].start(reply.payload, setup)
        coord.secure_post(name, number, "advertise", parties[name].respond(Stage.ADVERTISE, None))
    return number, parties


def _finish(
    coord: StudyService,
    parties: dict[str, Party],
    number: int,
    clock: Clock,
    drop: str | None = None,
) -> None:
    """The remaining stages, every site in turn; ``drop`` vanishes before masking."""
    for stage in STAGES[1:]:
        for name, party in parties.items():
            if name == drop and stage is not Stage.SHARES:
                continue
            relayed = coord.secure_fetch(name, number, stage.value)
            assert relayed is not None
            coord.secure_post(name, number, stage.value, party.respond(stage, relayed))
        if drop is not None and stage is Stage.MASKED:
            first = next(iter(parties))
            assert coord.secure_fetch(first, number, Stage.CONFIRM.value) is None
            clock.now += 61  # the masking stage's deadline passes without the dropped site


def test_secure_rounds_at_the_coordinator_match_the_simulation(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    names = ["alpha", "beta", "gamma"]
    for _ in range(2):
        number, parties = _advertise(coord, sites, names)
        _finish(coord, parties, number, clock)
    assert coord.finished
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    expected = run_federation(study, toy_sites, workers=workers).params
    np.testing.assert_array_equal(coord.federation.params, expected)
    history = coord.state.rounds(coord.hash)
    assert [h.status for h in history] == ["closed", "closed"]


def test_dropout_at_the_coordinator_is_recovered(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    number, parties = _advertise(coord, sites, ["alpha", "beta", "gamma"])
    _finish(coord, parties, number, clock, drop="gamma")
    assert coord.federation.round_number == 1
    history = coord.state.rounds(coord.hash)[0]
    assert history.status == "closed"
    assert "gamma" in history.reason


def test_messages_claiming_another_site_and_plain_updates_are_refused(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    for name in ("alpha", "beta"):
        coord.task_for(name)
    assert coord.round is not None
    reply = coord.task_for("beta")
    task_sha = hashlib.sha256(reply.payload).hexdigest()
    setup = setup_for(study, 1, coord.round.selected, coord.n_params, task_sha)
    beta_keys = sites["beta"].start(reply.payload, setup).respond(Stage.ADVERTISE, None)
    with pytest.raises(RoundError, match="claiming to come from 'beta'"):
        coord.secure_post("alpha", 1, "advertise", beta_keys)
    with pytest.raises(ForbiddenError, match="secure aggregation"):
        coord.submit("alpha", 1, b"anything")
    with pytest.raises(RoundError, match="no secure aggregation for round 2"):
        coord.secure_post("beta", 2, "advertise", beta_keys)


def test_restarted_coordinator_issues_a_new_task_and_session(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    names = ["alpha", "beta", "gamma"]
    sites = _sites(study, toy_sites)
    first = _coordinator(study, tmp_path, clock)
    number, parties = _advertise(first, sites, names)
    before = parties["alpha"]
    assert first.secure_fetch("alpha", number, Stage.SHARES.value) is not None
    first.state.close()
    # A new process on the same database: the round is open, its secure state is gone.
    again = _coordinator(study, tmp_path, clock)
    with pytest.raises(RoundError, match="has not posted advertise"):
        again.secure_fetch("alpha", number, Stage.SHARES.value)
    renumbered, parties = _advertise(again, sites, names)
    assert renumbered == number
    # The same round, issued as a new task: a new session.
    assert isinstance(before, ClientParty)
    assert isinstance(parties["alpha"], ClientParty)
    assert parties["alpha"].client.setup.task_sha256 != before.client.setup.task_sha256
    _finish(again, parties, number, clock)
    assert again.federation.round_number == 1


def test_a_site_takes_part_in_one_session_per_task(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    """Issue 12, point 2: a coordinator that runs a second session over a task the sites
    already sent masked inputs for (to subtract two sums over different survivors) gets
    refused by every site before it trains."""
    clock = Clock()
    names = ["alpha", "beta", "gamma"]
    sites = _sites(study, toy_sites)
    coord = _coordinator(study, tmp_path, clock)
    coord.task_for("alpha")
    coord.task_for("beta")
    task = coord.task_for("alpha").payload
    number, parties = _advertise(coord, sites, names)
    _finish(coord, parties, number, clock)
    assert coord.round is not None
    task_sha = hashlib.sha256(task).hexdigest()
    replay = setup_for(study, number, ("alpha", "beta"), coord.n_params, task_sha)
    for name in names:
        with pytest.raises(SecAggError, match="already left this site"):
            sites[name].start(task, replay)


def _answers(coord: StudyService, number: int) -> dict[tuple[str, Stage], object]:
    """What every site's fetch of every stage would get now (bytes, None or the refusal)."""
    out: dict[tuple[str, Stage], object] = {}
    for name in ("alpha", "beta", "gamma"):
        for stage in STAGES[1:]:
            try:
                out[name, stage] = coord.secure_fetch(name, number, stage.value)
            except RoundError as exc:
                out[name, stage] = f"{type(exc).__name__}: {exc}"
    return out


def test_the_secure_version_moves_whenever_a_waiting_fetch_would_get_another_answer(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    """The server re-asks a waiting secure fetch only when ``secure_version`` moves: every
    post, deadline and round change that alters any site's answer must move it, and posts
    that leave every answer alone need not."""
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    number, parties = _advertise(coord, sites, ["alpha", "beta", "gamma"])
    quiet = moved = 0

    def step(action: Callable[[], object], poster: str | None = None) -> None:
        # A site's own post changes its own next answer, but it fetches only after
        # posting: what matters is every other site's waiting fetch.
        nonlocal quiet, moved
        version, before = coord.secure_version(), _answers(coord, number)
        action()
        after = _answers(coord, number)
        if any(after[key] != before[key] for key in after if key[0] != poster):
            assert coord.secure_version() != version, action
            moved += 1
        elif coord.secure_version() == version:
            quiet += 1

    # gamma vanishes after sharing keys: the masked stage closes at its deadline, by tick.
    for stage in STAGES[1:]:
        for name, party in parties.items():
            if name == "gamma" and stage is not Stage.SHARES:
                continue
            relayed = coord.secure_fetch(name, number, stage.value)
            assert relayed is not None
            body = party.respond(stage, relayed)
            step(partial(coord.secure_post, name, number, stage.value, body), name)
        if stage is Stage.MASKED:

            def deadline_passes() -> None:
                clock.now += 61
                coord.tick()

            step(deadline_passes)
    assert coord.federation.round_number == 1
    # One post per stage closes it (and the tick closed masking); the others moved nothing.
    assert (moved, quiet) == (4, 6)


def test_the_post_that_closes_a_stage_brings_back_the_next_relay_and_repeats_are_harmless(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    """A site's post answers with the next stage's relay once that stage has opened (one
    request less per stage); a post retried after its stage closed (its reply was lost)
    is a repeat, not a refusal; a site that never posted a stage cannot post it late."""
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    names = ["alpha", "beta", "gamma"]
    for name in names:
        coord.task_for(name)
    setups = {}
    for name in names[:2]:
        reply = coord.task_for(name)
        assert coord.round is not None
        setup = setup_for(
            coord.study,
            reply.round,
            coord.round.selected,
            coord.n_params,
            hashlib.sha256(reply.payload).hexdigest(),
        )
        setups[name] = sites[name].start(reply.payload, setup)
    number = coord.round.number
    keys = {n: p.respond(Stage.ADVERTISE, None) for n, p in setups.items()}
    # A post that leaves its stage collecting says at which version: the server's wait
    # skips asking for the next relay until that version moves.
    collecting = coord.secure_post("alpha", number, "advertise", keys["alpha"])
    assert collecting is not None
    assert collecting == coord.secure_version()
    assert coord.secure_next("alpha", number, "advertise") is None  # beta, gamma to come
    assert coord.secure_post("beta", number, "advertise", keys["beta"]) == collecting
    clock.now += 61  # gamma never advertises: the stage closes at its deadline
    coord.tick()
    assert coord.secure_version() != collecting
    relay = coord.secure_next("beta", number, "advertise")
    assert relay == coord.secure_fetch("beta", number, "shares")
    # A retry: no error, and no version to wait on, for the next relay is there now.
    assert coord.secure_post("alpha", number, "advertise", keys["alpha"]) is None
    assert coord.secure_next("alpha", number, "advertise") == coord.secure_fetch(
        "alpha", number, "shares"
    )
    with pytest.raises(RoundError, match="posts to stage advertise"):
        coord.secure_post("gamma", number, "advertise", keys["alpha"])
    assert coord.secure_next("alpha", number, "unmask") is None  # nothing after the last


def test_a_post_retried_after_its_round_closed_is_a_repeat_not_a_refusal(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    """The reply to the post that completes a round can be lost: the site's retry then
    reaches a coordinator that has closed the round (and opened the next). It is answered
    as the repeat it is, not as a round the site missed; a site that did not post that
    stage still cannot post it, and nothing changes the closed round."""
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    number, parties = _advertise(coord, sites, ["alpha", "beta", "gamma"])
    last: dict[str, bytes] = {}
    for stage in STAGES[1:]:
        for name, party in parties.items():
            if name == "gamma" and stage is Stage.UNMASK:
                continue  # gamma never answers the unmask request; its deadline passes
            relayed = coord.secure_fetch(name, number, stage.value)
            assert relayed is not None
            last[name] = party.respond(stage, relayed)
            coord.secure_post(name, number, stage.value, last[name])
    clock.now += 61
    coord.tick()
    assert coord.round is not None
    assert coord.round.number == number + 1
    params = coord.federation.params.copy()
    version = coord.secure_version()
    history = coord.state.rounds(coord.hash)
    assert history[0].status == "closed"

    assert coord.secure_post("beta", number, "unmask", last["beta"]) is None
    assert coord.secure_post("alpha", number, "confirm", b"{}") is None  # its first counted
    with pytest.raises(RoundError, match="posts to stage unmask"):
        coord.secure_post("gamma", number, "unmask", last["alpha"])
    with pytest.raises(RoundError, match="no secure aggregation for round 7"):
        coord.secure_post("alpha", 7, "unmask", last["alpha"])
    np.testing.assert_array_equal(coord.federation.params, params)
    assert coord.secure_version() == version
    assert coord.state.rounds(coord.hash) == history

    restarted = _coordinator(study, tmp_path, clock)  # who posted what is not persisted
    with pytest.raises(RoundError, match=f"no secure aggregation for round {number}"):
        restarted.secure_post("beta", number, "unmask", last["beta"])
    assert restarted.state.rounds(restarted.hash) == history
