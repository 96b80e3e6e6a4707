"""The built-in synthetic hospitals: determinism, realism, local formats, and the transfer gap."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from fedcare.data import demo_study
from fedcare.data.synthetic import HospitalCohort, generate_cohorts, subgroup_membership
from fedcare.schema.features import FeatureSchema
from fedcare.schema.mapping import apply_mapping

SEED = 2026
LABEL = "deterioration_48h"
VITALS = ["heart_rate", "resp_rate", "sbp", "temperature", "spo2"]
RENAL = "kestrel-renal"


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return demo_study().feature_schema


@pytest.fixture(scope="module")
def cohorts() -> list[HospitalCohort]:
    return generate_cohorts(SEED)


@pytest.fixture(scope="module")
def mapped(cohorts: list[HospitalCohort], schema: FeatureSchema) -> dict[str, pd.DataFrame]:
    return {c.name: apply_mapping(c.frame, c.mapping, schema).frame for c in cohorts}


@pytest.fixture(scope="module")
def renal() -> dict[str, np.ndarray]:
    return subgroup_membership(SEED)


def by_name(cohorts: list[HospitalCohort], name: str) -> HospitalCohort:
    return next(c for c in cohorts if c.name == name)


# --- determinism -----------------------------------------------------------------


def test_same_seed_gives_identical_frames() -> None:
    first, second = generate_cohorts(7, scale=0.1), generate_cohorts(7, scale=0.1)
    assert [c.name for c in first] == [c.name for c in second]
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a.frame, b.frame)
        assert a.mapping == b.mapping
        assert a.description == b.description


def test_another_seed_gives_different_data() -> None:
    first, second = generate_cohorts(7, scale=0.1), generate_cohorts(8, scale=0.1)
    for a, b in zip(first, second, strict=True):
        assert a.frame.shape == b.frame.shape
        assert not a.frame.equals(b.frame), a.name


def test_subgroup_membership_is_aligned_with_the_frames() -> None:
    cohorts = generate_cohorts(7, scale=0.1)
    membership = subgroup_membership(7, scale=0.1)
    assert [c.name for c in cohorts] == list(membership)
    for cohort in cohorts:
        assert membership[cohort.name].shape == (len(cohort.frame),)


def test_full_scale_generation_is_fast() -> None:
    started = time.perf_counter()
    generate_cohorts(SEED)
    assert time.perf_counter() - started < 2.0


# --- the hospitals ----------------------------------------------------------------


def test_at_least_five_hospitals_with_site_ids(cohorts: list[HospitalCohort]) -> None:
    assert len(cohorts) >= 5
    names = [c.name for c in cohorts]
    assert len(set(names)) == len(names)
    for cohort in cohorts:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", cohort.name)
        assert cohort.mapping.site == cohort.name
        assert f"{len(cohort.frame):,} admissions" in cohort.description
        assert "\n" not in cohort.description


def test_sizes_span_500_to_20000_at_full_scale(cohorts: list[HospitalCohort]) -> None:
    sizes = sorted(len(c.frame) for c in cohorts)
    assert sizes[0] == 500
    assert sizes[-1] == 20_000
    assert len(set(sizes)) == len(sizes)


def test_scale_multiplies_sizes_with_a_floor_of_50() -> None:
    full = {c.name: len(c.frame) for c in generate_cohorts(SEED)}
    tenth = {c.name: len(c.frame) for c in generate_cohorts(SEED, scale=0.1)}
    assert tenth == {name: max(50, round(n * 0.1)) for name, n in full.items()}
    assert {len(c.frame) for c in generate_cohorts(SEED, scale=0.001)} == {50}


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_scale_must_be_positive(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        generate_cohorts(SEED, scale=scale)


def test_prevalence_is_between_3_and_15_percent_and_differs(
    mapped: dict[str, pd.DataFrame],
) -> None:
    prevalence = {name: frame[LABEL].mean() for name, frame in mapped.items()}
    for name, p in prevalence.items():
        assert 0.03 <= p <= 0.15, (name, p)
    assert max(prevalence.values()) - min(prevalence.values()) > 0.04


def test_demographics_differ(mapped: dict[str, pd.DataFrame]) -> None:
    median_age = [frame["age"].median() for frame in mapped.values()]
    white = [(frame["ethnicity"] == "white").mean() for frame in mapped.values()]
    assert max(median_age) - min(median_age) >= 10
    assert max(white) - min(white) >= 0.3


# --- local formats ------------------------------------------------------------------


def test_names_units_and_codings_differ_between_hospitals(
    cohorts: list[HospitalCohort],
) -> None:
    def units(feature: str) -> set[str | None]:
        return {c.mapping.column(feature).unit for c in cohorts}

    assert units("temperature") == {"degC", "degF"}
    for lab in ("creatinine", "lactate", "glucose"):
        assert "mg/dL" in units(lab)
        assert len(units(lab)) == 2
    temperature_columns = {c.mapping.column("temperature").column for c in cohorts}
    assert len(temperature_columns) == len(cohorts)
    sex_codings = {str(c.mapping.column("sex_female").values) for c in cohorts}
    assert len(sex_codings) >= 4


def test_a_degf_hospital_exports_fahrenheit(cohorts: list[HospitalCohort]) -> None:
    fahrenheit = [c for c in cohorts if c.mapping.column("temperature").unit == "degF"]
    assert fahrenheit
    for cohort in fahrenheit:
        assert 96 < cohort.frame[cohort.mapping.column("temperature").column].median() < 100


def test_the_frame_holds_only_mapped_columns(cohorts: list[HospitalCohort]) -> None:
    """Nothing beyond the mapping, so subgroup membership cannot leak into a model."""
    for cohort in cohorts:
        m = cohort.mapping
        wanted = {m.column(f).column for f in m.features}
        wanted |= {m.column(a).column for a in m.attributes} | {m.label_column().column}
        assert set(cohort.frame.columns) == wanted


# --- mapping onto the study ---------------------------------------------------------


def test_every_cohort_passes_apply_mapping(
    mapped: dict[str, pd.DataFrame], schema: FeatureSchema
) -> None:
    expected = [f.name for f in schema.features] + ["ethnicity", LABEL]
    for name, frame in mapped.items():
        assert sorted(frame.columns) == sorted(expected), name
        assert set(frame[LABEL].unique()) == {0, 1}
        assert set(frame["sex_female"].unique()) == {0.0, 1.0}
        assert frame["ethnicity"].notna().all()
        assert set(frame["ethnicity"]) <= set(schema.attributes[0].categories or ())


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_other_seeds_and_small_scales_also_map_cleanly(seed: int, schema: FeatureSchema) -> None:
    for cohort in generate_cohorts(seed, scale=0.05):
        apply_mapping(cohort.frame, cohort.mapping, schema)


def test_temperatures_are_plausible_celsius_after_mapping(
    mapped: dict[str, pd.DataFrame],
) -> None:
    for name, frame in mapped.items():
        temperature = frame["temperature"].dropna()
        assert temperature.between(31, 43).all(), name
        assert 36.5 < temperature.median() < 37.3, name


def test_labs_agree_across_hospitals_after_unit_conversion(
    mapped: dict[str, pd.DataFrame],
) -> None:
    """A unit mistake would put one hospital's median off by a factor of 18 or 88."""
    for lab in ("creatinine", "lactate", "glucose", "wbc"):
        medians = {name: frame[lab].median() for name, frame in mapped.items() if name != RENAL}
        assert max(medians.values()) / min(medians.values()) < 1.3, (lab, medians)


