"""The coordinator's secure rounds, driven in process: relay, dropouts, restarts, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter

from fedcare.coordinator.service import ForbiddenError, StudyCoordinator
from fedcare.coordinator.store import SqlStore
from fedcare.federation.messages import TaskState
from fedcare.federation.rounds import RoundError
from fedcare.privacy.secagg.messages import EncryptedShare, KeyAdvertisement, UnmaskRequest
from fedcare.privacy.secagg.site import SecureSite
from fedcare.privacy.secagg.study import setup_for
from fedcare.simulation.runner import run_federation
from fedcare.simulation.secure import secure_sites
from fedcare.simulation.transport import InProcessTransport
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

ADVERTS = TypeAdapter(tuple[KeyAdvertisement, ...])
SHARES = TypeAdapter(tuple[EncryptedShare, ...])
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


def _sites(study: Study, toy_sites: list[SiteDataset]) -> dict[str, SecureSite]:
    n_params = study.feature_schema.n_inputs + 1
    return secure_sites({s.name: SiteWorker(study, s, n_params) for s in toy_sites})


def _coordinator(study: Study, tmp_path: Path, clock: Clock) -> StudyCoordinator:
    store = SqlStore(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "models")
    return StudyCoordinator(study, ["alpha", "beta", "gamma"], store, clock=clock)


def _advertise(coord: StudyCoordinator, sites: dict[str, SecureSite], names: list[str]) -> int:
    number = 0
    for name in names:
        coord.task_for(name)  # the first round opens once min_sites have checked in
    for name in names:
        reply = coord.task_for(name)
        assert reply.state is TaskState.READY
        number = reply.round
        assert coord.round is not None
        setup = setup_for(coord.study, number, coord.round.selected, coord.n_params)
        body = sites[name].begin(reply.payload, setup).model_dump_json().encode()
        coord.secure_post(name, number, "advertise", body)
    return number


def _finish(
    coord: StudyCoordinator,
    sites: dict[str, SecureSite],
    number: int,
    names: list[str],
    clock: Clock,
    drop: str | None = None,
) -> None:
    for name in names:
        advs = ADVERTS.validate_json(coord.secure_fetch(name, number, "keys") or b"")
        coord.secure_post(
            name, number, "shares", sites[name].share_keys(advs).model_dump_json().encode()
        )
    for name in names:
        if name == drop:
            continue
        shares = SHARES.validate_json(coord.secure_fetch(name, number, "shares") or b"")
        coord.secure_post(name, number, "masked", sites[name].masked_input(shares))
    if drop is not None:
        assert coord.secure_fetch(names[0], number, "unmask") is None
        clock.now += 61  # the masking stage's deadline passes without the dropped site
    for name in names:
        if name == drop:
            continue
        request = UnmaskRequest.model_validate_json(
            coord.secure_fetch(name, number, "unmask") or b""
        )
        coord.secure_post(name, number, "unmask", sites[name].unmask(request).model_dump_json())


def test_secure_rounds_at_the_coordinator_match_the_simulation(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    names = ["alpha", "beta", "gamma"]
    for _ in range(2):
        number = _advertise(coord, sites, names)
        _finish(coord, sites, number, names, clock)
    assert coord.finished
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    expected, _ = run_federation(study, toy_sites, InProcessTransport(workers))
    np.testing.assert_array_equal(coord.federation.params, expected)
    history = coord.store.round_history(coord.hash)
    assert [h["status"] for h in history] == ["closed", "closed"]


def test_dropout_at_the_coordinator_is_recovered(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    number = _advertise(coord, sites, ["alpha", "beta", "gamma"])
    _finish(coord, sites, number, ["alpha", "beta", "gamma"], clock, drop="gamma")
    assert coord.federation.round_number == 1
    history = coord.store.round_history(coord.hash)[0]
    assert history["status"] == "closed"
    assert "gamma" in str(history["reason"])


def test_messages_claiming_another_site_and_plain_updates_are_refused(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    coord = _coordinator(study, tmp_path, clock)
    sites = _sites(study, toy_sites)
    for name in ("alpha", "beta"):
        coord.task_for(name)
    assert coord.round is not None
    setup = setup_for(study, 1, coord.round.selected, coord.n_params)
    reply = coord.task_for("beta")
    beta_keys = sites["beta"].begin(reply.payload, setup).model_dump_json().encode()
    with pytest.raises(RoundError, match="claiming to come from 'beta'"):
        coord.secure_post("alpha", 1, "advertise", beta_keys)
    with pytest.raises(ForbiddenError, match="secure aggregation"):
        coord.submit("alpha", 1, b"anything")
    with pytest.raises(RoundError, match="no secure aggregation for round 2"):
        coord.secure_post("beta", 2, "advertise", beta_keys)


def test_restarted_coordinator_starts_the_secure_round_again(
    study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    clock = Clock()
    names = ["alpha", "beta", "gamma"]
    sites = _sites(study, toy_sites)
    first = _coordinator(study, tmp_path, clock)
    number = _advertise(first, sites, names)
    assert first.secure_fetch("alpha", number, "keys") is not None
    first.store.close()
    # A new process on the same database: the round is open, its secure state is gone.
    again = _coordinator(study, tmp_path, clock)
    with pytest.raises(RoundError, match="no key advertisement"):
        again.secure_fetch("alpha", number, "keys")
    assert _advertise(again, sites, names) == number
    _finish(again, sites, number, names, clock)
    assert again.federation.round_number == 1
