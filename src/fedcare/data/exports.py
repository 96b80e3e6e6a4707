"""The demo hospitals written the way hospital systems hold them: a FHIR R4 bulk export
(NDJSON) or an OMOP CDM 5.4 database, each with the mapping its data scientist would write.

Each row of a hospital's table becomes one patient with one inpatient encounter (a
visit in OMOP); its vitals and labs become Observations (measurements) a few minutes
after admission, in the hospital's own units; a deterioration becomes a Condition
(a condition_occurrence) within 48 hours. ``ashby-general`` codes its labs with its
own code system first and LOINC second, and ``northgate`` sends systolic pressure
inside a blood-pressure panel, as real exports do. Every patient also has a body
weight that the study does not use, so a data check has unmapped codes to report.
Read back through the mapping, each export gives exactly the table's values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from fedcare.data._profiles import ETHNICITIES, FEATURES, PROFILES, SiteProfile
from fedcare.data.synthetic import HospitalCohort
from fedcare.sources.mapping import UCUM
from fedcare.sources.omop import cdm_tables

LOINC = "http://loinc.org"
OUTCOME_SYSTEM = "https://fedcare.dev/fhir/CodeSystem/outcome"
OUTCOME_CODE = "deterioration-48h"
OUTCOME_CONCEPT = 2_000_000_001  # OMOP reserves ids from 2 billion for a site's own concepts
WEIGHT_LOINC = "29463-7"
WEIGHT_CONCEPT = 3_025_315
BP_PANEL = "85354-9"
DIASTOLIC = "8462-4"
LOCAL_LAB_SITE = "ashby-general"
PANEL_SITE = "northgate"
_START = datetime(2026, 1, 5, tzinfo=UTC)

_MEASURED = tuple(name for name in FEATURES if name not in ("age", "sex_female"))
_LABS = ("wbc", "creatinine", "lactate", "glucose")

# LOINC per feature, by the kind of quantity a unit measures (mass or moles per volume).
_LOINC: dict[str, dict[str, str]] = {
    "heart_rate": {"": "8867-4"},
    "resp_rate": {"": "9279-1"},
    "sbp": {"": "8480-6"},
    "temperature": {"": "8310-5"},
    "spo2": {"": "59408-5"},
    "wbc": {"": "6690-2"},
    "creatinine": {"mol": "14682-9", "mass": "2160-0"},
    "lactate": {"mol": "2524-7", "mass": "14118-4"},
    "glucose": {"mol": "14749-6", "mass": "2345-7"},
}
# The OMOP standard measurement concept per feature.
_CONCEPT: dict[str, int] = {
    "heart_rate": 3_027_018,
    "resp_rate": 3_024_171,
    "sbp": 3_004_249,
    "temperature": 3_020_891,
    "spo2": 3_016_502,
    "wbc": 3_000_905,
    "creatinine": 3_016_723,
    "lactate": 3_047_181,
    "glucose": 3_004_501,
}
# fedcare unit -> (UCUM code, OMOP unit concept id).
_UNITS: dict[str, tuple[str, int]] = {
    "bpm": ("/min", 8541),
    "/min": ("/min", 8541),
    "mmHg": ("mm[Hg]", 8876),
    "degC": ("Cel", 586_323),
    "degF": ("[degF]", 9289),
    "%": ("%", 8554),
    "10^9/L": ("10*9/L", 9444),
    "umol/L": ("umol/L", 8749),
    "mmol/L": ("mmol/L", 8753),
    "mg/dL": ("mg/dL", 8840),
}
_KG = ("kg", 9529)
_INPATIENT = ("IMP", 9201)
_GENDER_CONCEPT = {"male": 8507, "female": 8532}


def _kind(unit: str) -> str:
    return "mass" if unit == "mg/dL" else "mol" if unit.endswith("mol/L") else ""


def _local_code(name: str) -> str:
    return f"https://{LOCAL_LAB_SITE}.example.org/lab|{name.upper()}"


@dataclass(frozen=True)
class _Admission:
    """One row of a hospital's table as the facts an export records."""

    index: int
    start: datetime
    born: date
    female: bool
    ethnicity: str
    deteriorated: bool
    values: dict[str, float]  # measured features present, in the hospital's units


