"""FHIR R4 bulk exports read at the site: codes, units, windows, labels, and every refusal."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.schema.mapping import DataValidationError, MappingError, apply_mapping
from fedcare.schema.units import conversion
from fedcare.sources.fhir import FhirExportError, export_files, read_fhir
from fedcare.sources.load import read_source
from fedcare.sources.mapping import ExtractMapping
from fedcare.sources.spec import FhirSource
from fedcare.study import Study, parse_study

LOINC = "http://loinc.org"
LOCAL = "https://lab.example.org/codes"
UCUM = "http://unitsofmeasure.org"
HR, TEMP, WEIGHT = "8867-4", "8310-5", "29463-7"

STUDY_TEXT = """
name: fhir-toy
schema:
  label: {name: y}
  features:
    - {name: age, unit: years, range: [16, 110]}
    - {name: sex_female, type: binary}
    - {name: heart_rate, unit: bpm, range: [20, 250], missing: {rule: value, fill: 80}}
    - {name: temperature, unit: degC, range: [30, 44], missing: {rule: value, fill: 37}}
  attributes:
    - {name: ethnicity, categories: [white, black, other]}
training: {epochs: 1, batch_size: 16, learning_rate: 0.1}
rounds: {count: 2, min_sites: 1}
seed: 3
"""
STUDY = parse_study(STUDY_TEXT)
ETHNICITY_URL = "https://h.example.org/ethnicity"


def mapping(**changes: Any) -> ExtractMapping:
    base: dict[str, Any] = {
        "site": "h",
        "index": {"classes": ["IMP"]},
        "features": {
            "age": {"patient": "age"},
            "sex_female": {"patient": "gender", "values": {"male": 0, "female": 1}},
            "heart_rate": {
                "codes": [f"{LOCAL}|HR", f"{LOINC}|{HR}"],
                "units": {"/min": "bpm"},
                "window_h": [0, 6],
            },
            "temperature": {
                "codes": [f"{LOINC}|{TEMP}"],
                "units": ["Cel", "[degF]"],
                "window_h": [0, 6],
            },
        },
        "label": {"condition": {"codes": ["https://x.org/outcome|det"], "window_h": [0, 48]}},
        "attributes": {
            "ethnicity": {
                "patient": "extension",
                "url": ETHNICITY_URL,
                "values": {"W": "white", "B": "black", "O": "other"},
            }
        },
    }
    base.update(changes)
    return ExtractMapping.model_validate(base)


def patient(
    pid: str, gender: str = "female", born: str = "1960-06-15", eth: str = "W"
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "gender": gender,
        "birthDate": born,
        "extension": [{"url": ETHNICITY_URL, "valueString": eth}],
    }


def encounter(
    eid: str, pid: str, start: str = "2026-03-01T08:00:00+00:00", klass: str = "IMP"
) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start},
    }


def observation(
    oid: str,
    pid: str,
    eid: str | None,
    codings: list[tuple[str, str]],
    value: float,
    unit: str,
    when: str = "2026-03-01T09:00:00+00:00",
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": s, "code": c} for s, c in codings]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }
    if eid is not None:
        resource["encounter"] = {"reference": f"Encounter/{eid}"}
    return resource


def condition(cid: str, pid: str, eid: str, onset: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "code": {"coding": [{"system": "https://x.org/outcome", "code": "det"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "encounter": {"reference": f"Encounter/{eid}"},
        "onsetDateTime": onset,
    }


def write_export(folder: Path, resources: list[dict[str, Any]], manifest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ("Patient", "Encounter", "Observation", "Condition")
    for kind in kinds:
        lines = [json.dumps(r) for r in resources if r["resourceType"] == kind]
        (folder / f"{kind}.ndjson").write_text("".join(f"{line}\n" for line in lines))
    if manifest:
        output = [{"type": k, "url": f"https://h.example.org/bulk/{k}.ndjson"} for k in kinds]
        (folder / "manifest.json").write_text(json.dumps({"output": output}))
    return folder


def cohort(n: int = 30) -> list[dict[str, Any]]:
    """``n`` admissions, each with a heart rate (local code first, LOINC second), a
    temperature in Celsius, an unmapped body weight; every third one deteriorates."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        pid, eid = f"p{i}", f"e{i}"
        out += [
            patient(pid, "female" if i % 2 else "male", eth="WBO"[i % 3]),
            encounter(eid, pid),
            observation(f"hr{i}", pid, eid, [(LOCAL, "HR"), (LOINC, HR)], 70 + i, "/min"),
            observation(f"t{i}", pid, eid, [(LOINC, TEMP)], 36.5 + i / 100, "Cel"),
            observation(f"w{i}", pid, eid, [(LOINC, WEIGHT)], 70, "kg"),
        ]
        if i % 3 == 0:
            out.append(condition(f"c{i}", pid, eid, "2026-03-02T08:00:00+00:00"))
    return out


