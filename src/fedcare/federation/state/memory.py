"""The study state in memory: the simulation's store. Same behaviour as the SQL store,
gone when the process ends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from fedcare.federation.state.base import (
    FinishedRound,
    OpenedRound,
    SiteRecord,
    SiteState,
    StateError,
    StoredModel,
    StoredReport,
    StoredRound,
    StudyRecord,
)


@dataclass
class _Study:
    record: StudyRecord
    rounds: dict[int, StoredRound] = field(default_factory=dict)
    models: dict[int, bytes] = field(default_factory=dict)
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    reports: list[StoredReport] = field(default_factory=list)
    _members: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    _members_of: tuple[str, ...] | None = field(default=None, init=False, repr=False)

    @property
    def members(self) -> frozenset[str]:
        # Kept beside the record's sorted tuple: a thousand sites each look themselves up
        # several times a round.
        if self._members_of is not self.record.sites:
            self._members = frozenset(self.record.sites)
            self._members_of = self.record.sites
        return self._members


class MemoryState:
    """:class:`~fedcare.federation.state.base.StudyState` in dictionaries."""

    def __init__(self) -> None:
        self._studies: dict[str, _Study] = {}

    def close(self) -> None:
        return None

    def _get(self, study_hash: str) -> _Study:
        found = self._studies.get(study_hash)
        if found is None:
            raise StateError(f"unknown study {study_hash[:12]}")
        return found

    def register_study(
        self, study_hash: str, name: str, spec_json: str, sites: Sequence[str], now: float
    ) -> bool:
        existing = self._studies.get(study_hash)
        if existing is None:
            record = StudyRecord(
                study_hash, name, "running", 0, tuple(sorted(sites)), now, spec_json
            )
            self._studies[study_hash] = _Study(record)
            return True
        if list(existing.record.sites) != sorted(sites):
            raise StateError(
                f"study {study_hash[:12]} was started with sites {list(existing.record.sites)}; "
                f"the config now lists {sorted(sites)}"
            )
        return False

    def studies(self) -> list[StudyRecord]:
        return sorted((s.record for s in self._studies.values()), key=lambda r: r.created_at)

    def study(self, study_hash: str) -> StudyRecord:
        return self._get(study_hash).record

    def latest_model(self, study_hash: str) -> StoredModel | None:
        models = self._get(study_hash).models
        if not models:
            return None
        last = max(models)
        return StoredModel(last, models[last])

    def open_round(self, study_hash: str) -> StoredRound | None:
        for stored in self._get(study_hash).rounds.values():
            if stored.status in ("open", "collecting"):
                # A snapshot, as the SQL store gives: later submissions do not change it.
                return replace(stored, submissions=dict(stored.submissions))
        return None

    def save_opened_round(self, study_hash: str, opened: OpenedRound) -> None:
        rounds = self._get(study_hash).rounds
        if opened.number in rounds:
            raise StateError(f"round {opened.number} of study {study_hash[:12]} was opened already")
        rounds[opened.number] = StoredRound(
            opened.number,
            "open",
            opened.selected,
            opened.min_sites,
            opened.deadline,
            opened.extensions_left,
            "",
            {},
            opened_at=opened.opened_at,
        )

    def _round(self, study_hash: str, number: int) -> StoredRound:
        stored = self._get(study_hash).rounds.get(number)
        if stored is None:
            raise StateError(f"round {number} was never opened")
        return stored

    def save_submission(
        self,
        study_hash: str,
        number: int,
        site: str,
        n_samples: int,
        payload: bytes,
        now: float,
        trained_for: int,
    ) -> None:
        del n_samples, now
        stored = self._round(study_hash, number)
        if site in stored.submissions:
            raise StateError(f"round {number} already holds an update from {site}")
        record = self._site(study_hash, site)
        study = self._get(study_hash)
        # The round's submissions are this store's own (readers get copies: rounds() without
        # them, open_round() a snapshot): added in place, not copied per site, which at a
        # thousand sites was quadratic.
        stored.submissions[site] = payload
        if stored.status != "collecting":
            study.rounds[number] = replace(stored, status="collecting")
        study.sites[site] = replace(record, trained_for=max(record.trained_for, trained_for))

    def save_extended(self, study_hash: str, number: int, deadline: float, left: int) -> None:
        stored = self._round(study_hash, number)
        self._get(study_hash).rounds[number] = replace(
            stored, deadline=deadline, extensions_left=left
        )

    def save_finished_round(self, study_hash: str, finished: FinishedRound) -> None:
        study = self._get(study_hash)
        number = finished.number
        study.rounds[number] = replace(
            self._round(study_hash, number),
            status=finished.status,
            reason=finished.reason,
            closed_at=finished.closed_at,
            participants=finished.participants,
        )
        if finished.model_bytes is not None:
            study.models[number] = finished.model_bytes
        study.record = replace(
            study.record,
            last_round=number,
            status="finished" if finished.study_finished else study.record.status,
        )
        for record in finished.sites:
            study.sites[record.site] = record

    def rounds(self, study_hash: str) -> list[StoredRound]:
        study = self._get(study_hash)
        return [replace(study.rounds[n], submissions={}) for n in sorted(study.rounds)]

    def sites(self, study_hash: str) -> Mapping[str, SiteRecord]:
        study = self._get(study_hash)
        return {s: study.sites.get(s, SiteRecord(s)) for s in study.record.sites}

    def _site(self, study_hash: str, site: str) -> SiteRecord:
        study = self._get(study_hash)
        if site not in study.members:
            raise StateError(f"site '{site}' is not a member of study {study_hash[:12]}")
        return study.sites.get(site, SiteRecord(site))

    def save_standing(
        self,
        study_hash: str,
        site: str,
        state: SiteState,
        reason: str,
        now: float,
        reset_missed: bool = False,
    ) -> SiteRecord:
        old = self._site(study_hash, site)
        new = replace(
            old,
            state=state,
            reason=reason,
            changed_at=now,
            missed=0 if reset_missed else old.missed,
        )
        self._get(study_hash).sites[site] = new
        return new

    def add_site(self, study_hash: str, site: str, reason: str, now: float) -> bool:
        study = self._get(study_hash)
        if site in study.members:
            return False
        study.record = replace(study.record, sites=tuple(sorted((*study.record.sites, site))))
        study.sites[site] = SiteRecord(site, SiteState.ACTIVE, reason, now)
        return True

    def save_seen(self, study_hash: str, site: str, now: float) -> None:
        old = self._site(study_hash, site)
        self._get(study_hash).sites[site] = replace(old, last_seen=now)

    def save_report(
        self, study_hash: str, site: str, kind: str, ref: int, body: str, now: float
    ) -> bool:
        kept = self._get(study_hash).reports
        if any((r.site, r.kind, r.ref, r.body) == (site, kind, ref, body) for r in kept):
            return False
        kept.append(StoredReport(site, kind, ref, body, now))
        return True

    def reports(self, study_hash: str, kind: str) -> list[StoredReport]:
        return [r for r in self._get(study_hash).reports if r.kind == kind]
