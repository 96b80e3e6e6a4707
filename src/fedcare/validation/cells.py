"""A validation report as data: its cells, their estimates and the small-cell rule.

What a site sends about a release and what the coordinator, the gates and the model
card read. The computation (:mod:`fedcare.validation.report`, scikit-learn and the
bootstrap) is kept apart so that a process that only receives reports loads neither.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcare.validation_spec import Metric

OVERALL = "all"
"""The group name of the cell that holds every patient."""

FEW_POSITIVES = 20
"""Fewer positives than this in a held-out set make its metrics too imprecise to rank
models by; reports (the simulation's, the model card) say so beside the numbers."""

CONFIDENCE = 0.95
"""The coverage of every interval in a report."""


class _Frozen(BaseModel):
    # Reports arrive from sites over the network: no NaN or infinity may hide in one.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Estimate(_Frozen):
    """A point estimate and its percentile bootstrap interval.

    ``value`` is None when the metric is undefined in the cell (for example AUROC
    with one class, PPV with no predicted positives); the interval is None when
    the value is, or when no resample had the metric defined.
    """

    value: float | None
    ci_low: float | None
    ci_high: float | None


class CellReport(_Frozen):
    """The metrics of one group of patients at least ``min_cohort`` strong."""

    group: str
    suppressed: Literal[False] = False
    n: int
    positives: int
    auroc: Estimate
    auprc: Estimate
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    ece: Estimate
    calibration_slope: Estimate
    calibration_intercept: Estimate
    brier: Estimate

    def estimate(self, metric: Metric) -> Estimate:
        """The estimate of ``metric`` in this cell."""
        value = getattr(self, metric.value)
        assert isinstance(value, Estimate)  # every Metric member names an Estimate field
        return value


class SuppressedCell(_Frozen):
    """A group below the minimum cohort size or the minimum events: its name and nothing
    else."""

    group: str
    suppressed: Literal[True] = True


Cell = Annotated[CellReport | SuppressedCell, Field(discriminator="suppressed")]


class ValidationReport(_Frozen):
    """One model evaluated on one site's held-out data."""

    threshold: float = Field(description="Scores at or above it are predicted positive.")
    min_cohort: int = Field(description="Cells with fewer patients are suppressed.")
    min_events: int = Field(
        default=1,
        description="Cells with 1 to min_events - 1 positives, or negatives, are suppressed.",
    )
    confidence: float = CONFIDENCE
    n_bootstrap: int
    seed: int
    overall: Cell
    subgroups: dict[str, list[Cell]] = Field(
        description="Attribute -> one cell per level, named 'attribute=level'."
    )


def few_events(positives: int, n: int, min_events: int) -> bool:
    """True when a cell has some, but fewer than ``min_events``, positives or negatives.

    As in small-cell rules for published tables, a count of zero is released and
    a count of 1 to ``min_events - 1`` is not: a cell with one positive describes
    that patient.
    """
    return any(0 < count < min_events for count in (positives, n - positives))
