"""The monitor's results as data: each check of the family, the estimates, the verdict.

Kept apart from the tests that compute them (:mod:`fedcare.drift.monitor`, numpy,
pandas and scikit-learn) so that a process which only carries results, the
coordinator receiving drift summaries, loads none of those.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class CheckKind(StrEnum):
    KS = "ks"
    CHI2 = "chi2"
    MISSINGNESS = "missingness"
    SCORES = "scores"
    PREVALENCE = "prevalence"


TEST_NAMES: dict[CheckKind, str] = {
    CheckKind.KS: "Kolmogorov-Smirnov",
    CheckKind.CHI2: "chi-squared",
    CheckKind.MISSINGNESS: "Fisher exact (missing rate)",
    CheckKind.SCORES: "BBSD: permutation KS on scores",
    CheckKind.PREVALENCE: "Fisher exact (label rate)",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Check(_Frozen):
    """One test of the family."""

    name: str
    kind: CheckKind
    statistic: float
    p_value: float
    p_adjusted: float
    effect: float
    effect_name: str
    flagged: bool


class Estimates(_Frozen):
    """Prevalence and AUROC: on the reference, estimated without labels, measured with."""

    reference_prevalence: float
    estimated_prevalence: float | None
    measured_prevalence: float | None
    reference_auroc: float | None
    estimated_auroc: float | None
    measured_auroc: float | None
    estimated_subgroup_auroc: dict[str, float | None]
    """Per subgroup cell ('attribute=level'); None for a cell under the cohort rule."""


class DriftChecks(_Frozen):
    """The family of tests and the estimates for one batch of new patients."""

    n: int
    labelled: bool
    alpha: float
    drift: bool
    checks: list[Check]
    estimates: Estimates