def test_export_reads_into_the_schema_with_unmapped_codes_counted(tmp_path: Path) -> None:
    extract = read_fhir(write_export(tmp_path, cohort()), mapping(), STUDY.feature_schema)
    assert extract.violations == ()
    frame = extract.frame
    assert len(frame) == 30
    assert frame["heart_rate"].tolist() == [70.0 + i for i in range(30)]
    assert frame["age"].tolist() == [65.0] * 30  # born 1960-06-15, admitted 2026-03-01
    assert frame["sex_female"].tolist() == ["female" if i % 2 else "male" for i in range(30)]
    assert frame["y"].tolist() == [int(i % 3 == 0) for i in range(30)]
    assert [str(n) for n in extract.notices] == [
        f"Observation: code {LOINC}|{WEIGHT} is not mapped: ignored (30 resources)"
    ]
    mapped = apply_mapping(frame, extract.mapping, STUDY.feature_schema).frame
    assert mapped["sex_female"].tolist() == [float(i % 2) for i in range(30)]
    assert mapped["ethnicity"].tolist() == [["white", "black", "other"][i % 3] for i in range(30)]


def test_units_are_converted_per_observation(tmp_path: Path) -> None:
    resources = cohort(4)
    resources[3]["valueQuantity"] = {
        "value": 100.4,
        "unit": "degF",
        "system": UCUM,
        "code": "[degF]",
    }
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    factor, offset = conversion("degF", "degC")
    assert extract.frame["temperature"].tolist()[0] == 100.4 * factor + offset
    assert extract.frame["temperature"].tolist()[1] == 36.51


def test_a_unit_the_mapping_does_not_list_is_refused_with_counts(tmp_path: Path) -> None:
    resources = cohort(6)
    # Two hospitals' monitors send temperature in Kelvin; the mapping lists Cel and [degF].
    for resource in (r for r in resources if r["id"] in ("t1", "t4")):
        resource["valueQuantity"] = {
            "value": 310.0,
            "unit": "K",
            "system": UCUM,
            "code": "K",
        }
    source = FhirSource(kind="fhir", path=write_export(tmp_path / "x", resources))
    (tmp_path / "m.yaml").write_text(json.dumps(mapping().model_dump(mode="json")))
    with pytest.raises(DataValidationError) as refused:
        read_source(source, tmp_path / "m.yaml", STUDY.feature_schema)
    assert [str(v) for v in refused.value.violations] == [
        "temperature: unit 'K' is not among the mapped units ['Cel', '[degF]'] (2 resources)"
    ]


def test_a_value_outside_the_schema_range_is_refused_as_for_a_table(tmp_path: Path) -> None:
    resources = cohort(4)
    resources[2]["valueQuantity"]["value"] = 400  # heart rate of the first admission
    source = FhirSource(kind="fhir", path=write_export(tmp_path / "x", resources))
    (tmp_path / "m.yaml").write_text(json.dumps(mapping().model_dump(mode="json")))
    table = read_source(source, tmp_path / "m.yaml", STUDY.feature_schema)
    with pytest.raises(DataValidationError, match=r"outside the valid range \[20, 250\]"):
        apply_mapping(table.frame, table.mapping, STUDY.feature_schema)