def _admissions(cohort: HospitalCohort, profile: SiteProfile) -> Iterator[_Admission]:
    cols = profile.columns
    female_code = str(profile.sex_codes[1])
    event_code = str(profile.label_codes[1])
    for i, row in enumerate(cohort.frame.itertuples(index=False)):
        record = dict(zip(cohort.frame.columns, row, strict=True))
        # Admissions two minutes apart within one year, so no birthday is a 29 February.
        start = _START + timedelta(minutes=2 * (i % 200_000))
        age = int(record[cols["age"]])
        # Born a few days to ten months before the birthday that makes the age exact.
        born = date(start.year - age, start.month, start.day) - timedelta(days=(i * 37) % 300)
        values = {
            name: float(record[cols[name]])
            for name in _MEASURED
            if not math.isnan(float(record[cols[name]]))
        }
        yield _Admission(
            index=i,
            start=start,
            born=born,
            female=str(record[cols["sex_female"]]) == female_code,
            ethnicity=str(record[cols["ethnicity"]]),
            deteriorated=str(record[cols["label"]]) == event_code,
            values=values,
        )


def _taken(adm: _Admission, position: int) -> datetime:
    return adm.start + timedelta(minutes=10 + 7 * position)


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value


def _ethnicity_url(site: str) -> str:
    return f"https://{site}.example.org/fhir/StructureDefinition/ethnicity"


def _fhir_resources(cohort: HospitalCohort, profile: SiteProfile) -> Iterator[dict[str, Any]]:
    site = profile.name
    for adm in _admissions(cohort, profile):
        pid, eid = f"p{adm.index}", f"e{adm.index}"
        yield {
            "resourceType": "Patient",
            "id": pid,
            "gender": "female" if adm.female else "male",
            "birthDate": adm.born.isoformat(),
            "extension": [{"url": _ethnicity_url(site), "valueString": adm.ethnicity}],
        }
        yield {
            "resourceType": "Encounter",
            "id": eid,
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": _INPATIENT[0],
            },
            "subject": {"reference": f"Patient/{pid}"},
            "period": {"start": adm.start.isoformat()},
        }
        links = {
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/{eid}"},
        }
        for position, name in enumerate(_MEASURED):
            if name not in adm.values:
                continue
            unit = profile.unit(name)
            ucum = _UNITS[unit][0]
            quantity = {
                "value": _number(adm.values[name]),
                "unit": ucum,
                "system": UCUM,
                "code": ucum,
            }
            loinc = {"system": LOINC, "code": _LOINC[name].get(_kind(unit), _LOINC[name].get(""))}
            codings = [loinc]
            if site == LOCAL_LAB_SITE and name in _LABS:
                system, code = _local_code(name).split("|")
                codings = [{"system": system, "code": code}, loinc]
            observation: dict[str, Any] = {
                "resourceType": "Observation",
                "id": f"o{adm.index}-{name.replace('_', '-')}",
                "status": "final",
                "code": {"coding": codings},
                **links,
                "effectiveDateTime": _taken(adm, position).isoformat(),
            }
            if site == PANEL_SITE and name == "sbp":
                observation["code"] = {"coding": [{"system": LOINC, "code": BP_PANEL}]}
                observation["component"] = [
                    {"code": {"coding": codings}, "valueQuantity": quantity},
                    {
                        "code": {"coding": [{"system": LOINC, "code": DIASTOLIC}]},
                        "valueQuantity": {**quantity, "value": 70},
                    },
                ]
            else:
                observation["valueQuantity"] = quantity
            yield observation
        yield {
            "resourceType": "Observation",
            "id": f"o{adm.index}-weight",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": WEIGHT_LOINC}]},
            **links,
            "effectiveDateTime": _taken(adm, len(_MEASURED)).isoformat(),
            "valueQuantity": {
                "value": 70 + adm.index % 30,
                "unit": "kg",
                "system": UCUM,
                "code": "kg",
            },
        }
        if adm.deteriorated:
            yield {
                "resourceType": "Condition",
                "id": f"c{adm.index}",
                "code": {"coding": [{"system": OUTCOME_SYSTEM, "code": OUTCOME_CODE}]},
                **links,
                "onsetDateTime": (adm.start + timedelta(hours=1 + adm.index % 47)).isoformat(),
            }


