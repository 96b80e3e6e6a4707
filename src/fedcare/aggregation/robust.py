"""Robust aggregators: what a minority of bad updates can do to the round's result is
bounded, unlike the weighted mean, which one update can move anywhere.

Pure functions over a stack of site vectors (one row per site) and their client
weights (any positive scale). Each returns the aggregate delta in float32, or
raises :class:`RobustError` when the round's updates cannot support it (too few
sites for the tolerance asked).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedcare.study import RobustKind, RobustSpec

Matrix = NDArray[np.float64]


class RobustError(ValueError):
    """The round's updates cannot be aggregated robustly as the study asks."""


def _check(stacked: Matrix, weights: NDArray[np.float64]) -> None:
    if stacked.ndim != 2 or stacked.shape[0] == 0:
        raise RobustError("need at least one update")
    if weights.shape != (stacked.shape[0],) or not np.all(weights > 0):
        raise RobustError("need one positive weight per update")


def weighted_median(stacked: Matrix, weights: NDArray[np.float64]) -> Matrix:
    """Per coordinate, the lowest value at which half the total weight is reached."""
    _check(stacked, weights)
    order = np.argsort(stacked, axis=0, kind="stable")
    values = np.take_along_axis(stacked, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    half = cumulative[-1] / 2.0
    # Relative slack so equal weights give the usual lower median despite rounding.
    first = np.argmax(cumulative >= half * (1.0 - 1e-12), axis=0)
    result: Matrix = values[first, np.arange(stacked.shape[1])]
    return result


def trimmed_mean(stacked: Matrix, weights: NDArray[np.float64], beta: float) -> Matrix:
    """Per coordinate, drop the ``floor(beta * n)`` lowest and highest values; the
    weighted mean of the rest (each kept value with its site's weight)."""
    _check(stacked, weights)
    n = stacked.shape[0]
    k = int(np.floor(beta * n))
    if n - 2 * k < 1:
        raise RobustError(f"trimming {k} at each end of {n} update(s) leaves none")
    order = np.argsort(stacked, axis=0, kind="stable")[k : n - k]
    kept = np.take_along_axis(stacked, order, axis=0)
    w = weights[order]
    result: Matrix = (kept * w).sum(axis=0) / w.sum(axis=0)
    return result


def krum_scores(stacked: Matrix, byzantine: int) -> NDArray[np.float64]:
    """Each update's Krum score: the sum of squared distances to its ``n - f - 2``
    nearest other updates (Blanchard et al. 2017)."""
    n = stacked.shape[0]
    if n < 2 * byzantine + 3:
        raise RobustError(
            f"Krum tolerating {byzantine} bad update(s) needs at least {2 * byzantine + 3} "
            f"updates, the round has {n}"
        )
    squares = (stacked**2).sum(axis=1)
    distances = squares[:, None] + squares[None, :] - 2.0 * stacked @ stacked.T
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(np.maximum(distances, 0.0), axis=1)[:, : n - byzantine - 2]
    scores: NDArray[np.float64] = nearest.sum(axis=1)
    return scores


def multi_krum(
    stacked: Matrix, weights: NDArray[np.float64], byzantine: int, select: int | None
) -> Matrix:
    """The weighted mean of the ``select`` updates with the lowest Krum scores
    (default ``n - f``)."""
    _check(stacked, weights)
    n = stacked.shape[0]
    m = n - byzantine if select is None else select
    if not 1 <= m <= n:
        raise RobustError(f"Multi-Krum cannot select {m} of {n} update(s)")
    chosen = np.argsort(krum_scores(stacked, byzantine), kind="stable")[:m]
    w = weights[chosen]
    result: Matrix = w @ stacked[chosen] / w.sum()
    return result


def norm_bounded_mean(
    stacked: Matrix, weights: NDArray[np.float64], max_norm: float | None
) -> Matrix:
    """Each update scaled down to L2 norm ``max_norm`` (default: the median of the
    round's norms), then the weighted mean."""
    _check(stacked, weights)
    norms = np.linalg.norm(stacked, axis=1)
    bound = float(np.median(norms)) if max_norm is None else max_norm
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    result: Matrix = weights @ (stacked * scale[:, None]) / weights.sum()
    return result


def robust_aggregate(
    stacked: Matrix, weights: NDArray[np.float64], spec: RobustSpec
) -> NDArray[np.float32]:
    """The study's robust aggregate of the round's updates."""
    stacked = np.asarray(stacked, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if spec.kind is RobustKind.MEDIAN:
        result = weighted_median(stacked, weights)
    elif spec.kind is RobustKind.TRIMMED_MEAN:
        result = trimmed_mean(stacked, weights, spec.beta)
    elif spec.kind is RobustKind.KRUM:
        result = multi_krum(stacked, weights, spec.byzantine, spec.select)
    else:
        result = norm_bounded_mean(stacked, weights, spec.max_norm)
    return result.astype(np.float32)
