"""What a study's status shows: views of its rounds and sites for the API and for
``fedcare coordinator status``, which reads them from the state alone."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel

from fedcare.drift.alignment import drifting_sites
from fedcare.federation.state import SiteRecord, SiteState, StateError, StoredRound, StudyState
from fedcare.releases.registry import ReleaseRegistry
from fedcare.study import MonitoringSpec

GONE = (SiteState.WITHDRAWN, SiteState.DROPPED)
"""Standings a round does not wait for."""


class OpenRoundView(BaseModel):
    number: int
    status: str
    selected: list[str]
    reported: list[str]
    waiting_for: list[str]
    deadline: float


class SiteView(BaseModel):
    """A site's standing in a study, for status pages."""

    site: str
    state: str
    reason: str
    last_seen: float | None
    missed: int
    contributed: int


class RoundView(BaseModel):
    number: int
    status: str
    selected: list[str]
    participants: list[str]
    reason: str
    opened_at: float
    closed_at: float | None


class StudyStatus(BaseModel):
    """A study's progress: never an update. Sites see only their own standing."""

    study_hash: str
    name: str
    status: str
    rounds_total: int
    last_round: int
    sites: list[str]
    open_round: OpenRoundView | None
    history: list[RoundView]
    standings: list[SiteView]
    drifting: dict[str, int] = {}
    """Sites flagged as pulling away from the consortium, with the round that flagged
    them (docs/drift.md); a site sees only its own flag."""


def round_views(rounds: Sequence[StoredRound]) -> list[RoundView]:
    return [
        RoundView(
            number=r.number,
            status=r.status,
            selected=list(r.selected),
            participants=list(r.participants or sorted(r.submissions)),
            reason=r.reason,
            opened_at=r.opened_at,
            closed_at=r.closed_at,
        )
        for r in rounds
    ]


def site_views(records: Sequence[SiteRecord]) -> list[SiteView]:
    return [
        SiteView(
            site=r.site,
            state=r.state.value,
            reason=r.reason,
            last_seen=r.last_seen,
            missed=r.missed,
            contributed=r.contributed,
        )
        for r in sorted(records, key=lambda r: r.site)
    ]


class ReleaseView(BaseModel):
    id: int
    round: int
    state: str
    reason: str
    suspended_at: dict[str, str] = {}
    """Sites where the promoted release is suspended, with why (docs/drift.md)."""


class StudyOverview(BaseModel):
    """A study as the operator sees it, read from the state alone (no running service)."""

    study_hash: str
    name: str
    status: str
    rounds_total: int
    last_round: int
    open_round: OpenRoundView | None
    sites: list[SiteView]
    releases: list[ReleaseView]
    drifting: dict[str, int] = {}
    """Sites flagged as pulling away from the consortium, with the round that flagged them."""


def overview(
    state: StudyState, study_hash: str, registry: ReleaseRegistry | None = None
) -> StudyOverview:
    """Everything ``fedcare coordinator status`` shows for one study. Under secure
    aggregation who has posted lives only in the running coordinator's memory, so an
    open secure round shows no reports here."""
    record = state.study(study_hash)
    standings = state.sites(study_hash)
    stored = state.open_round(study_hash)
    open_round = None
    if stored is not None:
        gone = {s for s, r in standings.items() if r.state in GONE}
        reported = sorted(stored.submissions)
        open_round = OpenRoundView(
            number=stored.number,
            status=stored.status,
            selected=list(stored.selected),
            reported=reported,
            waiting_for=sorted(set(stored.selected) - set(reported) - gone),
            deadline=stored.deadline,
        )
    releases = [] if registry is None else registry.releases(study_hash)
    monitoring = json.loads(record.spec_json).get("monitoring")
    drifting: dict[str, int] = {}
    if monitoring is not None:
        training = MonitoringSpec.model_validate(monitoring).training
        cosines: dict[str, list[tuple[int, float]]] = {}
        for report in state.reports(study_hash, "alignment"):
            cosines.setdefault(report.site, []).append(
                (report.ref, float(json.loads(report.body)["cosine"]))
            )
        drifting = drifting_sites(cosines, training.min_cosine, training.rounds)
    return StudyOverview(
        study_hash=study_hash,
        name=record.name,
        status=record.status,
        rounds_total=int(json.loads(record.spec_json).get("rounds", {}).get("count", 0)),
        last_round=record.last_round,
        open_round=open_round,
        sites=site_views(list(standings.values())),
        releases=[
            ReleaseView(
                id=r.id,
                round=r.round,
                state=r.state.value,
                reason=r.reason,
                suspended_at={x.site: x.reason for x in r.suspended},
            )
            for r in releases
        ],
        drifting=drifting,
    )


def find_study(state: StudyState, key: str) -> str:
    """The hash of the study named ``key`` or whose hash starts with it (six or more
    characters); a one-line error when none or several match."""
    studies = state.studies()
    matches = [s.hash for s in studies if s.name == key]
    if not matches and len(key) >= 6:
        matches = [s.hash for s in studies if s.hash.startswith(key.lower())]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f"{s.name} ({s.hash[:12]})" for s in studies) or "none"
    if not matches:
        raise StateError(f"no study '{key}' at this coordinator (studies: {known})")
    raise StateError(f"'{key}' matches {len(matches)} studies; give more of the hash")
