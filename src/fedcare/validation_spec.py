"""What a study and a site policy say about validation: metrics, gates, releases.

Kept apart from the computations (``report.py``, ``gates.py``) so that the study
contract and the site policy can be parsed without importing scikit-learn.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Metric(StrEnum):
    """Every metric a report cell carries (besides its counts)."""

    AUROC = "auroc"
    AUPRC = "auprc"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    PPV = "ppv"
    ECE = "ece"
    CALIBRATION_SLOPE = "calibration_slope"
    CALIBRATION_INTERCEPT = "calibration_intercept"
    BRIER = "brier"


class GateKind(StrEnum):
    OVERALL = "overall"
    EVERY_SUBGROUP = "every_subgroup"
    SUBGROUP_GAP = "subgroup_gap"
    NO_DROP = "no_drop"


HIGHER_IS_BETTER = frozenset(
    {Metric.AUROC, Metric.AUPRC, Metric.SENSITIVITY, Metric.SPECIFICITY, Metric.PPV}
)
LOWER_IS_BETTER = frozenset({Metric.ECE, Metric.BRIER})
# Calibration slope (ideal 1) and intercept (ideal 0) are better when closer to
# their ideal, so a threshold on them may go either way (slope >= 0.8 and
# slope <= 1.2 are both sensible), and a "drop" is moving away from the ideal.
IDEAL = {Metric.CALIBRATION_SLOPE: 1.0, Metric.CALIBRATION_INTERCEPT: 0.0}


class GateSpec(BaseModel):
    """One gate. Which optional fields are needed depends on ``kind``:

    ============== ============ ========== =============== ========= ===========
    kind           op           threshold  attribute       positives tolerance
    ============== ============ ========== =============== ========= ===========
    overall        required     required   --              --        --
    every_subgroup required     required   optional (all)  optional  --
    subgroup_gap   '<=' (dflt)  required   required        optional  --
    no_drop        --           --         --              --        required
    ============== ============ ========== =============== ========= ===========
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GateKind = Field(
        description=(
            "overall (the whole held-out set), every_subgroup, subgroup_gap (largest "
            "minus smallest level) or no_drop (against the last promoted release)."
        )
    )
    metric: Metric
    op: Literal[">=", "<="] | None = Field(
        default=None, description="How the metric compares with threshold."
    )
    threshold: float | None = Field(
        default=None, description="The bound the metric must meet (not for no_drop)."
    )
    attribute: str | None = Field(default=None, description="A subgroup attribute, e.g. 'sex'.")
    min_positives: int = Field(
        default=0, ge=0, description="Subgroup cells with fewer positives are not checked."
    )
    tolerance: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _fields_match_kind(self) -> Self:
        kind = self.kind
        if kind is GateKind.SUBGROUP_GAP:
            if self.op not in (None, "<="):
                raise ValueError("a subgroup_gap gate bounds the gap from above: op '<='")
            if self.attribute is None:
                raise ValueError("a subgroup_gap gate needs the attribute whose levels it compares")
        elif kind is GateKind.NO_DROP:
            if self.tolerance is None:
                raise ValueError("a no_drop gate needs a tolerance, e.g. tolerance: 0.02")
            if self.op is not None or self.threshold is not None:
                raise ValueError("a no_drop gate takes a tolerance, not op/threshold")
        elif self.op is None:
            raise ValueError(f"an {kind.value} gate needs op '>=' or '<='")
        if kind is not GateKind.NO_DROP and self.threshold is None:
            raise ValueError(f"a {kind.value} gate needs a threshold")
        if kind is not GateKind.NO_DROP and self.tolerance is not None:
            raise ValueError("only a no_drop gate takes a tolerance")
        on_all = kind in (GateKind.OVERALL, GateKind.NO_DROP)
        if on_all and (self.attribute is not None or self.min_positives):
            raise ValueError(f"a {kind.value} gate is on all patients: no attribute")
        if kind in (GateKind.OVERALL, GateKind.EVERY_SUBGROUP):
            # Refuse a gate written backwards (AUROC <= 0.8 passes a useless model).
            if self.metric in HIGHER_IS_BETTER and self.op != ">=":
                raise ValueError(f"{self.metric.value} is higher-is-better: use op '>='")
            if self.metric in LOWER_IS_BETTER and self.op != "<=":
                raise ValueError(f"{self.metric.value} is lower-is-better: use op '<='")
        return self


AGE_BAND = "age_band"
"""A subgroup attribute derived from the ``age`` feature (bands <40, 40-64, 65-79, 80+)."""


class ValidationSpec(BaseModel):
    """The study's ``validation:`` section: how every site checks a candidate release.

    A candidate release is made from the global model after every ``every``-th
    round and after the last one. Each site validates it on its held-out data
    against these consortium-wide ``gates`` and its own policy's gates; the
    release is promoted when at least ``quorum`` sites pass (every site when
    ``quorum`` is not set).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Operating threshold: scores at or above it flag."
    )
    subgroups: tuple[str, ...] = Field(
        default=(),
        description="Attributes or features to break metrics down by; 'age_band' derives from age.",
    )
    n_bootstrap: int = Field(default=200, ge=0, le=5000, description="Resamples per interval.")
    every: int | None = Field(
        default=None,
        ge=1,
        description="Rounds between candidate releases (the last round always makes one).",
    )
    gates: tuple[GateSpec, ...] = Field(
        default=(), description="The study's release gates, checked by every site on its own data."
    )
    quorum: int | None = Field(
        default=None, ge=1, description="Sites that must pass; default: every site of the study."
    )
    deadline_s: float = Field(
        default=600.0, gt=0.0, description="How long sites have to return their verdicts."
    )

    @model_validator(mode="after")
    def _distinct_subgroups(self) -> Self:
        if len(set(self.subgroups)) != len(self.subgroups):
            raise ValueError("a subgroup is listed twice")
        return self

    def is_candidate_round(self, number: int, last: int) -> bool:
        """Whether the model after round ``number`` (of ``last``) becomes a candidate release."""
        return number == last or (self.every is not None and number % self.every == 0)
