"""The result of a simulation, as written to ``results.json`` (documented in docs/results.md)."""

from __future__ import annotations

from pydantic import BaseModel

from fedcare.validation.metrics import BinaryMetrics

RESULTS_SCHEMA_VERSION = 1


class SiteSummary(BaseModel):
    name: str
    description: str = ""
    n_train: int
    n_test: int
    test_prevalence: float


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
    wall_s: float
