"""Discrimination and calibration metrics, computed by scikit-learn."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    roc_auc_score,
)

from fedcare.validation.report import auroc_interval


class BinaryMetrics(BaseModel):
    """Metrics of one model on one data set. AUROC/AUPRC are None when undefined.

    ``auroc_ci`` is the 95 % percentile bootstrap interval when one was asked for
    and the data support it (both classes in nearly every resample).
    """

    n: int
    positives: int
    auroc: float | None
    auroc_ci: tuple[float, float] | None = None
    auprc: float | None
    accuracy: float
    brier: float


def binary_metrics(
    labels: NDArray[np.float32] | NDArray[np.int64],
    scores: NDArray[np.float64],
    threshold: float = 0.5,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> BinaryMetrics:
    """AUROC (with a bootstrap interval over ``n_bootstrap`` resamples when > 0),
    AUPRC, accuracy at ``threshold`` and Brier score.

    AUROC and AUPRC need both classes present; with one class they are None
    rather than a misleading number.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be equal-length vectors")
    both = 0 < int(y.sum()) < y.size
    auroc = float(roc_auc_score(y, p)) if both else None
    auprc = float(average_precision_score(y, p)) if both else None
    accuracy = float(accuracy_score(y, (p >= threshold).astype(np.int64)))
    brier = float(brier_score_loss(y, p))
    for value in (auroc, auprc, accuracy, brier):
        if value is not None and not math.isfinite(value):
            raise ValueError("metric is not finite; the scores contain NaN")
    return BinaryMetrics(
        n=int(y.size),
        positives=int(y.sum()),
        auroc=auroc,
        auroc_ci=auroc_interval(y, p, n_bootstrap, seed) if auroc is not None else None,
        auprc=auprc,
        accuracy=accuracy,
        brier=brier,
    )
