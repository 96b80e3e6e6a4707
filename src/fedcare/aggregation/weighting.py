"""Client weighting: how much each site's update counts in the average.

Pure functions over sample counts; the result always sums to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedcare.study import Weighting


def capped_shares(raw: NDArray[np.float64], cap: float) -> NDArray[np.float64]:
    """Normalise ``raw`` so that no share exceeds ``cap``.

    Water-filling: sites over the cap are pinned at it and the remainder is
    shared among the others in proportion to their raw weights, repeated until
    nobody is over. Needs ``cap * n >= 1`` or the shares could not sum to one.
    """
    n = raw.shape[0]
    if cap * n < 1.0 - 1e-12:
        raise ValueError(f"a cap of {cap} cannot be met by {n} site(s): it needs cap >= 1/{n}")
    shares: NDArray[np.float64] = raw / raw.sum()
    pinned = np.zeros(n, dtype=bool)
    while True:
        over = (shares > cap + 1e-12) & ~pinned
        if not over.any():
            return shares
        pinned |= over
        free = ~pinned
        remaining = 1.0 - cap * pinned.sum()
        shares = np.where(pinned, cap, 0.0)
        if free.any():
            shares[free] = remaining * raw[free] / raw[free].sum()


def client_weights(
    n_samples: Sequence[int], scheme: Weighting, cap: float | None = None
) -> NDArray[np.float64]:
    """Normalised weights for sites with ``n_samples`` training records each.

    ``samples``: proportional to records; ``equal``: one share each; ``sqrt``:
    proportional to the square root of records; ``capped``: proportional to
    records with no site above ``cap`` of the total.
    """
    counts = np.asarray(n_samples, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError("need the sample counts of at least one site")
    if np.any(counts <= 0):
        raise ValueError("every site must have at least one training record")
    if scheme is Weighting.SAMPLES:
        raw = counts
    elif scheme is Weighting.EQUAL:
        raw = np.ones_like(counts)
    elif scheme is Weighting.SQRT:
        raw = np.sqrt(counts)
    else:
        if cap is None:
            raise ValueError("capped weighting needs a cap")
        return capped_shares(counts, cap)
    weights: NDArray[np.float64] = raw / raw.sum()
    return weights
