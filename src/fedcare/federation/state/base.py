"""What the study service persists, and the interface both stores implement.

Every method is one atomic change: after a crash the state is as it was after
the last call that returned. Times are passed in (the service's clock), never
read here, so a simulation's virtual clock and the network's wall clock are
stored alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class StateError(RuntimeError):
    """Persisted state that is missing, inconsistent or corrupted."""


class SiteState(StrEnum):
    """A member site's standing in one study."""

    ACTIVE = "active"
    """Selected for rounds."""
    WITHDRAWN = "withdrawn"
    """It said it cannot take part (budget spent, approval withdrawn, data refused)."""
    INACTIVE = "inactive"
    """It missed ``rounds.inactive_after`` selected rounds in a row; active again once it
    next asks for work."""
    DROPPED = "dropped"
    """The operator took it out; only the operator admits it again."""


@dataclass(frozen=True)
class SiteRecord:
    site: str
    state: SiteState = SiteState.ACTIVE
    reason: str = ""
    changed_at: float = 0.0
    last_seen: float | None = None
    missed: int = 0
    """Selected rounds missed in a row."""
    contributed: int = 0
    """Rounds whose aggregate includes this site."""
    trained_for: int = 0
    """The round the site's latest accepted update was trained for: an update trained for
    it or an earlier one again is a replay (asynchronous mode takes older rounds' updates)."""


@dataclass(frozen=True)
class StudyRecord:
    hash: str
    name: str
    status: str
    last_round: int
    sites: tuple[str, ...]
    created_at: float
    spec_json: str = "{}"


@dataclass(frozen=True)
class StoredRound:
    number: int
    status: str
    selected: tuple[str, ...]
    min_sites: int
    deadline: float
    extensions_left: int
    reason: str
    submissions: dict[str, bytes]
    opened_at: float = 0.0
    closed_at: float | None = None
    participants: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenedRound:
    """A round as it opens."""

    number: int
    selected: tuple[str, ...]
    min_sites: int
    deadline: float
    extensions_left: int
    opened_at: float


@dataclass(frozen=True)
class FinishedRound:
    """How a round ended, with the model it made and the sites' standings after it."""

    number: int
    status: str
    reason: str
    participants: tuple[str, ...]
    model_bytes: bytes | None
    study_finished: bool
    sites: Sequence[SiteRecord]
    closed_at: float


@dataclass(frozen=True)
class StoredModel:
    round: int
    data: bytes
    """The model payload, checked against its recorded checksum."""


@dataclass(frozen=True)
class StoredReport:
    """A small report a site sent about itself (a drift summary, a round's alignment),
    kept over time. ``ref`` is the release or round it is about."""

    site: str
    kind: str
    ref: int
    body: str
    received_at: float


class StudyState(Protocol):
    """Studies, rounds, submissions, models and site standings."""

    def close(self) -> None:
        """Release connections; the state stays where it is kept."""
        ...

    def register_study(
        self, study_hash: str, name: str, spec_json: str, sites: Sequence[str], now: float
    ) -> bool:
        """Record a study the first time (True then); refuse a changed site list."""
        ...

    def studies(self) -> list[StudyRecord]:
        """Every study, oldest first."""
        ...

    def study(self, study_hash: str) -> StudyRecord:
        """One study, or :class:`StateError`."""
        ...

    def latest_model(self, study_hash: str) -> StoredModel | None:
        """The newest model of a study, checked."""
        ...

    def open_round(self, study_hash: str) -> StoredRound | None:
        """The round that is open or collecting, with its submissions, if any."""
        ...

    def save_opened_round(self, study_hash: str, opened: OpenedRound) -> None: ...

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
        """Keep an accepted update, trained for round ``trained_for``, record that round as
        the site's latest, and move round ``number`` to collecting."""
        ...

    def save_extended(self, study_hash: str, number: int, deadline: float, left: int) -> None: ...

    def save_finished_round(self, study_hash: str, finished: FinishedRound) -> None:
        """Close or fail a round, with its model and the sites' new standings, at once."""
        ...

    def rounds(self, study_hash: str) -> list[StoredRound]:
        """Every round of a study, oldest first (without submission payloads)."""
        ...

    def sites(self, study_hash: str) -> Mapping[str, SiteRecord]:
        """Every member site's standing (active with no history when never recorded)."""
        ...

    def save_standing(
        self,
        study_hash: str,
        site: str,
        state: SiteState,
        reason: str,
        now: float,
        reset_missed: bool = False,
    ) -> SiteRecord:
        """Record a site's new standing (its counters kept, or its misses reset); returns
        the record as stored. Any process may call it: the operator's commands do."""
        ...

    def add_site(self, study_hash: str, site: str, reason: str, now: float) -> bool:
        """Add ``site`` to a running study's members (active, with ``reason``); False if it
        is one already. Any process may call it; a running service takes it up at its
        next round boundary."""
        ...

    def save_seen(self, study_hash: str, site: str, now: float) -> None:
        """Record when a site was last heard from."""
        ...

    def save_report(
        self, study_hash: str, site: str, kind: str, ref: int, body: str, now: float
    ) -> bool:
        """Keep a site's report; False when the identical report is already kept."""
        ...

    def reports(self, study_hash: str, kind: str) -> list[StoredReport]:
        """Every report of ``kind`` for the study, oldest first."""
        ...
