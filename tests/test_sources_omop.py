"""OMOP CDM 5.4 databases read at the site, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from fedcare.data import demo_study
from fedcare.data.exports import omop_mapping, write_omop_database
from fedcare.data.synthetic import HospitalCohort, generate_cohorts
from fedcare.schema.mapping import DataValidationError, MappingError
from fedcare.site.dataset import prepare_site_data
from fedcare.site.fingerprint import source_digest, source_label
from fedcare.sources.mapping import ExtractMapping
from fedcare.sources.omop import OmopError, read_omop
from fedcare.sources.spec import FhirSource, OmopSource
from fedcare.study import parse_study

from .databases import BACKENDS, database

STUDY = demo_study()
HEART_RATE, TEMPERATURE = 3_027_018, 3_020_891
DEG_F = 9289


def renal() -> HospitalCohort:
    return generate_cohorts(scale=0.1)[3]  # kestrel-renal, 120 admissions


@pytest.fixture(params=BACKENDS)
def cdm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh OMOP database holding the renal hospital."""
    with database(request.param, tmp_path) as url:
        write_omop_database(renal(), url)
        yield url


def mapping(**changes: Any) -> ExtractMapping:
    return ExtractMapping.model_validate({**omop_mapping(renal()), **changes})


def execute(url: str, statement: str, **params: Any) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)
    engine.dispose()


def add_measurement(
    url: str,
    mid: int,
    concept: int,
    value: float,
    unit: int,
    when: str,
    visit: int | None,
    person: int = 1,
) -> None:
    execute(
        url,
        "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id, "
        "measurement_datetime, value_as_number, unit_concept_id, visit_occurrence_id) "
        "VALUES (:mid, :person, :concept, :when, :value, :unit, :visit)",
        mid=mid,
        person=person,
        concept=concept,
        when=when,
        value=value,
        unit=unit,
        visit=visit,
    )


def test_the_database_gives_the_same_training_data_as_the_table(cdm: str) -> None:
    cohort = renal()
    extract = read_omop(cdm, None, mapping(), STUDY.feature_schema).checked(STUDY.feature_schema)
    assert [str(n) for n in extract.notices] == [
        "measurement: concept 3025315 is not mapped: ignored (120 rows)"
    ]
    from_db = prepare_site_data(extract.frame, extract.mapping, STUDY)
    from_csv = prepare_site_data(cohort.frame, cohort.mapping, STUDY)
    for part in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(from_db, part), getattr(from_csv, part)), part


def test_a_unit_the_mapping_does_not_list_is_refused_with_counts(cdm: str) -> None:
    for mid in (900_001, 900_002):
        add_measurement(cdm, mid, TEMPERATURE, 99.1, DEG_F, "2026-01-05 00:30:00", 1)
    extract = read_omop(cdm, None, mapping(), STUDY.feature_schema)
    assert [str(v) for v in extract.violations] == [
        "temperature: unit concept 9289 is not among the mapped units ['586323'] (2 rows)"
    ]
    with pytest.raises(DataValidationError, match="unit concept 9289"):
        extract.checked(STUDY.feature_schema)


def test_the_window_and_pick_decide_which_value_a_visit_takes(cdm: str) -> None:
    # Visit 1 starts 2026-01-05 00:00. Before admission (outside), 5 h in (inside, the
    # highest), 7 h in (outside the 6 h window).
    add_measurement(cdm, 900_001, HEART_RATE, 30, 8541, "2026-01-04 23:00:00", 1)
    add_measurement(cdm, 900_002, HEART_RATE, 200, 8541, "2026-01-05 05:00:00", 1)
    add_measurement(cdm, 900_003, HEART_RATE, 240, 8541, "2026-01-05 07:00:00", 1)
    base = omop_mapping(renal())["features"]
    picked = {}
    for pick in ("first", "last", "max"):
        features = {**base, "heart_rate": {**base["heart_rate"], "pick": pick}}
        frame = read_omop(cdm, None, mapping(features=features), STUDY.feature_schema).frame
        picked[pick] = frame["heart_rate"].iloc[0]
    first = renal().frame.iloc[0][renal().mapping.column("heart_rate").column]
    assert picked == {"first": first, "last": 200.0, "max": 200.0}


