"""ROC and calibration curves of one model on one set of patients (pure numpy).

For reports only: the points are thinned to at most ``max_points`` along the ROC curve,
and the calibration curve uses equal-width bins of the predicted risk. Both are
scikit-learn's ``roc_curve`` and ``calibration_curve`` (uniform bins) written out in
numpy, equal to them in the tests: every simulation draws them, and importing
scikit-learn for them cost a simulation 0.8 s and 75 MB.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict


class Curves(BaseModel):
    """A model's ROC curve and calibration curve on one held-out set."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fpr: list[float]
    tpr: list[float]
    predicted: list[float]
    """Mean predicted risk in each non-empty calibration bin."""
    observed: list[float]
    """Observed event rate in the same bins."""


def roc_points(
    y: NDArray[np.int64], p: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(fpr, tpr) at each distinct score, from (0, 0), dropping points on a straight
    segment: ``sklearn.metrics.roc_curve`` with its defaults."""
    order = np.argsort(p, kind="mergesort")[::-1]
    scores, labels = p[order], y[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[ends]
    fps = 1 + ends - tps
    if fps.size > 2:
        corner = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[corner], tps[corner]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def uniform_bins(p: NDArray[np.float64], bins: int) -> NDArray[np.intp]:
    """Each score's bin among ``bins`` equal-width bins of [0, 1], right-closed (the first
    also holding 0), as scikit-learn's ``calibration_curve`` bins them."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which: NDArray[np.intp] = np.searchsorted(edges[1:-1], p)
    return which


def calibration_points(
    y: NDArray[np.int64], p: NDArray[np.float64], bins: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(observed rate, mean predicted risk) in each non-empty bin of ``bins`` equal-width
    bins (right-closed, the first also holding 0): ``sklearn.calibration.calibration_curve``
    with ``strategy="uniform"``."""
    which = uniform_bins(p, bins)
    total = np.bincount(which, minlength=bins)
    risk = np.bincount(which, weights=p, minlength=bins)
    events = np.bincount(which, weights=y.astype(np.float64), minlength=bins)
    seen = total != 0
    return events[seen] / total[seen], risk[seen] / total[seen]


def curves(
    y_true: ArrayLike, scores: ArrayLike, max_points: int = 101, bins: int = 10
) -> Curves | None:
    """The curves, or None when the patients hold one class only."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    if not 0 < int(y.sum()) < y.size:
        return None
    fpr, tpr = roc_points(y, p)
    if fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    observed, predicted = calibration_points(y, p, bins)
    return Curves(
        fpr=fpr.tolist(), tpr=tpr.tolist(), predicted=predicted.tolist(), observed=observed.tolist()
    )
