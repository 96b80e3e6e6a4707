"""The result of a simulation, as written to ``results.json`` (documented in docs/results.md)."""

from __future__ import annotations

from pydantic import BaseModel

from fedcare.releases.registry import Release
from fedcare.validation.curves import Curves
from fedcare.validation.metrics import BinaryMetrics

RESULTS_SCHEMA_VERSION = 5


class SiteSummary(BaseModel):
    name: str
    description: str = ""
    n_train: int
    n_test: int
    test_prevalence: float
    epsilon_spent: float | None = None
    """Under DP, what the site's ledger recorded for the run (its noisy count included)."""
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None
    """Under DP, the noise multiplier this site's plan trained with."""
    epsilon_by_round: list[float] = []
    """Under DP, the epsilon the site's plan reaches after each round (its noisy count
    and every round so far, as if it took part in each); the ledger's own total is
    ``epsilon_spent``."""


class RoundRecord(BaseModel):
    number: int
    status: str
    participants: list[str]
    reason: str
    mean_train_loss: float | None
    metrics: dict[str, BinaryMetrics]
    elapsed_s: float | None = None
    """Virtual seconds from the study's start to the round's end (with site paces)."""
    alignment: dict[str, float] = {}
    """Each reporting site's cosine between its update and the consortium's step (with
    ``monitoring``; docs/drift.md)."""
    drifting: list[str] = []
    """Sites flagged as pulling away from the consortium by this round."""


class SiteComparison(BaseModel):
    """One row of the demo table; AUROCs on held-out data, with the held-out set's size
    and positives, and 95 % bootstrap intervals (None where the data cannot support one)."""

    site: str
    n: int
    positives: int
    local: float | None
    local_ci: tuple[float, float] | None = None
    federated: float | None
    federated_ci: tuple[float, float] | None = None
    pooled: float | None
    pooled_ci: tuple[float, float] | None = None
    local_on_other_sites: float | None
    federated_on_other_sites: float | None
    personalized: float | None = None
    """With the study's ``personalization``: this site's personal model on its own
    held-out rows (it is never used at, or sent to, any other site)."""
    personalized_ci: tuple[float, float] | None = None
    personal_released: bool | None = None
    """Whether the personal model passed the study's and the site's gates at the site
    (with the global model as the no-drop reference): released there, or held."""
    personal_reasons: list[str] = []
    """Why a held personal model failed, one sentence per gate."""


class SubgroupAuroc(BaseModel):
    """The federated model's AUROC in one subgroup of one site's held-out patients, with
    its 95 % bootstrap interval; a cell under the study's minimum cohort is suppressed."""

    group: str
    suppressed: bool = False
    n: int | None = None
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


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


class PrivacySummary(BaseModel):
    """The study's differential-privacy settings, as every report of a DP run shows them."""

    epsilon: float | None
    delta: float | None
    max_grad_norm: float
    accountant: str
    count_noise: float


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
    privacy: PrivacySummary | None = None
    """Set when the federated model was trained with DP-SGD."""
    warnings: list[str] = []
    """What a reader must know before trusting a number: small held-out sets, a loss
    still falling at the last round."""
    wall_s: float
    virtual_s: float | None = None
    """How long the federation took on the virtual clock, with the sites' declared
    paces (``fedcare simulate --pace``); None without them."""
    stale_refused: dict[str, int] = {}
    """Asynchronous mode: each site's updates refused as staler than the study accepts."""
    curves: dict[str, dict[str, Curves]] = {}
    """Per site, the ROC and calibration curves of the local, federated and pooled models
    on its held-out patients (for the report's plots)."""
    subgroups: dict[str, list[SubgroupAuroc]] = {}
    """Per site, the federated model's AUROC in each study subgroup."""
