"""One test suite for both study stores: in memory (the simulation's) and SQL (the network's).

Every behaviour the study service relies on is checked against each, so the two
cannot drift (Flower's LinkState tests are the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcare.federation.state import (
    FinishedRound,
    MemoryState,
    OpenedRound,
    SiteRecord,
    SiteState,
    StateError,
    StudyState,
)
from fedcare.federation.state.sql import SqlState

from .databases import BACKENDS, database

H = "a" * 64
OTHER = "b" * 64
SITES = ["alpha", "beta", "gamma"]


@pytest.fixture(params=["memory", *BACKENDS])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StudyState]:
    """One shared suite for every implementation: in memory, SQLite and PostgreSQL."""
    if request.param == "memory":
        store: StudyState = MemoryState()
        yield store
        store.close()
        return
    with database(request.param, tmp_path) as url:
        store = SqlState(url, tmp_path / "models")
        yield store
        store.close()


def _open(state: StudyState, number: int = 1) -> None:
    state.save_opened_round(
        H, OpenedRound(number, ("alpha", "beta"), 2, 100.0 + number, 1, 10.0 * number)
    )


def test_a_study_is_registered_once_and_its_site_list_cannot_change(state: StudyState) -> None:
    assert state.register_study(H, "toy", "{}", SITES, 1.0) is True
    assert state.register_study(H, "toy", "{}", list(reversed(SITES)), 2.0) is False
    with pytest.raises(StateError, match="was started with sites"):
        state.register_study(H, "toy", "{}", ["alpha", "beta"], 3.0)
    record = state.study(H)
    assert (record.name, record.status, record.last_round, record.sites) == (
        "toy",
        "running",
        0,
        tuple(SITES),
    )
    assert [s.hash for s in state.studies()] == [H]
    with pytest.raises(StateError, match="unknown study"):
        state.study(OTHER)


def test_an_open_round_keeps_its_submissions_until_it_finishes(state: StudyState) -> None:
    state.register_study(H, "toy", "{}", SITES, 1.0)
    assert state.open_round(H) is None
    _open(state)
    with pytest.raises(StateError, match="opened already"):
        _open(state)
    state.save_submission(H, 1, "alpha", 40, b"update-a", 11.0, 1)
    with pytest.raises(StateError, match="already holds an update"):
        state.save_submission(H, 1, "alpha", 40, b"other", 11.5, 1)
    state.save_extended(H, 1, 250.0, 0)
    stored = state.open_round(H)
    assert stored is not None
    assert (stored.number, stored.status, stored.selected) == (1, "collecting", ("alpha", "beta"))
    assert (stored.deadline, stored.extensions_left, stored.min_sites) == (250.0, 0, 2)
    assert stored.submissions == {"alpha": b"update-a"}
    # What was read is a snapshot: a later submission does not change it.
    state.save_submission(H, 1, "beta", 30, b"update-b", 12.0, 1)
    assert stored.submissions == {"alpha": b"update-a"}
    again = state.open_round(H)
    assert again is not None
    assert again.submissions == {"alpha": b"update-a", "beta": b"update-b"}
    # The round the update was trained for is kept with the site: a replay check.
    assert state.sites(H)["alpha"].trained_for == 1
    assert state.sites(H)["beta"].trained_for == 1
    with pytest.raises(StateError, match="never opened"):
        state.save_submission(H, 7, "alpha", 40, b"x", 12.0, 7)


def test_a_finished_round_records_model_participants_and_standings(state: StudyState) -> None:
    state.register_study(H, "toy", "{}", SITES, 1.0)
    _open(state)
    records = [SiteRecord("alpha", contributed=1), SiteRecord("beta", missed=1)]
    state.save_finished_round(
        H, FinishedRound(1, "closed", "", ("alpha",), b"model-1", False, records, 20.0)
    )
    assert state.open_round(H) is None
    assert state.study(H).last_round == 1
    model = state.latest_model(H)
    assert model is not None
    assert (model.round, model.data) == (1, b"model-1")
    _open(state, 2)
    state.save_finished_round(H, FinishedRound(2, "failed", "too few", (), None, True, [], 30.0))
    assert state.study(H).status == "finished"
    latest = state.latest_model(H)
    assert latest is not None
    assert latest.round == 1
    history = state.rounds(H)
    assert [(r.number, r.status, r.participants, r.closed_at) for r in history] == [
        (1, "closed", ("alpha",), 20.0),
        (2, "failed", (), 30.0),
    ]
    assert history[0].submissions == {}
    sites = state.sites(H)
    assert sites["alpha"].contributed == 1
    assert sites["beta"].missed == 1
    assert sites["gamma"] == SiteRecord("gamma")


def test_standings_change_without_losing_counters(state: StudyState) -> None:
    state.register_study(H, "toy", "{}", SITES, 1.0)
    _open(state)
    state.save_finished_round(
        H,
        FinishedRound(
            1, "closed", "", ("alpha",), b"m", False, [SiteRecord("beta", missed=2)], 5.0
        ),
    )
    dropped = state.save_standing(H, "beta", SiteState.DROPPED, "operator", 6.0)
    assert (dropped.state, dropped.reason, dropped.changed_at, dropped.missed) == (
        SiteState.DROPPED,
        "operator",
        6.0,
        2,
    )
    admitted = state.save_standing(H, "beta", SiteState.ACTIVE, "back", 7.0, reset_missed=True)
    assert admitted.missed == 0
    assert state.sites(H)["beta"].state is SiteState.ACTIVE
    state.save_seen(H, "gamma", 8.0)
    assert state.sites(H)["gamma"].last_seen == 8.0
    with pytest.raises(StateError, match="not a member"):
        state.save_standing(H, "mallory", SiteState.ACTIVE, "", 9.0)
    with pytest.raises(StateError, match="not a member"):
        state.save_seen(H, "mallory", 9.0)


def test_studies_are_kept_apart(state: StudyState) -> None:
    state.register_study(H, "one", "{}", SITES, 1.0)
    state.register_study(OTHER, "two", "{}", ["alpha"], 2.0)
    _open(state)
    assert state.open_round(OTHER) is None
    assert [s.name for s in state.studies()] == ["one", "two"]
    assert list(state.sites(OTHER)) == ["alpha"]


def test_site_reports_are_kept_over_time_once_each_and_per_study(state: StudyState) -> None:
    state.register_study(H, "one", "{}", SITES, 1.0)
    state.register_study(OTHER, "two", "{}", ["alpha"], 2.0)
    assert state.save_report(H, "alpha", "drift", 1, '{"n": 1}', 10.0)
    assert not state.save_report(H, "alpha", "drift", 1, '{"n": 1}', 11.0)  # exact retry
    assert state.save_report(H, "alpha", "drift", 1, '{"n": 2}', 12.0)  # a later run
    assert state.save_report(H, "beta", "alignment", 3, '{"c": 0.5}', 13.0)
    drift = state.reports(H, "drift")
    assert [(r.site, r.ref, r.body, r.received_at) for r in drift] == [
        ("alpha", 1, '{"n": 1}', 10.0),
        ("alpha", 1, '{"n": 2}', 12.0),
    ]
    assert [r.kind for r in state.reports(H, "alignment")] == ["alignment"]
    assert state.reports(OTHER, "drift") == []
    with pytest.raises(StateError, match="unknown study"):
        state.reports("c" * 64, "drift")
    with pytest.raises(StateError, match="unknown study"):
        state.save_report("c" * 64, "alpha", "drift", 1, "{}", 14.0)


def test_sql_state_survives_a_reopen(database_url: str, tmp_path: Path) -> None:
    url = database_url
    first = SqlState(url, tmp_path / "models")
    first.register_study(H, "toy", "{}", SITES, 1.0)
    _open(first)
    first.save_submission(H, 1, "alpha", 40, b"update-a", 11.0, 1)
    first.close()
    again = SqlState(url, tmp_path / "models")
    stored = again.open_round(H)
    assert stored is not None
    assert stored.submissions == {"alpha": b"update-a"}
    again.close()


def test_sql_state_refuses_an_old_database(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("create table studies (hash text primary key)")
    with pytest.raises(StateError, match="another fedcare version"):
        SqlState(f"sqlite:///{tmp_path / 'old.db'}", tmp_path / "models")


def test_sql_state_refuses_a_model_file_that_changed(tmp_path: Path) -> None:
    state = SqlState(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "models")
    state.register_study(H, "toy", "{}", SITES, 1.0)
    _open(state)
    state.save_finished_round(
        H, FinishedRound(1, "closed", "", ("alpha",), b"model", False, [], 2.0)
    )
    path = next((tmp_path / "models").rglob("*.safetensors"))
    path.write_bytes(b"tampered")
    with pytest.raises(StateError, match="does not match its recorded checksum"):
        state.latest_model(H)
    state.close()


def test_a_site_added_to_a_running_study_is_a_member_with_a_standing(state: StudyState) -> None:
    state.register_study(H, "toy", "{}", SITES, 1.0)
    assert state.add_site(H, "delta", "joined", 5.0)
    assert not state.add_site(H, "delta", "again", 6.0)
    assert state.study(H).sites == ("alpha", "beta", "delta", "gamma")
    record = state.sites(H)["delta"]
    assert (record.state, record.reason, record.changed_at) == (SiteState.ACTIVE, "joined", 5.0)
    state.save_seen(H, "delta", 7.0)  # a member now, to every call that checks membership
    assert state.sites(H)["delta"].last_seen == 7.0
    with pytest.raises(StateError, match="not a member"):
        state.save_seen(H, "epsilon", 7.0)
    with pytest.raises(StateError, match="unknown study"):
        state.add_site(OTHER, "delta", "joined", 5.0)
