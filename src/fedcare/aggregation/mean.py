"""The weighted mean of site vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def weighted_mean(
    vectors: Sequence[NDArray[np.float32]], weights: NDArray[np.float64]
) -> NDArray[np.float32]:
    """sum_i w_i v_i / sum_i w_i, accumulated in float64."""
    if len(vectors) == 0:
        raise ValueError("cannot average zero vectors")
    if len(vectors) != weights.shape[0]:
        raise ValueError(f"{len(vectors)} vectors but {weights.shape[0]} weights")
    total = float(weights.sum())
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    return (weights @ stacked / total).astype(np.float32)
