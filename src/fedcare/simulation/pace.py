"""How simulated sites behave in time: compute speed, network latency and availability.

A consortium's small hospitals train slower and drop off the network; the
simulation reproduces that on a virtual clock, so it reports the time a real
consortium would wait while running as fast as the arithmetic. Training time is
declared, not measured: a site of speed 1 takes ``reference_train_s`` per local
update, one of speed 0.1 ten times as long. Each step that sends something costs
one ``latency_s``. A site online ``availability`` of the time alternates online and
offline spells of random length (offline ones ``offline_s`` long on average),
drawn from the simulation's seed; offline it sends nothing (its training goes on).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from fedcare.ids import derive_seed
from fedcare.schema.features import Strict
from fedcare.yamlfile import read_yaml_model

HORIZON_S = 10 * 365 * 86_400.0
"""How far ahead availability spells are drawn (ten years of virtual time)."""


class PaceError(ValueError):
    """A pace file that cannot be read or does not fit the sites."""


class SitePace(Strict):
    """One simulated site's speed, latency and availability."""

    speed: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="Compute speed; 0.1 is ten times slower."
    )
    latency_s: float = Field(
        default=0.0, ge=0.0, le=3600.0, description="Virtual seconds each message takes."
    )
    availability: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Share of the time the site is online."
    )
    offline_s: float = Field(
        default=600.0, gt=0.0, le=86_400.0, description="Mean length of an offline spell."
    )


class Pacing(Strict):
    """Every simulated site's pace; sites not listed run at the default pace."""

    reference_train_s: float = Field(
        default=60.0, gt=0.0, le=86_400.0, description="One local update at speed 1."
    )
    sites: dict[str, SitePace] = Field(default_factory=dict)

    def pace(self, site: str) -> SitePace:
        return self.sites.get(site, SitePace())


def load_pacing(path: Path, sites: Sequence[str]) -> Pacing:
    """Read a pace file (:class:`Pacing` as YAML) for a simulation of ``sites``."""
    pacing = read_yaml_model(path, Pacing, "pace file", PaceError)
    unknown = sorted(set(pacing.sites) - set(sites))
    if unknown:
        raise PaceError(
            f"{path}: names site(s) the simulation does not have: {', '.join(unknown)} "
            f"(it has {', '.join(sorted(sites))})"
        )
    return pacing


class Schedule:
    """A site's online and offline spells from virtual time ``start`` on (pure: a seed
    gives the same spells)."""

    def __init__(self, pace: SitePace, start: float, seed: int, site: str) -> None:
        self.start = start
        self.always = pace.availability >= 1.0
        self._changes: list[float] = []
        self._online_first = True
        if self.always:
            return
        rng = np.random.default_rng(derive_seed(seed, "availability", site))
        offline = pace.offline_s
        online = offline * pace.availability / (1.0 - pace.availability)
        self._online_first = bool(rng.random() < pace.availability)
        t, up = 0.0, self._online_first
        while t < HORIZON_S:
            t += float(rng.exponential(online if up else offline))
            self._changes.append(t)
            up = not up

    def online(self, now: float) -> bool:
        if self.always:
            return True
        spells = bisect.bisect_right(self._changes, now - self.start)
        return (spells % 2 == 0) == self._online_first

    def next_online(self, now: float) -> float:
        """The first moment at or after ``now`` the site is online."""
        if self.online(now):
            return now
        i = bisect.bisect_right(self._changes, now - self.start)
        if i >= len(self._changes):
            return math.inf
        return self.start + self._changes[i]
