"""Synthetic hospital cohorts for ``fedcare demo``: deterioration within 48 h of admission.

Five hospitals (see :mod:`fedcare.data._profiles`) admit patients whose hidden
*severity* drives both their admission vitals and labs and their chance of
deteriorating (ICU transfer, rapid-response call or death) within 48 hours.
The hospitals differ the way real ones do: size, demographics, case mix,
prevalence, which labs they draw, and the column names, units and codings
their systems export.

Hidden subgroup (ground truth known only to the generator): patients with
chronic kidney disease or on dialysis. They are 1-3 % of admissions at the
large hospitals and 45 % at ``kestrel-renal``, and they present differently:

* creatinine is high at baseline (around 520 umol/L) and says nothing about
  how sick they are, where in everyone else a raised creatinine (acute kidney
  injury) is a sign of deterioration;
* they get cold rather than febrile when they deteriorate (uraemia blunts the
  fever response), and their heart rate and white-cell response are blunted
  (beta blockers, immunosuppression);
* hypotension and a raised lactate carry more of the signal;
* many of their admissions are routine (dialysis access, fluid balance), so
  they are a little less sick on average.

Membership is not a model feature and is not in the exported table; a model
must cope without it. A model trained only at a large hospital therefore
learns "high creatinine and fever mean danger", which misranks the renal
hospital's patients when features share one scale (per-site standardisation
hides most of the creatinine shift), and the renal hospital's own small model
misses the fever and kidney-injury signals that matter everywhere else. Use
:func:`subgroup_membership` to evaluate on the subgroup. The equations and
measured effects are in ``docs/cohorts.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcare.data._profiles import (
    CKD_RELATIVE_RISK,
    CREATININE_MGDL_DECIMALS,
    DECIMALS,
    ETHNICITIES,
    FEATURES,
    PROFILES,
    SCHEMA_UNITS,
    SiteProfile,
)
from fedcare.schema.mapping import ColumnMapping, SiteMapping
from fedcare.schema.units import convert

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

MIN_ROWS = 50

# Values are clipped to physiologically plausible limits, which sit inside the
# study's valid ranges with room to spare, so that converting to a hospital's
# unit and rounding there can never push a value out of range.
_PLAUSIBLE: dict[str, tuple[float, float]] = {
    "age": (18.0, 100.0),
    "heart_rate": (25.0, 230.0),
    "resp_rate": (5.0, 60.0),
    "sbp": (50.0, 250.0),
    "temperature": (31.0, 43.0),
    "spo2": (60.0, 100.0),
    "wbc": (0.3, 120.0),
    "creatinine": (20.0, 2000.0),
    "lactate": (0.3, 25.0),
    "glucose": (1.5, 50.0),
}

# How much a one-SD rise in severity raises the log-odds that a lab is drawn
# (clinicians order lactate when they suspect sepsis); vitals are charted for all.
_ORDERED_WHEN_SICK: dict[str, float] = {
    "lactate": 0.7,
    "wbc": 0.3,
    "creatinine": 0.3,
    "glucose": 0.2,
}

# Outcome model: log-odds of deterioration = site intercept + these terms.
_OUTCOME_SEVERITY = 1.5  # per SD of systemic severity S
_OUTCOME_KIDNEY = 1.5  # per SD of acute kidney injury K (outside the renal subgroup)
_OUTCOME_AGE = 0.35  # per 15 years above 65

# Renal-subgroup patients: a high, stable creatinine baseline (median, umol/L),
# and a lower mean severity, because many of their admissions are routine
# (dialysis access, fluid balance) rather than acute illness.
_RENAL_CREATININE = 520.0
_RENAL_ACUITY_SHIFT = -0.3


@dataclass(frozen=True)
class HospitalCohort:
    """One hospital's admissions, exported the way that hospital exports them."""

    name: str
    description: str
    frame: pd.DataFrame
    mapping: SiteMapping


@dataclass(frozen=True)
class _Admissions:
    """Simulated admissions in the study's units, before export."""

    values: dict[str, FloatArray]
    female: BoolArray
    ethnicity: NDArray[np.int64]
    label: BoolArray
    ckd: BoolArray
    missing: dict[str, BoolArray]


