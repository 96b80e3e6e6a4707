"""The drift summary: the only thing about drift that leaves a site (pydantic, checked
on both sides). Flags, p-values, the PSI per feature, estimated and measured AUROC and
the live gate verdict; no counts per level, no values, no scores. A monitor run on
fewer patients than the study's minimum cohort sends nothing."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from fedcare.drift.checks import CheckKind, DriftChecks
from fedcare.ids import SHA256_HEX, SITE_NAME
from fedcare.validation.cells import CellReport, ValidationReport

MAX_CHECKS = 2_000


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CheckSummary(_Frozen):
    """One test's outcome, without its data."""

    name: str = Field(max_length=200)
    kind: CheckKind
    p_value: float = Field(ge=0.0, le=1.0)
    p_adjusted: float = Field(ge=0.0, le=1.0)
    flagged: bool
    psi: float | None = Field(default=None, ge=0.0)


class DriftSummary(_Frozen):
    """One monitor run of one release at one site, as the coordinator receives it."""

    study_hash: str = Field(pattern=SHA256_HEX)
    site: str = Field(pattern=SITE_NAME)
    release: int = Field(ge=1)
    monitored_at: datetime
    n: int = Field(ge=1, description="New patients monitored (at least the minimum cohort).")
    labelled: bool
    alpha: float = Field(gt=0.0, lt=1.0)
    drift: bool
    checks: list[CheckSummary] = Field(max_length=MAX_CHECKS)
    estimated_auroc: float | None = Field(default=None, ge=0.0, le=1.0)
    measured_auroc: float | None = Field(default=None, ge=0.0, le=1.0)
    performance_passed: bool | None = Field(
        default=None, description="The live gate verdict with labels; None without labels."
    )
    reasons: list[str] = Field(default_factory=list, max_length=200)


class SummaryRefusedError(ValueError):
    """A monitor run whose summary may not leave the site."""


def summarize(
    *,
    study_hash: str,
    site: str,
    release: int,
    monitored_at: datetime,
    checks: DriftChecks,
    report: ValidationReport | None,
    passed: bool | None,
    reasons: list[str],
    min_cohort: int,
) -> DriftSummary:
    """The summary that may leave: refused under ``min_cohort`` new patients; the
    measured AUROC only when the report's overall cell is not suppressed."""
    if checks.n < min_cohort:
        raise SummaryRefusedError(
            f"{checks.n} new patient(s) is under the minimum cohort of {min_cohort}: "
            "nothing about this run may leave the site"
        )
    measured = None
    if report is not None and isinstance(report.overall, CellReport):
        measured = report.overall.auroc.value
    return DriftSummary(
        study_hash=study_hash,
        site=site,
        release=release,
        monitored_at=monitored_at,
        n=checks.n,
        labelled=checks.labelled,
        alpha=checks.alpha,
        drift=checks.drift,
        checks=[
            CheckSummary(
                name=c.name,
                kind=c.kind,
                p_value=c.p_value,
                p_adjusted=c.p_adjusted,
                flagged=c.flagged,
                psi=max(c.effect, 0.0) if c.effect_name == "psi" else None,
            )
            for c in checks.checks
        ],
        estimated_auroc=checks.estimates.estimated_auroc,
        measured_auroc=measured,
        performance_passed=passed,
        reasons=reasons,
    )