def profile_of(cohort: HospitalCohort) -> SiteProfile:
    """The profile a built-in cohort was generated from."""
    for profile in PROFILES:
        if profile.name == cohort.name:
            return profile
    raise ValueError(f"'{cohort.name}' is not a built-in hospital")


def write_fhir_export(cohort: HospitalCohort, folder: Path) -> Path:
    """Write one hospital as a Bulk Data export folder (manifest.json and one NDJSON file per
    resource type); return the folder."""
    profile = profile_of(cohort)
    folder.mkdir(parents=True, exist_ok=True)
    handles = {
        kind: (folder / f"{kind}.ndjson").open("w", encoding="utf-8")
        for kind in ("Patient", "Encounter", "Observation", "Condition")
    }
    try:
        for resource in _fhir_resources(cohort, profile):
            handles[resource["resourceType"]].write(
                json.dumps(resource, separators=(",", ":")) + "\n"
            )
    finally:
        for handle in handles.values():
            handle.close()
    manifest = {
        "transactionTime": _START.isoformat(),
        "request": f"https://{profile.name}.example.org/fhir/$export",
        "requiresAccessToken": True,
        "output": [
            {"type": kind, "url": f"https://{profile.name}.example.org/bulk/{kind}.ndjson"}
            for kind in handles
        ],
        "error": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder


def _ethnicity_values(profile: SiteProfile) -> dict[str, str]:
    return {
        str(code): target for code, target in zip(profile.ethnicity_codes, ETHNICITIES, strict=True)
    }


def fhir_mapping(cohort: HospitalCohort) -> dict[str, Any]:
    """The FHIR mapping this hospital's data scientist would write for the demo study."""
    profile = profile_of(cohort)
    features: dict[str, Any] = {
        "age": {"patient": "age"},
        "sex_female": {"patient": "gender", "values": {"male": 0, "female": 1}},
    }
    for name in _MEASURED:
        unit = profile.unit(name)
        codes = [f"{LOINC}|{code}" for code in dict.fromkeys(_LOINC[name].values())]
        if profile.name == LOCAL_LAB_SITE and name in _LABS:
            codes.insert(0, _local_code(name))
        features[name] = {
            "codes": codes,
            "units": {_UNITS[unit][0]: unit},
            "window_h": [0, 6],
            "pick": "first",
        }
    return {
        "site": profile.name,
        "index": {"classes": [_INPATIENT[0]]},
        "features": features,
        "label": {
            "condition": {"codes": [f"{OUTCOME_SYSTEM}|{OUTCOME_CODE}"], "window_h": [0, 48]}
        },
        "attributes": {
            "ethnicity": {
                "patient": "extension",
                "url": _ethnicity_url(profile.name),
                "values": _ethnicity_values(profile),
            }
        },
    }


_EHR = 32817  # type concept: the record came from an EHR
_BATCH = 20_000


def write_omop_database(cohort: HospitalCohort, url: str, schema_name: str | None = None) -> None:
    """Write one hospital into an empty OMOP CDM 5.4 database at ``url`` (SQLite or
    PostgreSQL), in batches, with indexes on the columns the extraction joins on."""
    profile = profile_of(cohort)
    engine = sa.create_engine(url)
    tables = cdm_tables(schema_name)
    metadata = tables["person"].metadata
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in tables}

    def flush(conn: sa.Connection, force: bool = False) -> None:
        for name, batch in rows.items():
            if batch and (force or len(batch) >= _BATCH):
                conn.execute(tables[name].insert(), batch)
                batch.clear()

    measurement_id = 0
    with engine.begin() as conn:
        metadata.create_all(conn)
        for adm in _admissions(cohort, profile):
            pid = vid = adm.index + 1
            naive = adm.start.replace(tzinfo=None)
            gender = "female" if adm.female else "male"
            rows["person"].append(
                {
                    "person_id": pid,
                    "gender_concept_id": _GENDER_CONCEPT[gender],
                    "year_of_birth": adm.born.year,
                    "month_of_birth": adm.born.month,
                    "day_of_birth": adm.born.day,
                    "birth_datetime": datetime(adm.born.year, adm.born.month, adm.born.day),
                    "race_concept_id": 0,
                    "ethnicity_concept_id": 0,
                    "gender_source_value": gender,
                    "race_source_value": adm.ethnicity,
                    "ethnicity_source_value": None,
                }
            )
            rows["visit_occurrence"].append(
                {
                    "visit_occurrence_id": vid,
                    "person_id": pid,
                    "visit_concept_id": _INPATIENT[1],
                    "visit_start_date": naive.date(),
                    "visit_start_datetime": naive,
                    "visit_end_date": naive.date(),
                    "visit_type_concept_id": _EHR,
                    "discharged_to_concept_id": None,
                }
            )
            measured = [
                (position, name, _CONCEPT[name], adm.values[name], _UNITS[profile.unit(name)][1])
                for position, name in enumerate(_MEASURED)
                if name in adm.values
            ]
            weight = (len(_MEASURED), "weight", WEIGHT_CONCEPT, 70.0 + adm.index % 30, _KG[1])
            for position, _name, concept, value, unit in [*measured, weight]:
                measurement_id += 1
                taken = _taken(adm, position).replace(tzinfo=None)
                rows["measurement"].append(
                    {
                        "measurement_id": measurement_id,
                        "person_id": pid,
                        "measurement_concept_id": concept,
                        "measurement_date": taken.date(),
                        "measurement_datetime": taken,
                        "measurement_type_concept_id": _EHR,
                        "value_as_number": value,
                        "value_as_concept_id": None,
                        "unit_concept_id": unit,
                        "visit_occurrence_id": vid,
                    }
                )
            if adm.deteriorated:
                onset = naive + timedelta(hours=1 + adm.index % 47)
                rows["condition_occurrence"].append(
                    {
                        "condition_occurrence_id": adm.index + 1,
                        "person_id": pid,
                        "condition_concept_id": OUTCOME_CONCEPT,
                        "condition_start_date": onset.date(),
                        "condition_start_datetime": onset,
                        "condition_type_concept_id": _EHR,
                        "visit_occurrence_id": vid,
                    }
                )
            flush(conn)
        flush(conn, force=True)
    engine.dispose()


