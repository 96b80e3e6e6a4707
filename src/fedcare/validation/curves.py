"""ROC and calibration curves of one model on one set of patients (pure, scikit-learn).

For reports only: the points are thinned to at most ``max_points`` along the ROC curve,
and the calibration curve uses equal-width bins of the predicted risk.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve


class Curves(BaseModel):
    """A model's ROC curve and calibration curve on one held-out set."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fpr: list[float]
    tpr: list[float]
    predicted: list[float]
    """Mean predicted risk in each non-empty calibration bin."""
    observed: list[float]
    """Observed event rate in the same bins."""


def curves(
    y_true: ArrayLike, scores: ArrayLike, max_points: int = 101, bins: int = 10
) -> Curves | None:
    """The curves, or None when the patients hold one class only."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    if not 0 < int(y.sum()) < y.size:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    if fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    return Curves(
        fpr=fpr.tolist(), tpr=tpr.tolist(), predicted=predicted.tolist(), observed=observed.tolist()
    )
