"""Discrimination and calibration metrics of a model on one data set, in numpy.

Called for every site every round of a simulation, so nothing here goes through
scikit-learn's per-call input validation; the test suite checks the values against
scikit-learn's.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from fedcare.validation.report import auroc_interval, ranking_metrics


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
    if not np.all(np.isfinite(p)):
        raise ValueError("the scores are not all finite numbers (NaN or infinity)")
    auroc, auprc = ranking_metrics(y, p)
    accuracy = float(np.mean((p >= threshold) == (y == 1)))
    brier = float(np.mean((p - y) ** 2))
    return BinaryMetrics(
        n=int(y.size),
        positives=int(y.sum()),
        auroc=auroc,
        auroc_ci=auroc_interval(y, p, n_bootstrap, seed) if auroc is not None else None,
        auprc=auprc,
        accuracy=accuracy,
        brier=brier,
    )