def test_a_measurement_without_a_visit_joins_by_person_and_time(cdm: str) -> None:
    execute(
        cdm,
        "DELETE FROM measurement WHERE person_id = 2 AND measurement_concept_id = :c",
        c=HEART_RATE,
    )
    add_measurement(cdm, 900_001, HEART_RATE, 111, 8541, "2026-01-05 01:00:00", None, person=2)
    frame = read_omop(cdm, None, mapping(), STUDY.feature_schema).frame
    assert frame["heart_rate"].iloc[1] == 111.0


def test_only_the_extracted_table_leaves_the_database(
    cdm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten thousand more measurements in the visits' windows: the rows fedcare fetches
    stay one per visit and field (plus grouped counts), not one per measurement."""
    engine = sa.create_engine(cdm)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id, "
                "measurement_datetime, value_as_number, unit_concept_id, visit_occurrence_id) "
                "VALUES (:mid, :visit, :concept, :when, 80, 8541, :visit)"
            ),
            [
                {
                    "mid": 1_000_000 + i,
                    "visit": 1 + i % 120,
                    "concept": HEART_RATE,
                    "when": "2026-01-05 03:00:00",
                }
                for i in range(10_000)
            ],
        )
    engine.dispose()
    fetched = 0
    execute_sql = sa.engine.Connection.execute

    def counting(self: sa.engine.Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal fetched
        rows = list(execute_sql(self, statement, *args, **kwargs))
        fetched += len(rows)
        return rows

    monkeypatch.setattr(sa.engine.Connection, "execute", counting)
    extract = read_omop(cdm, None, mapping(), STUDY.feature_schema)
    assert len(extract.frame) == 120
    fields = len(mapping().measured())
    assert fetched <= 120 * (1 + fields + 1) + 10, fetched


def test_a_mapping_that_is_not_omop_is_refused(cdm: str) -> None:
    features = omop_mapping(renal())["features"]
    bad = {
        **features,
        "heart_rate": {**features["heart_rate"], "codes": ["http://loinc.org|8867-4"]},
    }
    with pytest.raises(MappingError, match="OMOP concept ids are integers"):
        read_omop(cdm, None, mapping(features=bad), STUDY.feature_schema)
    with pytest.raises(MappingError, match="person fields"):
        read_omop(
            cdm,
            None,
            mapping(features={**features, "age": {"patient": "birthDate"}}),
            STUDY.feature_schema,
        )


def test_a_database_without_the_cdm_is_refused_in_one_line(tmp_path: Path) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    with pytest.raises(OmopError, match="cannot read the OMOP CDM tables: no such table") as error:
        read_omop(empty, None, mapping(), STUDY.feature_schema)
    assert "\n" not in str(error.value)
    with pytest.raises(OmopError, match="not a database URL"):
        read_omop("nonsense://x", None, mapping(), STUDY.feature_schema)


def test_the_label_from_the_visit_outcome_refuses_an_unlisted_code(cdm: str) -> None:
    update = "UPDATE visit_occurrence SET discharged_to_concept_id = :code"
    execute(cdm, update, code=8536)  # home
    execute(cdm, update + " WHERE visit_occurrence_id <= 10", code=4216643)  # died
    execute(cdm, update + " WHERE visit_occurrence_id = 11", code=8863)  # not in the mapping
    label = {"encounter_outcome": {"values": {8536: 0, 4216643: 1}}}
    extract = read_omop(cdm, None, mapping(label=label), STUDY.feature_schema)
    assert extract.frame["deterioration_48h"].tolist()[:12] == ["4216643"] * 10 + ["8863", "8536"]
    with pytest.raises(
        DataValidationError, match=r"not listed in values \['4216643', '8536'\]: '8863'"
    ):
        prepare_site_data(extract.frame, extract.mapping, STUDY)


def test_an_unknown_birth_day_leaves_age_missing_and_counted(cdm: str) -> None:
    execute(cdm, "UPDATE person SET birth_datetime = NULL, day_of_birth = NULL WHERE person_id = 1")
    extract = read_omop(cdm, None, mapping(), STUDY.feature_schema)
    assert np.isnan(extract.frame["age"].iloc[0])
    assert "age: person's birth month or day unknown: age left missing (1 visit)" in [
        str(n) for n in extract.notices
    ]


def test_the_fingerprint_follows_the_extracted_table(cdm: str) -> None:
    source = OmopSource(kind="omop", url=cdm)
    before = source_digest(source, read_omop(cdm, None, mapping(), STUDY.feature_schema).frame)
    again = source_digest(source, read_omop(cdm, None, mapping(), STUDY.feature_schema).frame)
    execute(
        cdm, "UPDATE measurement SET value_as_number = value_as_number + 1 WHERE measurement_id = 1"
    )
    after = source_digest(source, read_omop(cdm, None, mapping(), STUDY.feature_schema).frame)
    assert before == again != after


def test_a_password_in_the_url_is_never_shown(tmp_path: Path) -> None:
    url = "postgresql+psycopg://fedcare:s3cret-word@127.0.0.1:1/cdm"
    with pytest.raises(OmopError) as error:
        read_omop(url, None, mapping(), STUDY.feature_schema)
    assert "s3cret-word" not in str(error.value)
    assert "127.0.0.1" in str(error.value)
    assert "s3cret-word" not in source_label(OmopSource(kind="omop", url=url))


def test_the_data_set_is_named_after_the_database_or_the_export() -> None:
    assert (
        OmopSource(kind="omop", url="sqlite:////data/kestrel-cdm.sqlite").dataset_name
        == "kestrel-cdm"
    )
    assert OmopSource(kind="omop", url="postgresql+psycopg://u@h/cdm54").dataset_name == "cdm54"
    assert FhirSource(kind="fhir", path=Path("/exports/ehr-2026")).dataset_name == "ehr-2026"


def test_a_foreign_unit_on_a_measurement_without_a_visit_is_refused(cdm: str) -> None:
    # No visit named, the same person, inside the 6 h window of their admission.
    add_measurement(cdm, 900_001, TEMPERATURE, 99.1, DEG_F, "2026-01-05 01:00:00", None, person=3)
    extract = read_omop(cdm, None, mapping(), STUDY.feature_schema)
    assert [str(v) for v in extract.violations] == [
        "temperature: unit concept 9289 is not among the mapped units ['586323'] (1 row)"
    ]


def test_an_age_is_converted_to_the_schema_unit(cdm: str) -> None:
    canonical = STUDY.canonical()
    for feature in canonical["schema"]["features"]:
        if feature["name"] == "age":
            feature.update(unit="months", range=[0, 1400], reference=[780, 216])
    months = parse_study(yaml.safe_dump(canonical))
    in_years = read_omop(cdm, None, mapping(), STUDY.feature_schema).frame["age"]
    in_months = read_omop(cdm, None, mapping(), months.feature_schema).frame["age"]
    assert (in_months == in_years * 12).all()


def test_the_cdm_may_live_in_its_own_postgresql_schema(tmp_path: Path) -> None:
    with database("postgresql", tmp_path) as url:
        execute(url, "CREATE SCHEMA cdm")
        write_omop_database(renal(), url, schema_name="cdm")
        extract = read_omop(url, "cdm", mapping(), STUDY.feature_schema)
        assert len(extract.frame) == 120
        with pytest.raises(OmopError, match="cannot read the OMOP CDM tables"):
            read_omop(url, None, mapping(), STUDY.feature_schema)  # not in the default schema