def omop_mapping(cohort: HospitalCohort) -> dict[str, Any]:
    """The OMOP mapping this hospital's data scientist would write for the demo study."""
    profile = profile_of(cohort)
    features: dict[str, Any] = {
        "age": {"patient": "age"},
        "sex_female": {
            "patient": "gender_concept_id",
            "values": {_GENDER_CONCEPT["male"]: 0, _GENDER_CONCEPT["female"]: 1},
        },
    }
    for name in _MEASURED:
        unit = profile.unit(name)
        features[name] = {
            "codes": [_CONCEPT[name]],
            "units": {_UNITS[unit][1]: unit},
            "window_h": [0, 6],
            "pick": "first",
        }
    return {
        "site": profile.name,
        "index": {"classes": [_INPATIENT[1]]},
        "features": features,
        "label": {"condition": {"codes": [OUTCOME_CONCEPT], "window_h": [0, 48]}},
        "attributes": {
            "ethnicity": {"patient": "race_source_value", "values": _ethnicity_values(profile)}
        },
    }


def write_exports(
    cohorts: list[HospitalCohort],
    kind: str,
    folder: Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write every hospital as a FHIR export folder or an OMOP SQLite database under
    ``folder``, each with its mapping, and a sites.yaml naming them all; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for done, cohort in enumerate(cohorts):
        if progress is not None:
            progress(f"writing {kind}", done, len(cohorts))
        mapping_file = f"{cohort.name}.mapping.yaml"
        if kind == "fhir":
            write_fhir_export(cohort, folder / cohort.name)
            mapping = fhir_mapping(cohort)
            source: dict[str, str] = {"kind": "fhir", "path": cohort.name}
        else:
            database = folder / f"{cohort.name}.omop.sqlite"
            database.unlink(missing_ok=True)
            write_omop_database(cohort, f"sqlite:///{database}")
            mapping = omop_mapping(cohort)
            source = {"kind": "omop", "url": f"sqlite:///{database.name}"}
        (folder / mapping_file).write_text(
            yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8"
        )
        entries.append(
            {
                "name": cohort.name,
                "source": source,
                "mapping": mapping_file,
                "description": cohort.description,
            }
        )
    if progress is not None:
        progress(f"writing {kind}", len(cohorts), len(cohorts))
    sites = folder / "sites.yaml"
    sites.write_text(yaml.safe_dump({"sites": entries}, sort_keys=False), encoding="utf-8")
    return sites