# --- measurement practice ----------------------------------------------------------


def test_lactate_mostly_missing_at_small_hospitals(mapped: dict[str, pd.DataFrame]) -> None:
    for name, frame in mapped.items():
        missing = frame["lactate"].isna().mean()
        if len(frame) <= 1_500:
            assert missing > 0.6, (name, missing)
        elif len(frame) >= 9_000:
            assert 0.2 <= missing <= 0.45, (name, missing)


def test_vitals_rarely_missing_and_some_labs_missing(mapped: dict[str, pd.DataFrame]) -> None:
    for name, frame in mapped.items():
        assert frame[VITALS].isna().mean().max() < 0.05, name
        assert frame["age"].notna().all()
        for lab in ("wbc", "creatinine", "glucose"):
            assert frame[lab].isna().any(), (name, lab)


# --- the renal subgroup ----------------------------------------------------------------


def test_renal_subgroup_is_rare_at_large_hospitals_and_common_at_one(
    cohorts: list[HospitalCohort], renal: dict[str, np.ndarray]
) -> None:
    shares = {c.name: renal[c.name].mean() for c in cohorts}
    assert 0.3 <= shares[RENAL] <= 0.5
    for cohort in cohorts:
        if len(cohort.frame) >= 9_000:
            assert 0.005 <= shares[cohort.name] <= 0.035, (cohort.name, shares[cohort.name])