def test_an_invalid_resource_refuses_the_export_naming_file_and_line(tmp_path: Path) -> None:
    folder = write_export(tmp_path, cohort(3))
    lines = (folder / "Observation.ndjson").read_text().splitlines()
    lines[4] = lines[4].replace('"status": "final"', '"status": null')
    lines.insert(2, "{not json")
    (folder / "Observation.ndjson").write_text("\n".join(lines) + "\n")
    extract = read_fhir(folder, mapping(), STUDY.feature_schema)
    assert len(extract.violations) == 1
    message = str(extract.violations[0])
    assert message.startswith(
        "Observation.ndjson: not a valid FHIR R4 Observation (first at line 3"
    )
    assert message.endswith("(2 lines)")
    with pytest.raises(DataValidationError):
        extract.checked(STUDY.feature_schema)


def test_a_resource_in_the_wrong_file_is_refused(tmp_path: Path) -> None:
    folder = write_export(tmp_path, cohort(3))
    with (folder / "Observation.ndjson").open("a") as handle:
        handle.write(json.dumps(patient("p99")) + "\n")
    extract = read_fhir(folder, mapping(), STUDY.feature_schema)
    assert "expects resource type" in str(extract.violations[0])


def test_the_window_and_pick_decide_which_value_a_row_takes(tmp_path: Path) -> None:
    codes = [(LOINC, HR)]
    resources = [
        patient("p0"),
        encounter("e0", "p0"),
        observation("a", "p0", "e0", codes, 90, "/min", "2026-03-01T10:00:00+00:00"),
        observation("b", "p0", "e0", codes, 80, "/min", "2026-03-01T09:00:00+00:00"),
        observation("c", "p0", "e0", codes, 120, "/min", "2026-03-01T13:30:00+00:00"),
        observation("d", "p0", "e0", codes, 60, "/min", "2026-03-01T07:00:00+00:00"),
    ]
    folder = write_export(tmp_path, resources)
    schema = STUDY.feature_schema
    taken = {}
    for pick in ("first", "last", "min", "max"):
        rule = {
            "codes": [f"{LOINC}|{HR}"],
            "units": {"/min": "bpm"},
            "window_h": [0, 6],
            "pick": pick,
        }
        features = {**mapping().model_dump(mode="json")["features"], "heart_rate": rule}
        extract = read_fhir(folder, mapping(features=features), schema)
        taken[pick] = extract.frame["heart_rate"].tolist()[0]
    # 13:30 is 5.5 h after admission, inside; 07:00 is before it, outside.
    assert taken == {"first": 80.0, "last": 120.0, "min": 80.0, "max": 120.0}
    assert "heart_rate: observation outside the window [0.0, 6.0] h: ignored (1 resource)" in [
        str(n) for n in extract.notices
    ]


def test_an_observation_without_an_encounter_joins_by_patient_and_time(tmp_path: Path) -> None:
    resources = [
        patient("p0"),
        encounter("e0", "p0", "2026-03-01T08:00:00+00:00"),
        encounter("e1", "p0", "2026-04-01T08:00:00+00:00"),
        observation("a", "p0", None, [(LOINC, HR)], 101, "/min", "2026-04-01T09:00:00+00:00"),
    ]
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    heart = extract.frame["heart_rate"].tolist()
    assert np.isnan(heart[0])
    assert heart[1] == 101.0


def test_only_index_encounters_are_rows(tmp_path: Path) -> None:
    resources = [*cohort(2), encounter("er", "p0", klass="EMER")]
    resources.append(observation("x", "p0", "er", [(LOINC, HR)], 99, "/min"))
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    assert len(extract.frame) == 2
    assert "Observation: of an encounter that is not an index event: ignored (1 resource)" in [
        str(n) for n in extract.notices
    ]


def test_a_condition_outside_the_horizon_is_not_the_label(tmp_path: Path) -> None:
    resources = [
        patient("p0"),
        encounter("e0", "p0"),
        condition("c0", "p0", "e0", "2026-03-03T09:00:00+00:00"),  # 49 h after admission
        patient("p1"),
        encounter("e1", "p1"),
        condition("c1", "p1", "e1", "2026-03-03T07:00:00+00:00"),  # 47 h
    ]
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    assert extract.frame["y"].tolist() == [0, 1]


