"""Later admissions at a built-in hospital, with or without a declared drift.

:func:`later_admissions` draws new patients from the same hospital model as
:mod:`fedcare.data.synthetic` (a stream of their own, so they are new patients), and
can change one thing at a declared strength:

* ``assay``: the creatinine assay is recalibrated and reads ``1 + strength`` times the
  true value (default +20 %);
* ``renal_influx``: ``strength`` more of the admissions are renal patients (a new
  dialysis unit or nursing-home contract; default +15 points);
* ``prevalence``: the event rate is ``strength`` times the hospital's (default x1.6),
  a label shift: patients with and without the event look as before;
* ``missingness``: each lab is missing ``strength`` more often (default +10 points;
  a new order set or a lab outage).

The table comes out as the hospital exports it, read by its usual mapping.
"""

from __future__ import annotations

import math
from dataclasses import replace
from enum import StrEnum

import numpy as np

from fedcare.data._profiles import PROFILES, SiteProfile
from fedcare.data.synthetic import (
    HospitalCohort,
    _Admissions,
    _export,
    _simulate,
    site_mapping,
)


class DriftScenario(StrEnum):
    NONE = "none"
    ASSAY = "assay"
    RENAL_INFLUX = "renal_influx"
    PREVALENCE = "prevalence"
    MISSINGNESS = "missingness"


DEFAULT_STRENGTH: dict[DriftScenario, float] = {
    DriftScenario.NONE: 0.0,
    DriftScenario.ASSAY: 0.20,
    DriftScenario.RENAL_INFLUX: 0.15,
    DriftScenario.PREVALENCE: 1.6,
    DriftScenario.MISSINGNESS: 0.10,
}
"""The declared strength of each scenario (see the module doc for what it measures)."""

LABS = ("wbc", "creatinine", "lactate", "glucose")

_LATER_STREAM = 7
"""Keeps later admissions' random stream apart from the training cohort's."""


def hospital_profile(name: str) -> SiteProfile:
    """The built-in hospital called ``name``."""
    for profile in PROFILES:
        if profile.name == name:
            return profile
    known = ", ".join(p.name for p in PROFILES)
    raise ValueError(f"no built-in hospital '{name}' (there are: {known})")


def _subset(adm: _Admissions, index: np.ndarray) -> _Admissions:
    return _Admissions(
        values={k: v[index] for k, v in adm.values.items()},
        female=adm.female[index],
        ethnicity=adm.ethnicity[index],
        label=adm.label[index],
        ckd=adm.ckd[index],
        missing={k: v[index] for k, v in adm.missing.items()},
    )


def _label_shift(
    profile: SiteProfile, n: int, factor: float, rng: np.random.Generator
) -> _Admissions:
    """``n`` admissions with the event ``factor`` times as common, drawn from the
    hospital's own patients with and without the event (p(x | y) unchanged)."""
    target = min(profile.prevalence * factor, 0.95)
    positives = int(rng.binomial(n, target))
    pool_size = max(4 * n, math.ceil(2 * positives / profile.prevalence))
    pool = _simulate(profile, pool_size, rng)
    events = np.flatnonzero(pool.label)
    others = np.flatnonzero(~pool.label)
    if events.size < positives or others.size < n - positives:
        raise ValueError(f"prevalence x{factor:g} cannot be drawn at {profile.name}")
    chosen = np.concatenate(
        [
            rng.choice(events, positives, replace=False),
            rng.choice(others, n - positives, replace=False),
        ]
    )
    return _subset(pool, rng.permutation(chosen))


def later_admissions(
    hospital: str,
    n: int,
    seed: int,
    scenario: DriftScenario = DriftScenario.NONE,
    strength: float | None = None,
) -> HospitalCohort:
    """``n`` new admissions at a built-in hospital, with ``scenario`` at ``strength``
    (its :data:`DEFAULT_STRENGTH` when None); identical for identical arguments."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    profile = hospital_profile(hospital)
    index = PROFILES.index(profile)
    level = DEFAULT_STRENGTH[scenario] if strength is None else strength
    rng = np.random.default_rng([seed, index, _LATER_STREAM])
    if scenario is DriftScenario.PREVALENCE:
        if not level > 0:
            raise ValueError(f"a prevalence factor must be positive, got {level}")
        adm = _label_shift(profile, n, level, rng)
    else:
        if scenario is DriftScenario.RENAL_INFLUX:
            profile = replace(profile, ckd_share=min(profile.ckd_share + level, 0.95))
        elif scenario is DriftScenario.MISSINGNESS:
            missing = dict(profile.missing)
            for lab in LABS:
                missing[lab] = min(missing.get(lab, 0.0) + level, 0.95)
            profile = replace(profile, missing=missing)
        adm = _simulate(profile, n, rng)
        if scenario is DriftScenario.ASSAY:
            adm.values["creatinine"] = adm.values["creatinine"] * (1.0 + level)
    what = "no drift" if scenario is DriftScenario.NONE else f"{scenario.value} at {level:g}"
    return HospitalCohort(
        name=profile.name,
        description=f"{n:,} later admissions; {what}",
        frame=_export(profile, adm),
        mapping=site_mapping(hospital_profile(hospital)),
    )