def test_renal_patients_present_differently(
    mapped: dict[str, pd.DataFrame], renal: dict[str, np.ndarray]
) -> None:
    frame, group = mapped[RENAL], renal[RENAL]
    assert frame["creatinine"][group].median() > 4 * frame["creatinine"][~group].median()

    def temperature_shift(rows: np.ndarray) -> float:
        part = frame[rows]
        sick = part[LABEL] == 1
        return float(part["temperature"][sick].mean() - part["temperature"][~sick].mean())

    # Others run a fever when they deteriorate; renal patients get colder.
    assert temperature_shift(~group) > 0.2
    assert temperature_shift(group) < -0.2


# --- the transfer gap -----------------------------------------------------------------


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame[LABEL])
    return train, test


@pytest.fixture(scope="module")
def splits(mapped: dict[str, pd.DataFrame]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return {name: _split(frame) for name, frame in mapped.items()}


@pytest.fixture(scope="module")
def features(schema: FeatureSchema) -> list[str]:
    return [f.name for f in schema.features]


def _fit(train: pd.DataFrame, features: list[str]) -> Pipeline:
    model = make_pipeline(
        SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000)
    )
    return model.fit(train[features].to_numpy(), train[LABEL].to_numpy())


def _auroc(model: Pipeline, test: pd.DataFrame, features: list[str]) -> float:
    scores = model.predict_proba(test[features].to_numpy())[:, 1]
    return float(roc_auc_score(test[LABEL], scores))


@pytest.fixture(scope="module")
def models(
    splits: dict[str, tuple[pd.DataFrame, pd.DataFrame]], features: list[str]
) -> dict[str, Pipeline]:
    pooled = pd.concat([train for train, _ in splits.values()])
    return {
        "largest": _fit(splits["northgate"][0], features),
        "renal": _fit(splits[RENAL][0], features),
        "pooled": _fit(pooled, features),
    }


def test_largest_hospital_model_transfers_poorly_to_the_renal_hospital(
    models: dict[str, Pipeline],
    splits: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    features: list[str],
) -> None:
    test = splits[RENAL][1]
    largest = _auroc(models["largest"], test, features)
    pooled = _auroc(models["pooled"], test, features)
    assert pooled - largest >= 0.05, (largest, pooled)


def test_renal_hospital_model_transfers_poorly_to_the_large_hospitals(
    models: dict[str, Pipeline],
    splits: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    features: list[str],
) -> None:
    for name in ("northgate", "riverside"):
        test = splits[name][1]
        renal = _auroc(models["renal"], test, features)
        pooled = _auroc(models["pooled"], test, features)
        assert pooled - renal >= 0.02, (name, renal, pooled)


def test_pooled_model_has_clinically_plausible_discrimination(
    models: dict[str, Pipeline],
    splits: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    features: list[str],
) -> None:
    for name in ("northgate", "riverside", "ashby-general"):
        assert 0.70 <= _auroc(models["pooled"], splits[name][1], features) <= 0.88, name
