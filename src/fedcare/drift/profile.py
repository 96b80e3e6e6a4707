"""A release's reference profile at one site: what its held-out patients looked like
when the release was promoted, frozen at the site (pure construction, pydantic model).

It keeps, per feature, the sorted observed values (continuous) or the count of each
level (binary, categorical) and the number missing; the labels and the model's scores
on the same patients; and the isotonic calibration of those scores. Each column is
stored on its own and sorted, so the rows' order and the link between one patient's
values are not kept; it never leaves the site (the state folder holds it beside the
privacy ledger).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fedcare.drift.estimate import fit_calibration
from fedcare.drift.tests import decile_edges
from fedcare.schema.features import FeatureSchema, FeatureType
from fedcare.schema.preprocess import Preprocessor
from fedcare.validation.cells import ValidationReport
from fedcare.validation.report import level_text

PROFILE_VERSION: Literal[1] = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NumericProfile(_Frozen):
    """A continuous feature: its observed reference values, sorted, and how many were
    missing; ``edges`` split the values into deciles for the PSI."""

    kind: Literal["numeric"] = "numeric"
    values: list[float]
    edges: list[float]
    missing: int


class LevelProfile(_Frozen):
    """A binary or categorical feature: the count of each level, and how many missing."""

    kind: Literal["levels"] = "levels"
    counts: dict[str, int]
    missing: int


FeatureProfile = Annotated[NumericProfile | LevelProfile, Field(discriminator="kind")]


class ReferenceProfile(_Frozen):
    """One promoted release at one site, as its held-out patients saw it."""

    version: Literal[1] = PROFILE_VERSION
    study_hash: str
    site: str
    release: int
    round: int
    frozen_at: datetime
    n: int = Field(description="Held-out patients behind the scores and labels.")
    threshold: float
    inputs_from: Literal["held_out", "all_rows"] = Field(
        description="Which of the site's rows the feature and label profile describe: all "
        "of them, or under DP the held-out rows only (DP-SGD covers the training rows)."
    )
    input_rows: int = Field(description="Rows behind the feature profiles.")
    features: dict[str, FeatureProfile]
    label_positives: int = Field(description="Events among the input rows.")
    labels: list[int]
    scores: list[float] = Field(description="The model's scores, aligned with labels.")
    calibration_x: list[float]
    calibration_y: list[float]
    preprocessor: Preprocessor
    report: ValidationReport = Field(
        description="The site's validation report of this release (its no-drop baseline)."
    )

    @property
    def prevalence(self) -> float:
        """The held-out prevalence, which the scores' calibration describes."""
        return float(np.mean(self.labels)) if self.labels else 0.0


def level_counts(values: pd.Series) -> dict[str, int]:
    """Each observed level's count, levels as text (1.0 and 1 are one level)."""
    counts = values.dropna().map(level_text).value_counts()
    return {str(level): int(count) for level, count in counts.items()}


def feature_profiles(frame: pd.DataFrame, schema: FeatureSchema) -> dict[str, FeatureProfile]:
    """Every tabular feature's profile in a mapped table (images have none: their drift
    is not monitored, and a study with an image feature refuses ``monitoring``)."""
    out: dict[str, FeatureProfile] = {}
    for feature in schema.features:
        if feature.type is FeatureType.IMAGE:
            continue
        column = frame[feature.name]
        missing = int(column.isna().sum())
        if feature.type is FeatureType.CONTINUOUS:
            values = np.sort(pd.to_numeric(column, errors="coerce").dropna().to_numpy(np.float64))
            out[feature.name] = NumericProfile(
                values=values.tolist(), edges=decile_edges(values).tolist(), missing=missing
            )
        else:
            out[feature.name] = LevelProfile(counts=level_counts(column), missing=missing)
    return out


def build_profile(
    *,
    study_hash: str,
    site: str,
    release: int,
    round_number: int,
    frozen_at: datetime,
    frame: pd.DataFrame,
    schema: FeatureSchema,
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    threshold: float,
    preprocessor: Preprocessor,
    report: ValidationReport,
    inputs: pd.DataFrame | None = None,
) -> ReferenceProfile:
    """The reference profile of a release from the site's mapped held-out table, its
    labels and the release's scores on it; the feature and label profile from
    ``inputs`` (mapped rows with the label column) when given, else from ``frame``."""
    if not (len(frame) == labels.size == scores.size):
        raise ValueError(
            f"held-out rows {len(frame)}, labels {labels.size} and scores {scores.size} differ"
        )
    knots_x, knots_y = fit_calibration(scores, labels)
    rows = frame if inputs is None else inputs
    return ReferenceProfile(
        study_hash=study_hash,
        site=site,
        release=release,
        round=round_number,
        frozen_at=frozen_at,
        n=int(labels.size),
        threshold=threshold,
        inputs_from="held_out" if inputs is None else "all_rows",
        input_rows=len(rows),
        features=feature_profiles(rows, schema),
        label_positives=int(rows[schema.label.name].sum()),
        labels=labels.astype(int).tolist(),
        scores=scores.astype(float).tolist(),
        calibration_x=knots_x.tolist(),
        calibration_y=knots_y.tolist(),
        preprocessor=preprocessor,
        report=report,
    )
