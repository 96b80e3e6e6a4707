"""The five demo hospitals: who they admit, what they measure, and how they export it.

Each profile holds two kinds of facts. The *clinical* ones (size, demographics,
acuity, prevalence, share of renal patients, missingness) feed the generative
model in :mod:`fedcare.data.synthetic`. The *export* ones (column names, units,
codings, rounding) describe the table the hospital's own systems would hand its
data scientist, so that the site mapping has real work to do.

The numbers are plausible rather than calibrated to any real hospital; see
``docs/cohorts.md`` for the reasoning behind each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Order of the schema's ethnicity categories; every mix below follows it.
ETHNICITIES: tuple[str, ...] = ("white", "black", "asian", "hispanic", "other")

# Relative risk of being a chronic kidney disease / dialysis patient by ethnicity.
# End-stage kidney disease is several times more common in Black and South Asian
# patients, which turns the renal subgroup into an ethnicity-linked fairness
# problem as well, as it is in real data.
CKD_RELATIVE_RISK: tuple[float, ...] = (1.0, 2.5, 1.6, 1.4, 1.0)

# The schema features, in the study's order.
FEATURES: tuple[str, ...] = (
    "age",
    "sex_female",
    "heart_rate",
    "resp_rate",
    "sbp",
    "temperature",
    "spo2",
    "wbc",
    "creatinine",
    "lactate",
    "glucose",
)

# Consortium units of the study; a profile overrides some of them in `units`.
SCHEMA_UNITS: dict[str, str] = {
    "age": "years",
    "heart_rate": "bpm",
    "resp_rate": "/min",
    "sbp": "mmHg",
    "temperature": "degC",
    "spo2": "%",
    "wbc": "10^9/L",
    "creatinine": "umol/L",
    "lactate": "mmol/L",
    "glucose": "mmol/L",
}

# Decimal places a lab or monitor reports, by unit. Values are rounded in the
# hospital's own unit, the way its systems store them.
DECIMALS: dict[str, int] = {
    "years": 0,
    "bpm": 0,
    "/min": 0,
    "mmHg": 0,
    "%": 0,
    "degC": 1,
    "degF": 1,
    "10^9/L": 1,
    "umol/L": 0,
    "mmol/L": 1,
    "mg/dL": 0,
}
# Creatinine in mg/dL is reported to two decimals (1.13 mg/dL), unlike glucose.
CREATININE_MGDL_DECIMALS = 2

# Missing-cell probability at a typical admission. Labs are ordered more often
# for sicker patients; synthetic.py shifts these rates by severity.
_VITALS_RARE = {
    "heart_rate": 0.005,
    "resp_rate": 0.01,
    "sbp": 0.005,
    "temperature": 0.01,
    "spo2": 0.01,
}


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one demo hospital different from the others."""

    name: str
    kind: str
    size: int
    age_mean: float
    age_sd: float
    female: float
    ethnicity_mix: tuple[float, float, float, float, float]
    prevalence: float
    acuity: float  # mean latent severity of admissions (case mix)
    ckd_share: float  # share of admissions in the renal subgroup
    missing: dict[str, float]
    columns: dict[str, str]  # schema name (features, "ethnicity", "label") -> local column
    units: dict[str, str] = field(default_factory=dict)  # local units that differ from schema
    sex_codes: tuple[str | int, str | int] = ("M", "F")  # (male, female) as exported
    ethnicity_codes: tuple[str | int, ...] = ETHNICITIES  # local code per schema category
    label_codes: tuple[str | int, str | int] = (0, 1)  # (no event, event) as exported

    def unit(self, feature: str) -> str:
        """The unit this hospital exports ``feature`` in."""
        return self.units.get(feature, SCHEMA_UNITS[feature])


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="northgate",
        kind="urban academic teaching hospital, tertiary referrals, diverse catchment",
        size=20_000,
        age_mean=58.0,
        age_sd=19.0,
        female=0.51,
        ethnicity_mix=(0.55, 0.17, 0.17, 0.05, 0.06),
        prevalence=0.07,
        acuity=0.15,
        ckd_share=0.01,
        missing={**_VITALS_RARE, "wbc": 0.04, "creatinine": 0.05, "lactate": 0.30, "glucose": 0.07},
        columns={
            "age": "age_years",
            "sex_female": "sex",
            "heart_rate": "HR",
            "resp_rate": "RR",
            "sbp": "SBP",
            "temperature": "Temp_C",
            "spo2": "SpO2",
            "wbc": "WBC",
            "creatinine": "Creat_umol",
            "lactate": "Lactate_mmol",
            "glucose": "Glucose_mmol",
            "ethnicity": "ethnic_group",
            "label": "deteriorated_48h",
        },
        ethnicity_codes=("White", "Black", "Asian", "Hispanic", "Other"),
    ),
    SiteProfile(
        name="riverside",
        kind="large US community hospital, reports temperature in degF and labs in mg/dL",
        size=9_000,
        age_mean=63.0,
        age_sd=18.0,
        female=0.53,
        ethnicity_mix=(0.58, 0.14, 0.05, 0.19, 0.04),
        prevalence=0.09,
        acuity=0.0,
        ckd_share=0.025,
        missing={
            **{k: 2 * v for k, v in _VITALS_RARE.items()},
            "wbc": 0.07,
            "creatinine": 0.08,
            "lactate": 0.40,
            "glucose": 0.05,
        },
        columns={
            "age": "AGE",
            "sex_female": "GENDER",
            "heart_rate": "pulse",
            "resp_rate": "resp",
            "sbp": "bp_sys",
            "temperature": "temp_f",
            "spo2": "o2_sat",
            "wbc": "wbc_k",
            "creatinine": "creat_mgdl",
            "lactate": "lactate_mgdl",
            "glucose": "glucose_mgdl",
            "ethnicity": "RACE_ETH",
            "label": "EVENT_48H",
        },
        units={
            "temperature": "degF",
            "creatinine": "mg/dL",
            "lactate": "mg/dL",
            "glucose": "mg/dL",
        },
        sex_codes=("male", "female"),
        ethnicity_codes=("WHITE", "BLACK", "ASIAN", "HISPANIC", "OTHER"),
        label_codes=("N", "Y"),
    ),
    SiteProfile(
        name="ashby-general",
        kind="district general hospital, older and mostly white population",
        size=3_500,
        age_mean=67.0,
        age_sd=17.0,
        female=0.52,
        ethnicity_mix=(0.88, 0.03, 0.06, 0.01, 0.02),
        prevalence=0.11,
        acuity=0.1,
        ckd_share=0.03,
        missing={
            **{k: 2 * v for k, v in _VITALS_RARE.items()},
            "wbc": 0.10,
            "creatinine": 0.12,
            "lactate": 0.65,
            "glucose": 0.15,
        },
        columns={
            "age": "Age",
            "sex_female": "Sex",
            "heart_rate": "hr_bpm",
            "resp_rate": "rr_min",
            "sbp": "sys_bp",
            "temperature": "temp_c",
            "spo2": "spo2_pct",
            "wbc": "wbc_count",
            "creatinine": "creatinine",
            "lactate": "lactate",
            "glucose": "glucose",
            "ethnicity": "Ethnicity",
            "label": "outcome",
        },
        sex_codes=(1, 2),  # the registry convention: 1 = male, 2 = female
        ethnicity_codes=("W", "B", "A", "H", "O"),
    ),
    SiteProfile(
        name="kestrel-renal",
        kind="small renal-referral hospital, many dialysis and chronic kidney disease patients",
        size=1_200,
        age_mean=62.0,
        age_sd=15.0,
        female=0.42,
        ethnicity_mix=(0.48, 0.25, 0.19, 0.03, 0.05),
        prevalence=0.12,
        acuity=0.2,
        ckd_share=0.45,
        missing={
            **{k: 2 * v for k, v in _VITALS_RARE.items()},
            "wbc": 0.08,
            "creatinine": 0.02,  # a renal unit measures creatinine on everyone
            "lactate": 0.80,
            "glucose": 0.12,
        },
        columns={
            "age": "age",
            "sex_female": "female",
            "heart_rate": "heart_rate",
            "resp_rate": "resp_rate",
            "sbp": "systolic",
            "temperature": "temperature",
            "spo2": "sats",
            "wbc": "wbc",
            "creatinine": "creat_umol_l",
            "lactate": "lac",
            "glucose": "gluc",
            "ethnicity": "ethnicity",
            "label": "det48",
        },
        sex_codes=(0, 1),  # already the schema's 0/1 coding
    ),
    SiteProfile(
        name="fellside-cottage",
        kind="rural cottage hospital, elderly patients, few labs on site",
        size=500,
        age_mean=72.0,
        age_sd=14.0,
        female=0.56,
        ethnicity_mix=(0.95, 0.01, 0.02, 0.01, 0.01),
        prevalence=0.06,
        acuity=-0.3,
        ckd_share=0.015,
        missing={
            **{k: 3 * v for k, v in _VITALS_RARE.items()},
            "wbc": 0.20,
            "creatinine": 0.20,
            "lactate": 0.92,
            "glucose": 0.25,
        },
        columns={
            "age": "Age",
            "sex_female": "Gender",
            "heart_rate": "Pulse",
            "resp_rate": "Resp",
            "sbp": "BP_systolic",
            "temperature": "Temperature",
            "spo2": "O2Sat",
            "wbc": "WBC",
            "creatinine": "Creatinine",
            "lactate": "Lactate",
            "glucose": "Glucose",
            "ethnicity": "EthnicCode",
            "label": "Deteriorated",
        },
        sex_codes=("Male", "Female"),
        ethnicity_codes=(1, 2, 3, 4, 5),
    ),
)