def test_an_encounter_outcome_not_listed_is_refused(tmp_path: Path) -> None:
    resources = cohort(3)
    dispositions = ["home", "exp", "hosp"]
    encounters = [r for r in resources if r["resourceType"] == "Encounter"]
    for resource, code in zip(encounters, dispositions, strict=True):
        resource["hospitalization"] = {"dischargeDisposition": {"coding": [{"code": code}]}}
    label = {"encounter_outcome": {"values": {"home": 0, "exp": 1}}}
    extract = read_fhir(
        write_export(tmp_path, resources), mapping(label=label), STUDY.feature_schema
    )
    assert extract.frame["y"].tolist() == ["home", "exp", "hosp"]
    with pytest.raises(
        DataValidationError, match=r"column 'y': not listed in values \['exp', 'home'\]: 'hosp'"
    ):
        apply_mapping(extract.frame, extract.mapping, STUDY.feature_schema)


def test_a_mapping_that_does_not_fit_the_schema_is_refused_before_reading(tmp_path: Path) -> None:
    features = mapping().model_dump(mode="json")["features"]
    del features["temperature"]
    with pytest.raises(MappingError, match=r"no mapping for feature\(s\): temperature"):
        read_fhir(tmp_path / "absent", mapping(features=features), STUDY.feature_schema)
    features = mapping().model_dump(mode="json")["features"]
    features["heart_rate"]["units"] = ["mg/dL"]
    with pytest.raises(MappingError, match="feature 'heart_rate', unit mg/dL"):
        read_fhir(tmp_path / "absent", mapping(features=features), STUDY.feature_schema)
    features = mapping().model_dump(mode="json")["features"]
    features["age"] = {"patient": "maritalStatus"}
    with pytest.raises(MappingError, match="patient fields"):
        read_fhir(tmp_path / "absent", mapping(features=features), STUDY.feature_schema)


def test_one_code_for_two_features_is_a_mapping_error() -> None:
    features = mapping().model_dump(mode="json")["features"]
    features["temperature"]["codes"] = [f"{LOINC}|{HR}"]
    with pytest.raises(ValueError, match="maps to both"):
        mapping(features=features)


def test_the_manifest_names_the_files_and_a_missing_one_is_refused(tmp_path: Path) -> None:
    folder = write_export(tmp_path, cohort(2))
    assert export_files(folder)["Observation"] == [folder / "Observation.ndjson"]
    (folder / "Observation.ndjson").rename(folder / "obs-1.ndjson")
    with pytest.raises(FhirExportError, match=r"lists .*Observation.ndjson, but .* does not exist"):
        export_files(folder)
    bare = write_export(tmp_path / "bare", cohort(2), manifest=False)
    assert export_files(bare)["Condition"] == [bare / "Condition.ndjson"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FhirExportError, match="needs Patient and Encounter"):
        export_files(tmp_path / "empty")
    with pytest.raises(FhirExportError, match="no such folder"):
        export_files(tmp_path / "absent")


def _peak_bytes(folder: Path, study: Study) -> int:
    tracemalloc.start()
    try:
        read_fhir(folder, mapping(), study.feature_schema)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_observations_are_streamed_not_loaded(tmp_path: Path) -> None:
    """Ten times the observations for the same admissions: the file is ten times larger,
    the reader's peak memory is not (it holds one value per row and feature)."""

    def export(folder: Path, repeats: int) -> Path:
        resources = cohort(20)
        extra = [
            observation(
                f"r{i}-{k}",
                f"p{i}",
                f"e{i}",
                [(LOINC, HR)],
                75,
                "/min",
                "2026-03-01T10:00:00+00:00",
            )
            for k in range(repeats)
            for i in range(20)
        ]
        return write_export(folder, resources + extra)

    small, large = export(tmp_path / "s", 10), export(tmp_path / "l", 100)
    size = (large / "Observation.ndjson").stat().st_size / (
        small / "Observation.ndjson"
    ).stat().st_size
    assert size > 7
    # Once before measuring: modules the reader imports on first use would count.
    _peak_bytes(large, STUDY)
    ratio = _peak_bytes(large, STUDY) / _peak_bytes(small, STUDY)
    assert ratio < 1.5, f"peak memory grew {ratio:.2f}x for a {size:.1f}x larger file"


