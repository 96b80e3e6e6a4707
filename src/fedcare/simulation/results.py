"""The result of a simulation, as written to ``results.json`` (documented in docs/results.md)."""

from __future__ import annotations

from pydantic import BaseModel

from fedcare.releases.registry import Release
from fedcare.validation.metrics import BinaryMetrics

RESULTS_SCHEMA_VERSION = 2


class SiteSummary(BaseModel):
    name: str
    description: str = ""
    n_train: int
    n_test: int
    test_prevalence: float
    epsilon_spent: float | None = None
    """Under DP, what the site's ledger recorded for the run (its noisy count included)."""
    epsilon_budget: float | None = None


class RoundRecord(BaseModel):
    number: int
    status: str
    participants: list[str]
    reason: str
    mean_train_loss: float | None
    metrics: dict[str, BinaryMetrics]


class SiteComparison(BaseModel):
    """One row of the demo table; AUROCs on held-out data."""

    site: str
    local: float | None
    federated: float | None
    pooled: float | None
    local_on_other_sites: float | None
    federated_on_other_sites: float | None


class SiteVerdictRecord(BaseModel):
    passed: bool
    reasons: list[str]
    notes: list[str]


class ReleaseRecord(BaseModel):
    """One candidate release and how it was settled."""

    id: int
    round: int
    parent: int | None
    state: str
    reason: str
    verdicts: dict[str, SiteVerdictRecord]

    @classmethod
    def from_release(cls, release: Release) -> ReleaseRecord:
        return cls(
            id=release.id,
            round=release.round,
            parent=release.parent,
            state=release.state.value,
            reason=release.reason,
            verdicts={
                v.site: SiteVerdictRecord(
                    passed=v.verdict.passed, reasons=v.verdict.reasons, notes=v.verdict.notes
                )
                for v in release.verdicts
            },
        )


class SimulationResult(BaseModel):
    schema_version: int = RESULTS_SCHEMA_VERSION
    study_name: str
    study_hash: str
    seed: int
    strategy: str
    weighting: str
    n_parameters: int
    sites: list[SiteSummary]
    rounds: list[RoundRecord]
    matrix: dict[str, dict[str, BinaryMetrics]]
    comparison: list[SiteComparison]
    releases: list[ReleaseRecord] = []
    wall_s: float
