"""Who shares secrets with whom: the complete graph, or SecAgg+'s sparse random graph.

The sparse graph is a Harary graph (each site joined to the degree/2 nearest
on each side of a ring) over a random order of the sites drawn from a public
seed, so every party computes the same graph. It is ``degree``-regular and
``degree``-connected, with degree of order log n (Bell et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def default_degree(n_sites: int) -> int:
    """An even degree of about 3 log2 n, at most n - 1."""
    if n_sites <= 1:
        return 0
    return min(n_sites - 1, 2 * math.ceil(1.5 * math.log2(n_sites)))


def neighbourhoods(
    sites: Sequence[str], degree: int | None, seed: int
) -> dict[str, tuple[str, ...]]:
    """Each site's neighbours; ``degree`` None (or >= n - 1) is the complete graph."""
    names = sorted(sites)
    n = len(names)
    if len(set(names)) != n:
        raise ValueError("site names must be unique")
    if degree is None or degree >= n - 1:
        return {s: tuple(o for o in names if o != s) for s in names}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph needs an even degree >= 2, not {degree}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    half = degree // 2
    out: dict[str, set[str]] = {s: set() for s in names}
    for i, site in enumerate(order):
        for step in range(1, half + 1):
            other = order[(i + step) % n]
            out[site].add(other)
            out[other].add(site)
    return {s: tuple(sorted(out[s])) for s in names}


def threshold_for(degree: int, fraction: float) -> int:
    """Shares needed out of ``degree``: ceil(fraction * degree), at least 1."""
    return max(1, math.ceil(fraction * degree - 1e-9))


def colluders_tolerated(neighbourhood: int, threshold: int) -> int:
    """How many sites of a neighbourhood (``neighbourhood`` sites, the owner included) may
    collude with an active coordinator before it can rebuild both secrets of an honest
    site: colluders sign and reveal anything, while each honest site signs one survivor
    list and reveals only for it. Both secrets need ``threshold`` shares each, from
    holders shown opposite lists, so ``2 * (threshold - c) <= neighbourhood - c`` must
    fail: at most ``2 * threshold - neighbourhood - 1`` colluders, and none below zero."""
    return max(0, 2 * threshold - neighbourhood - 1)