def test_a_value_inside_a_panel_component_is_read(tmp_path: Path) -> None:
    panel = observation("bp", "p0", "e0", [(LOINC, "85354-9")], 0, "mm[Hg]")
    del panel["valueQuantity"]
    panel["component"] = [
        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 70}},
        {
            "code": {"coding": [{"system": LOINC, "code": HR}]},
            "valueQuantity": {"value": 77, "unit": "/min", "system": UCUM, "code": "/min"},
        },
    ]
    resources = [patient("p0"), encounter("e0", "p0"), panel]
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    assert extract.frame["heart_rate"].tolist() == [77.0]
    assert extract.notices == ()


def test_broken_references_and_repeated_ids_are_refused(tmp_path: Path) -> None:
    resources = [
        *cohort(2),
        patient("p0"),  # a second Patient p0
        encounter("e9", "nobody"),  # an encounter of a patient not in the export
        # one Observation whose codings name two features
        observation("x", "p1", "e1", [(LOINC, HR), (LOINC, TEMP)], 80, "/min"),
    ]
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    assert sorted(str(v) for v in extract.violations) == [
        "Encounter: its subject is not a Patient in the export (1 resource)",
        f"Observation: codes ['{LOINC}|{HR}', '{LOINC}|{TEMP}'] map to "
        "['heart_rate', 'temperature'] (1 resource)",
        "Patient: id 'p0' appears more than once (1 resource)",
    ]


def test_what_is_left_out_is_counted(tmp_path: Path) -> None:
    resources = cohort(2)
    wrong = observation("w", "p0", "e0", [(LOINC, HR)], 300, "/min")
    wrong["status"] = "entered-in-error"
    undated = observation("u", "p0", "e0", [(LOINC, HR)], 300, "/min")
    del undated["effectiveDateTime"]
    extract = read_fhir(
        write_export(tmp_path, [*resources, wrong, undated]), mapping(), STUDY.feature_schema
    )
    notices = {str(n) for n in extract.notices}
    assert "Observation: status entered-in-error: ignored (1 resource)" in notices
    assert "heart_rate: observation without an effective time: ignored (1 resource)" in notices
    assert extract.frame["heart_rate"].tolist() == [70.0, 71.0]


def test_an_attribute_inside_a_complex_extension_is_read(tmp_path: Path) -> None:
    person = patient("p0")
    person["extension"] = [
        {
            "url": "https://h.example.org/race",
            "extension": [{"url": ETHNICITY_URL, "valueCoding": {"code": "B"}}],
        }
    ]
    resources = [person, encounter("e0", "p0")]
    extract = read_fhir(write_export(tmp_path, resources), mapping(), STUDY.feature_schema)
    assert extract.frame["ethnicity"].tolist() == ["B"]


def test_an_age_is_converted_to_the_schema_unit(tmp_path: Path) -> None:
    months = parse_study(
        STUDY_TEXT.replace("unit: years, range: [16, 110]", "unit: months, range: [0, 1400]")
    )
    assert "months" in months.canonical()["schema"]["features"][0]["unit"]
    extract = read_fhir(write_export(tmp_path, cohort(2)), mapping(), months.feature_schema)
    assert extract.frame["age"].tolist() == [65.0 * 12, 65.0 * 12]


def test_a_text_value_for_a_measured_number_is_refused(tmp_path: Path) -> None:
    resources = cohort(3)
    heart = next(r for r in resources if r["id"] == "hr1")
    del heart["valueQuantity"]
    heart["valueString"] = "tachycardic"
    features = mapping().model_dump(mode="json")["features"]
    features["heart_rate"]["pick"] = "max"
    extract = read_fhir(
        write_export(tmp_path, resources), mapping(features=features), STUDY.feature_schema
    )
    assert [str(v) for v in extract.violations] == [
        "heart_rate: a text or coded value, and the mapping lists no values (1 resource)"
    ]


def test_a_label_observation_is_timed_by_its_effective_period(tmp_path: Path) -> None:
    event = observation("ev", "p0", "e0", [("https://x.org/outcome", "icu")], 1, "1")
    del event["effectiveDateTime"]
    event["effectivePeriod"] = {"start": "2026-03-02T10:00:00+00:00"}
    label = {"observation": {"codes": ["https://x.org/outcome|icu"], "window_h": [0, 48]}}
    resources = [*cohort(2), event]
    extract = read_fhir(
        write_export(tmp_path, resources), mapping(label=label), STUDY.feature_schema
    )
    assert extract.frame["y"].tolist() == [1, 0]
