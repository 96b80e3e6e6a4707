"""Drift during training, at a site (pure): how the site's update relates to the step
the consortium took from the same model, and the new model's loss on its own rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

_TINY = 1e-12


def cosine(update: NDArray[np.float32], step: NDArray[np.float32]) -> float | None:
    """The cosine between a site's update and the consortium's step; None when either
    is zero (a round that did not move the model says nothing)."""
    a = update.astype(np.float64)
    b = step.astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms < _TINY:
        return None
    return float(np.clip(np.dot(a, b) / norms, -1.0, 1.0))


def log_loss(labels: NDArray[np.floating], scores: NDArray[np.floating]) -> float:
    """Mean binary cross-entropy of scores (clipped away from 0 and 1)."""
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def drifting_sites(
    cosines: Mapping[str, Sequence[tuple[int, float]]], min_cosine: float, rounds: int
) -> dict[str, int]:
    """Sites whose cosine stayed below ``min_cosine`` for ``rounds`` reported rounds in a
    row (in round order): site -> the round that completed the run."""
    flagged: dict[str, int] = {}
    for site, rows in cosines.items():
        run = 0
        for number, value in sorted(rows):
            run = run + 1 if value < min_cosine else 0
            if run >= rounds:
                flagged[site] = number
                break
    return flagged