def _sigmoid(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _calibrate_intercept(linear: FloatArray, prevalence: float) -> float:
    """The intercept at which the expected prevalence equals the site's target.

    Prevalence is a property of the hospital (who it admits, what counts as an
    event locally), so it enters through the intercept; bisection works because
    mean prevalence is monotone in the intercept.
    """
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2.0
        if float(_sigmoid(mid + linear).mean()) < prevalence:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _simulate(profile: SiteProfile, n: int, rng: np.random.Generator) -> _Admissions:
    """Draw ``n`` admissions from the latent-severity model for one hospital."""
    age = np.clip(rng.normal(profile.age_mean, profile.age_sd, n), *_PLAUSIBLE["age"])
    female = rng.random(n) < profile.female
    ethnicity = rng.choice(len(ETHNICITIES), size=n, p=np.asarray(profile.ethnicity_mix))

    # Renal subgroup: the site's share, tilted by ethnicity but keeping the site mean.
    rr = np.asarray(CKD_RELATIVE_RISK)
    p_ckd = profile.ckd_share * rr[ethnicity] / float(np.dot(profile.ethnicity_mix, rr))
    ckd = rng.random(n) < np.minimum(p_ckd, 0.95)

    # Two latent states per admission, each with unit variance. Severity S is
    # systemic illness (sepsis, shock, respiratory failure): the site's case mix
    # sets its mean, older patients arrive sicker, and renal patients a little
    # less sick on average. Kidney injury K is acute injury on top of a
    # patient's usual kidney function.
    z_age = (age - 65.0) / 15.0
    severity = profile.acuity + 0.25 * z_age + _RENAL_ACUITY_SHIFT * ckd + rng.standard_normal(n)
    kidney = rng.standard_normal(n)

    # In renal patients an acute-on-chronic change is lost in the high baseline
    # and their risk is carried by S alone; K adds risk only outside the subgroup.
    linear = (
        _OUTCOME_SEVERITY * severity
        + _OUTCOME_AGE * z_age
        + _OUTCOME_KIDNEY * np.where(ckd, 0.0, kidney)
    )
    intercept = _calibrate_intercept(linear, profile.prevalence)
    label = rng.random(n) < _sigmoid(intercept + linear)

    def noise(sd: float) -> FloatArray:
        return rng.normal(0.0, sd, n)

    # Each measurement = baseline + response to the latent states + noise.
    # The renal subgroup gets its own responses (np.where): see the module doc.
    s = severity
    values: dict[str, FloatArray] = {
        "age": np.round(age),
        "heart_rate": 84.0 + np.where(ckd, 5.0, 11.0) * s - 2.0 * z_age + noise(11.0),
        "resp_rate": 17.0 + 2.8 * s + noise(2.6),
        "sbp": np.where(ckd, 142.0 - 20.0 * s, 128.0 - 10.0 * s) + 8.0 * z_age + noise(17.0),
        "temperature": np.where(ckd, 36.6 - 0.45 * s, 36.9 + 0.45 * s) + noise(0.45),
        "spo2": 97.0 - 1.6 * s - 0.5 * z_age + noise(1.6),
        # Labs are log-normal: multiplicative noise, right-skewed like real ones.
        "wbc": np.exp(np.log(8.0) + np.where(ckd, 0.08, 0.22) * s + noise(0.30)),
        # Injury can only raise creatinine, so K enters through softplus(K) =
        # log(1 + e^K): flat for an uninjured kidney, linear once injured.
        "creatinine": np.exp(
            np.where(
                ckd,
                np.log(_RENAL_CREATININE) + noise(0.30),
                np.log(65.0)
                - 0.2 * female
                + 0.08 * z_age
                + 0.2 * s
                + 0.5 * np.logaddexp(0.0, kidney)
                + noise(0.15),
            )
        ),
        "lactate": np.exp(np.log(1.3) + np.where(ckd, 0.45, 0.28) * s + noise(0.33)),
        "glucose": np.exp(np.where(ckd, np.log(7.8), np.log(6.3)) + 0.10 * s + noise(0.25)),
    }
    for name, (low, high) in _PLAUSIBLE.items():
        values[name] = np.clip(values[name], low, high)

    missing: dict[str, BoolArray] = {}
    for name, rate in profile.missing.items():
        shift = _ORDERED_WHEN_SICK.get(name, 0.0) * (s - profile.acuity)
        missing[name] = rng.random(n) < _sigmoid(_logit(rate) - shift)

    return _Admissions(values, female, ethnicity.astype(np.int64), label, ckd, missing)


def _export(profile: SiteProfile, adm: _Admissions) -> pd.DataFrame:
    """The table as the hospital exports it: local names, units, codings, rounding."""
    cols = profile.columns
    data: dict[str, object] = {}
    for name in FEATURES:
        if name == "sex_female":
            male, female = profile.sex_codes
            data[cols[name]] = np.where(adm.female, female, male)
            continue
        unit = profile.unit(name)
        local = convert(adm.values[name], SCHEMA_UNITS[name], unit, analyte=name)
        places = CREATININE_MGDL_DECIMALS if (name, unit) == ("creatinine", "mg/dL") else None
        local = np.round(local, DECIMALS[unit] if places is None else places)
        if name in adm.missing:
            local = np.where(adm.missing[name], np.nan, local)
        data[cols[name]] = local.astype(np.int64) if name == "age" else local
    data[cols["ethnicity"]] = np.asarray(profile.ethnicity_codes)[adm.ethnicity]
    data[cols["label"]] = np.asarray(profile.label_codes)[adm.label.astype(np.int64)]
    return pd.DataFrame(data)


def _recoding(
    codes: tuple[str | int, ...], targets: tuple[str | int, ...]
) -> dict[str, str | float] | None:
    """A ``values`` recoding from local codes to schema values; None if already equal."""
    if tuple(codes) == tuple(targets):
        return None
    return {str(code): target for code, target in zip(codes, targets, strict=True)}


def site_mapping(profile: SiteProfile) -> SiteMapping:
    """The mapping a data scientist at this hospital would write for the demo study."""
    cols = profile.columns
    features: dict[str, ColumnMapping | str] = {}
    for name in FEATURES:
        if name == "sex_female":
            values = _recoding(profile.sex_codes, (0, 1))
            features[name] = ColumnMapping(column=cols[name], values=values)
        else:
            features[name] = ColumnMapping(column=cols[name], unit=profile.unit(name))
    ethnicity = ColumnMapping(
        column=cols["ethnicity"], values=_recoding(profile.ethnicity_codes, ETHNICITIES)
    )
    label = ColumnMapping(column=cols["label"], values=_recoding(profile.label_codes, (0, 1)))
    return SiteMapping(
        site=profile.name, features=features, label=label, attributes={"ethnicity": ethnicity}
    )


def _generate(seed: int, scale: float) -> list[tuple[HospitalCohort, BoolArray]]:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out: list[tuple[HospitalCohort, BoolArray]] = []
    for index, profile in enumerate(PROFILES):
        # One stream per (seed, hospital): a hospital's data does not change when
        # another hospital's size or order of draws changes.
        rng = np.random.default_rng([seed, index])
        n = max(MIN_ROWS, round(profile.size * scale))
        adm = _simulate(profile, n, rng)
        cohort = HospitalCohort(
            name=profile.name,
            description=f"{n:,} admissions; {profile.kind}",
            frame=_export(profile, adm),
            mapping=site_mapping(profile),
        )
        out.append((cohort, adm.ckd))
    return out


def generate_cohorts(seed: int = 2026, scale: float = 1.0) -> list[HospitalCohort]:
    """The demo hospitals' cohorts, largest first; identical for identical arguments.

    ``scale`` multiplies every hospital's size (tests use e.g. 0.1 for speed);
    every hospital keeps at least 50 admissions.
    """
    return [cohort for cohort, _ in _generate(seed, scale)]


def subgroup_membership(seed: int = 2026, scale: float = 1.0) -> dict[str, BoolArray]:
    """Ground truth the exported tables hide: which admissions are renal patients.

    Keyed by hospital name; each array is aligned with that cohort's ``frame``
    rows for the same ``seed`` and ``scale``. For evaluation only.
    """
    return {cohort.name: ckd for cohort, ckd in _generate(seed, scale)}
