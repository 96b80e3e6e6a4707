"""The record count a site reports: what the coordinator may learn of how many rows it has.

* Under differential privacy the count is released once per study and data
  fingerprint through the Gaussian mechanism (sensitivity one record, noise
  ``privacy.count_noise``), charged to the site's ledger like any other release,
  and the same noisy value is reused every round (post-processing costs nothing).
* Under secure aggregation without DP the count is rounded down to a public
  geometric grid (:func:`bucket`): subtracting two rounds' weight sums tells the
  coordinator a site's bucket, never its exact count.
* Otherwise (plain, non-DP aggregation) the exact count is reported, as the
  weighting needs it.
"""

from __future__ import annotations

import math

import numpy as np

from fedcare.privacy.dp.accountant import Mechanism

BUCKETS_PER_DOUBLING = 4
"""Grid points per doubling: neighbouring buckets differ by 2^(1/4), about 19 %."""


def bucket(n: int) -> int:
    """The largest point of the grid round(2^(k/4)), k = 0, 1, ..., not above ``n``."""
    if n < 1:
        raise ValueError(f"a count must be at least 1, not {n}")
    k = math.floor(math.log2(n) * BUCKETS_PER_DOUBLING + 1e-9)
    while round(2 ** (k / BUCKETS_PER_DOUBLING)) > n:
        k -= 1
    return round(2 ** (k / BUCKETS_PER_DOUBLING))


def count_mechanism(noise: float) -> Mechanism:
    """The Gaussian mechanism on a count, as the accountant composes it: every record is
    in (rate 1), one release, noise multiplier ``noise`` (std over sensitivity 1)."""
    return Mechanism(1.0, noise, 1)


def noisy_count(n: int, noise: float, secret_seed: int, largest: int) -> int:
    """``n`` plus Gaussian noise of std ``noise``, rounded and kept in [1, ``largest``]
    (clamping and rounding are post-processing)."""
    draw = float(np.random.default_rng(secret_seed).standard_normal())
    return int(min(largest, max(1, round(n + noise * draw))))
