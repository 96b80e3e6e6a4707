"""What each simulated site's own policy says, apart from the runner that applies it: a
sites file is read without importing the training stack."""

from __future__ import annotations

from dataclasses import dataclass

from fedcare.privacy.dp.budget import Budget
from fedcare.validation_spec import GateSpec


@dataclass(frozen=True)
class SiteRules:
    """What a site's policy says: its own validation gates, minimum cohort, and the privacy
    budget of the data set it trains on (enforced by a real ledger under a DP study)."""

    gates: tuple[GateSpec, ...] = ()
    min_cohort: int = 1
    budget: Budget | None = None
