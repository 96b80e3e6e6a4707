"""Discrimination and calibration metrics of a model on one data set, in numpy.

Called for every site every round of a simulation, so nothing here goes through
scikit-learn's per-call input validation; the test suite checks the values against
scikit-learn's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

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
    (point,) = binary_metrics_by_part(labels, scores, [np.asarray(labels).size], threshold)
    if n_bootstrap <= 0 or point.auroc is None:
        return point
    y = np.asarray(labels).astype(np.int64)
    interval = auroc_interval(y, np.asarray(scores, dtype=np.float64), n_bootstrap, seed)
    return point.model_copy(update={"auroc_ci": interval})


def binary_metrics_by_part(
    labels: NDArray[np.float32] | NDArray[np.int64],
    scores: NDArray[np.float64],
    sizes: Sequence[int],
    threshold: float = 0.5,
) -> list[BinaryMetrics]:
    """:func:`binary_metrics` (without intervals) of each consecutive part of ``labels``
    and ``scores``, ``sizes[i]`` rows for part ``i``, in one pass over all of them.

    A simulation scores every site every round; a few hundred patients each cost
    numpy more in per-call overhead than in arithmetic, so the parts are sorted and
    counted together (the tied counts of report's bootstrap, one group per part and
    distinct score). :func:`binary_metrics` is the one-part case.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1 or int(n.sum()) != y.size:
        raise ValueError(
            f"labels {y.shape} and scores {p.shape} must be vectors of the {int(n.sum())} "
            "rows the parts add up to"
        )
    if n.size == 0 or (n <= 0).any():
        raise ValueError("every part needs at least one row")
    if not np.all(np.isfinite(p)):
        raise ValueError("the scores are not all finite numbers (NaN or infinity)")
    parts = n.size
    part = np.repeat(np.arange(parts), n)
    yf = y.astype(np.float64)
    positives = np.bincount(part, weights=yf, minlength=parts)
    negatives = n - positives
    correct = ((p >= threshold) == (y == 1)).astype(np.float64)
    accuracy = np.bincount(part, weights=correct, minlength=parts) / n
    brier = np.bincount(part, weights=(p - yf) ** 2, minlength=parts) / n

    # Distinct scores within each part, ascending: the same tied counts as
    # _tied_counts, one group per (part, score).
    order = np.lexsort((p, part))
    sorted_p, sorted_part = p[order], part[order]
    starts = np.flatnonzero(
        np.r_[True, (sorted_part[1:] != sorted_part[:-1]) | (sorted_p[1:] != sorted_p[:-1])]
    )
    group_part = sorted_part[starts]
    group_pos = np.add.reduceat(yf[order], starts)
    group_all = np.diff(np.r_[starts, y.size]).astype(np.float64)
    group_neg = group_all - group_pos
    first = np.searchsorted(group_part, np.arange(parts))

    def before(counts: NDArray[np.float64]) -> NDArray[np.float64]:
        # Within each part, the count in the groups below this one.
        exclusive = np.cumsum(counts) - counts
        within: NDArray[np.float64] = exclusive - exclusive[first][group_part]
        return within

    # Mann-Whitney U with ties counted a half, as _counted_auroc.
    u = np.bincount(
        group_part, weights=group_pos * (before(group_neg) + 0.5 * group_neg), minlength=parts
    )
    # Average precision, as _counted_average_precision: each positive at the precision
    # of everyone scored at or above it.
    flagged = n[group_part] - before(group_all)
    caught = positives[group_part] - before(group_pos)
    ap = np.bincount(group_part, weights=group_pos * caught / flagged, minlength=parts)
    both = (positives > 0) & (negatives > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc, auprc = u / (positives * negatives), ap / positives
    return [
        BinaryMetrics(
            n=int(n[i]),
            positives=int(positives[i]),
            auroc=float(auroc[i]) if both[i] else None,
            auprc=float(auprc[i]) if both[i] else None,
            accuracy=float(accuracy[i]),
            brier=float(brier[i]),
        )
        for i in range(parts)
    ]
