"""Faults leave a trace (issue 21, point 6): the coordinator's trail after a kill -9
between a commit and its audit entry."""

from __future__ import annotations

from pathlib import Path

from fedcare.audit import AuditLog, read_entries, verify
from fedcare.federation.service import StudyService
from fedcare.federation.state.sql import SqlState
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

NAMES = ("alpha", "beta", "gamma")


def _service(study: Study, folder: Path) -> StudyService:
    state = SqlState(f"sqlite:///{folder / 'coordinator.db'}", folder / "models")
    return StudyService(
        study, list(NAMES), state, audit=AuditLog(folder / "audit.jsonl", "coordinator")
    )


def test_an_update_committed_but_never_audited_is_recovered_at_start(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = toy_study.replace(
        rounds={**toy_study.rounds.model_dump(), "count": 2, "min_sites": 3, "deadline_s": 600}
    )
    service = _service(study, tmp_path)
    workers = {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in toy_sites}
    for name in NAMES:
        service.task_for(name)
    for name in NAMES[:2]:
        reply = service.task_for(name)
        service.submit(name, reply.round, workers[name].handle(reply.payload))
    service.state.close()
    trail = tmp_path / "audit.jsonl"
    lines = trail.read_bytes().splitlines(keepends=True)
    lost = read_entries(trail)[-1]
    assert lost.event == "update.received"
    assert lost.details["site"] == "beta"
    # The kill came after beta's update was committed and before its entry was written.
    trail.write_bytes(b"".join(lines[:-1]))

    restarted = _service(study, tmp_path)
    entries = read_entries(trail)
    received = [e for e in entries if e.event == "update.received"]
    assert [e.details["site"] for e in received] == ["alpha", "beta"]
    assert "recovered" not in received[0].details
    assert "at start-up" in str(received[1].details["recovered"])
    assert received[1].details["sha256"] == lost.details["sha256"]
    assert received[1].details["n_samples"] == lost.details["n_samples"]
    assert verify(trail).ok
    restarted.state.close()

    # A second start finds nothing missing and adds nothing.
    again = _service(study, tmp_path)
    assert len(read_entries(trail)) == len(entries)
    reply = again.task_for("gamma")
    again.submit("gamma", reply.round, workers["gamma"].handle(reply.payload))
    events = [e.event for e in read_entries(trail)]
    assert events.count("round.closed") == 1
    assert events.count("round.opened") == 2
    again.state.close()


def test_a_round_closed_but_never_audited_is_recovered_at_start(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = toy_study.replace(
        rounds={**toy_study.rounds.model_dump(), "count": 1, "min_sites": 3, "deadline_s": 600}
    )
    service = _service(study, tmp_path)
    workers = {s.name: SiteWorker(study, s, study.feature_schema.n_inputs + 1) for s in toy_sites}
    for name in NAMES:
        service.task_for(name)
    for name in NAMES:
        reply = service.task_for(name)
        service.submit(name, reply.round, workers[name].handle(reply.payload))
    service.state.close()
    trail = tmp_path / "audit.jsonl"
    entries = read_entries(trail)
    assert [e.event for e in entries[-2:]] == ["round.closed", "study.finished"]
    lines = trail.read_bytes().splitlines(keepends=True)
    trail.write_bytes(b"".join(lines[:-2]))

    _service(study, tmp_path).state.close()
    repaired = read_entries(trail)
    assert [e.event for e in repaired[-2:]] == ["round.closed", "study.finished"]
    assert repaired[-2].details["participants"] == list(NAMES)
    assert all("recovered" in e.details for e in repaired[-2:])
