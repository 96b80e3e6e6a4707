"""The round state machine: open -> collecting -> aggregating -> closed (or failed).

Pure state, no I/O and no clock of its own: callers pass ``now``. The study
service drives and persists it. Nothing waits forever: at the deadline a round
closes with whoever reported, is extended, or fails with a reason.

In asynchronous mode a round is one buffer flush: it takes updates trained on
any of the last ``max_staleness`` model versions, closes as soon as ``buffer``
of them are in, and weights each by its staleness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedcare.aggregation import client_weights, weighted_mean
from fedcare.aggregation.robust import RobustError, robust_aggregate
from fedcare.federation.messages import SiteUpdate
from fedcare.study import RobustSpec, Weighting


class RoundStatus(StrEnum):
    OPEN = "open"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


class RoundError(ValueError):
    """An update or transition the round refuses, with the reason."""


@dataclass(frozen=True)
class SummedUpdate:
    """What a securely aggregated round yields instead of individual updates: the sum of
    the participants' weighted deltas and the sum of their weights."""

    participants: tuple[str, ...]
    weighted_sum: NDArray[np.float64]
    weight_sum: float
    mean_loss: float | None = None


@dataclass
class Round:
    """One round of a study."""

    study_hash: str
    number: int
    selected: tuple[str, ...]
    min_sites: int
    deadline: float
    extension_s: float = 0.0
    extensions_left: int = 0
    status: RoundStatus = RoundStatus.OPEN
    reason: str = ""
    updates: dict[str, SiteUpdate] = field(default_factory=dict)
    summed: SummedUpdate | None = None
    excused: set[str] = field(default_factory=set)
    """Selected sites the round no longer waits for (withdrawn or dropped since it opened)."""
    buffer: int | None = None
    """Asynchronous mode: the round closes once this many updates are in."""
    max_staleness: int = 0
    """How many versions older than this round's model an update may be trained on."""
    max_records: int = 2**53
    """Most training records one update may claim (the study's aggregation.max_records)."""

    def __post_init__(self) -> None:
        if not self.selected:
            raise RoundError("a round needs at least one selected site")
        if self.min_sites > len(self.selected):
            raise RoundError(
                f"min_sites {self.min_sites} exceeds the {len(self.selected)} selected site(s)"
            )

    @property
    def finished(self) -> bool:
        return self.status in (RoundStatus.CLOSED, RoundStatus.FAILED)

    @property
    def reporters(self) -> tuple[str, ...]:
        """The sites whose updates count: those that submitted, or the secure sum's."""
        if self.summed is not None:
            return self.summed.participants
        return tuple(sorted(self.updates))

    @property
    def waiting_for(self) -> tuple[str, ...]:
        """Selected sites that may still report."""
        return tuple(sorted(set(self.selected) - set(self.reporters) - self.excused))

    def staleness(self, update: SiteUpdate) -> int:
        """How many model versions old the model ``update`` was trained on is."""
        return self.number - update.header.round

    def excuse(self, site: str) -> None:
        """Stop waiting for ``site``; an update it already sent still counts."""
        if site in self.selected:
            self.excused.add(site)

    def submit_sum(self, summed: SummedUpdate) -> None:
        """Accept the result of secure aggregation in place of individual updates."""
        if self.status not in (RoundStatus.OPEN, RoundStatus.COLLECTING) or self.summed:
            raise RoundError(f"round {self.number} is {self.status}; it takes no secure sum")
        if self.updates:
            raise RoundError(f"round {self.number} already holds individual updates")
        if not set(summed.participants) <= set(self.selected) or not summed.participants:
            raise RoundError("a secure sum must come from sites selected for the round")
        if not summed.weight_sum > 0:
            raise RoundError("a secure sum needs a positive weight sum")
        self.summed = summed
        self.status = RoundStatus.COLLECTING

    def fail(self, reason: str) -> None:
        """End the round without aggregating, e.g. when secure aggregation could not finish."""
        if self.finished:
            raise RoundError(f"round {self.number} is already {self.status}")
        self.status = RoundStatus.FAILED
        self.reason = reason

    def submit(self, update: SiteUpdate) -> bool:
        """Accept a site's update. Returns False for an exact resubmission (idempotent)."""
        if self.summed is not None:
            raise RoundError(f"round {self.number} is securely aggregated; no individual updates")
        header = update.header
        if header.study_hash != self.study_hash:
            raise RoundError("update is for a different study")
        if header.round > self.number:
            raise RoundError(f"update is for round {header.round}, this is round {self.number}")
        if self.number - header.round > self.max_staleness:
            if self.max_staleness == 0:
                raise RoundError(f"update is for round {header.round}, this is round {self.number}")
            raise RoundError(
                f"stale: the update was trained for round {header.round}, "
                f"{self.number - header.round} model versions ago; the study accepts at most "
                f"{self.max_staleness} (participation.max_staleness): train on the current model"
            )
        if self.status not in (RoundStatus.OPEN, RoundStatus.COLLECTING):
            raise RoundError(f"round {self.number} is {self.status}; it takes no more updates")
        if header.site not in self.selected:
            raise RoundError(f"site '{header.site}' was not selected for round {self.number}")
        if header.n_samples > self.max_records:
            raise RoundError(
                f"site '{header.site}' claims {header.n_samples} training records; the study "
                f"allows at most {self.max_records} (aggregation.max_records)"
            )
        if header.site in self.excused and header.site not in self.updates:
            raise RoundError(f"site '{header.site}' no longer takes part in round {self.number}")
        previous = self.updates.get(header.site)
        if previous is not None:
            if previous.header == header and np.array_equal(previous.delta, update.delta):
                return False
            raise RoundError(f"site '{header.site}' already submitted a different update")
        self.updates[header.site] = update
        self.status = RoundStatus.COLLECTING
        return True

    def due(self, now: float) -> bool:
        """True when the round should be closed now: every selected site still taking part
        reported, or the deadline passed."""
        if self.finished:
            return False
        if self.summed is not None:
            return True
        if self.buffer is not None and len(self.updates) >= self.buffer:
            return True
        # Counted, not :attr:`waiting_for`'s sorted set difference: this runs on every
        # submission, and a thousand sites made that quadratic. Both updates and
        # excused sites are among the selected (submit and excuse insist).
        excused_silent = sum(1 for site in self.excused if site not in self.updates)
        return len(self.updates) + excused_silent >= len(self.selected) or now >= self.deadline

    def close(
        self,
        now: float,
        weighting: Weighting,
        cap: float | None = None,
        stale_factor: Callable[[int], float] | None = None,
        robust: RobustSpec | None = None,
    ) -> NDArray[np.float32] | None:
        """Aggregate if enough sites reported; otherwise extend or fail.

        Returns the weighted mean delta (or the ``robust`` aggregate) when the round
        closes, None when it was extended or failed (see ``status`` and ``reason``); a
        result that is not finite fails the round. ``stale_factor`` scales each
        update's client weight by its staleness (asynchronous mode); under secure
        aggregation each site applied it before masking.
        """
        if self.finished:
            raise RoundError(f"round {self.number} is already {self.status}")
        if not self.due(now):
            raise RoundError(
                f"round {self.number} is not due: {len(self.updates)} of "
                f"{len(self.selected)} site(s) reported and the deadline has not passed"
            )
        if len(self.reporters) < self.min_sites:
            # A secure sum is final, and sites that left will not report: waiting
            # longer helps only when someone selected may still answer.
            if self.extensions_left > 0 and self.summed is None and self.waiting_for:
                self.extensions_left -= 1
                self.deadline = now + self.extension_s
                return None
            self.status = RoundStatus.FAILED
            self.reason = (
                f"only {len(self.reporters)} of {len(self.selected)} site(s) reported"
                f"{' by the deadline' if self.waiting_for else ''}; at least "
                f"{self.min_sites} needed"
            )
            return None
        if self.summed is not None:
            self.status = RoundStatus.AGGREGATING
            mean = (self.summed.weighted_sum / self.summed.weight_sum).astype(np.float32)
            return self._finite(mean, self.summed.participants)
        sites = sorted(self.updates)
        counts = [self.updates[s].header.n_samples for s in sites]
        try:
            weights = client_weights(counts, weighting, cap)
        except ValueError as exc:
            self.status = RoundStatus.FAILED
            self.reason = f"cannot weight the {len(sites)} update(s): {exc}"
            return None
        if stale_factor is not None:
            factors = [stale_factor(self.staleness(self.updates[s])) for s in sites]
            weights = weights * np.asarray(factors, dtype=np.float64)
        self.status = RoundStatus.AGGREGATING
        deltas = [self.updates[s].delta for s in sites]
        try:
            # Overflow to inf in the float32 result is caught below, not warned about.
            with np.errstate(over="ignore", invalid="ignore"):
                if robust is None:
                    mean = weighted_mean(deltas, weights)
                else:
                    mean = robust_aggregate(np.stack(deltas), weights, robust)
        except RobustError as exc:
            self.status = RoundStatus.FAILED
            self.reason = f"cannot aggregate robustly: {exc}"
            return None
        return self._finite(mean, sites)

    def _finite(
        self, mean: NDArray[np.float32], sites: Sequence[str]
    ) -> NDArray[np.float32] | None:
        if not np.all(np.isfinite(mean)):
            # float32 overflow of finite but huge updates: the model must not move.
            self.status = RoundStatus.FAILED
            self.reason = (
                f"the aggregate of {len(sites)} update(s) is not finite (NaN or beyond "
                "float32); the model does not move"
            )
            return None
        return self._closed(mean, sites)

    def _closed(self, mean: NDArray[np.float32], sites: Sequence[str]) -> NDArray[np.float32]:
        self.status = RoundStatus.CLOSED
        gone = sorted((set(self.selected) - set(sites)) & self.excused)
        # An asynchronous flush never waits for everyone: a site not in it is no news.
        waited = self.buffer is None
        missing = sorted(set(self.selected) - set(sites) - self.excused) if waited else []
        reasons = []
        if missing:
            reasons.append(f"{', '.join(missing)} (no update by the deadline)")
        if gone:
            reasons.append(f"{', '.join(gone)} (no longer taking part)")
        if reasons:
            self.reason = "closed without " + "; ".join(reasons)
        return mean
