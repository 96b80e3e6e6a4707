"""Extract mappings: which codes, units and time windows make each schema field.

One model serves both standards. For FHIR a code is ``system|code`` (the FHIR
search token, e.g. ``http://loinc.org|8867-4``) and a unit is a UCUM code; for
OMOP a code is a concept id and a unit is a unit concept id. Every value is
taken relative to an *index event*, the start of an encounter (FHIR) or visit
(OMOP), and every row of the extracted table is one index event.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator

from fedcare.schema.features import Strict
from fedcare.schema.mapping import Code, MappingError, key_text
from fedcare.yamlfile import read_yaml_model

UCUM = "http://unitsofmeasure.org"

# UCUM codes whose fedcare spelling differs; any other UCUM code (mg/dL, mmol/L, %,
# /min) is read by pint as written. Only UCUM codes are translated: they say what
# they mean. An OMOP unit concept id does not, so an OMOP mapping names each unit.
_UCUM_TO_FEDCARE: dict[str, str] = {
    "Cel": "degC",
    "[degF]": "degF",
    "mm[Hg]": "mmHg",
    "10*9/L": "10^9/L",
    "10*3/uL": "10^3/uL",
    "a": "years",
    "mo": "months",
    "wk": "weeks",
    "d": "days",
    "h": "hours",
    "kg": "kg",
    "[lb_av]": "lb",
    "[in_i]": "inch",
}


def ucum_unit(code: str) -> str:
    """The fedcare unit for a UCUM code."""
    return _UCUM_TO_FEDCARE.get(code, code)


class Pick(StrEnum):
    """Which of several values in the window a row takes."""

    FIRST = "first"
    LAST = "last"
    MIN = "min"
    MAX = "max"


def _codes_as_text(value: object) -> object:
    # YAML reads an OMOP concept id as an integer; codes are compared as text.
    if isinstance(value, list):
        return [key_text(v) for v in value]
    return value


def _keys_as_text(value: object) -> object:
    if isinstance(value, dict):
        return {key_text(k): v for k, v in value.items()}
    return value


Codes = Annotated[list[str], BeforeValidator(_codes_as_text)]
"""Codes compared as text: ``system|code`` tokens, or OMOP concept ids written as numbers."""

Recoding = Annotated[dict[str, Code], BeforeValidator(_keys_as_text)]
"""Local values (as text) to schema values."""


class Window(Strict):
    """Hours relative to the index event's start, both ends included."""

    window_h: tuple[float, float] = Field(
        description="[from, to] hours after the index event's start, e.g. [0, 6]."
    )

    @field_validator("window_h")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError("window_h is [from, to] with from <= to, in hours")
        return value

    def contains(self, hours: float) -> bool:
        return self.window_h[0] <= hours <= self.window_h[1]


class Measured(Window):
    """A feature measured as an Observation (FHIR) or a measurement row (OMOP)."""

    codes: Codes = Field(
        min_length=1,
        description="FHIR: system|code (LOINC and local systems alike); OMOP: concept ids.",
    )
    units: dict[str, str] | None = Field(
        default=None,
        description="Accepted units: FHIR UCUM codes (a list, or code: fedcare unit); OMOP "
        "unit concept id: fedcare unit. Any other unit is refused.",
    )
    pick: Pick = Field(default=Pick.FIRST, description="first, last, min or max in the window.")
    values: Recoding | None = Field(
        default=None, description="Recode coded values (a FHIR code, an OMOP value concept)."
    )
    table: str = Field(
        default="measurement",
        pattern="^(measurement|observation)$",
        description="OMOP only: the table the concept is recorded in.",
    )

    @field_validator("units", mode="before")
    @classmethod
    def _unit_table(cls, value: object) -> object:
        if isinstance(value, list):
            return {key_text(code): ucum_unit(str(code)) for code in value}
        return _keys_as_text(value)


class Demographic(Strict):
    """A field of the patient (FHIR Patient, OMOP person), at the index event."""

    patient: str = Field(
        min_length=1,
        description="FHIR: age, gender or extension; OMOP: age or a person column "
        "(gender_concept_id, race_source_value, ...).",
    )
    url: str | None = Field(default=None, description="FHIR extension: its url.")
    values: Recoding | None = Field(
        default=None, description="Recode local values, e.g. {male: 0, female: 1}."
    )

    @model_validator(mode="after")
    def _extension_url(self) -> Self:
        if (self.patient == "extension") != (self.url is not None):
            raise ValueError("url names the extension: give it with patient: extension only")
        return self


class Coded(Window):
    """Any record of one of ``codes`` within the window makes the label 1."""

    codes: Codes = Field(min_length=1, description="Any of these codes (system|code, or ids).")


class Outcome(Strict):
    """The index encounter's outcome: FHIR hospitalization.dischargeDisposition, OMOP
    visit_occurrence.discharged_to_concept_id; every code must be listed."""

    values: Recoding = Field(min_length=1, description="Outcome code: 0 or 1.")


class LabelRule(Strict):
    """Exactly one of: a Condition, an Observation (measurement) or the encounter's outcome."""

    condition: Coded | None = Field(
        default=None,
        description="1 if a Condition (condition_occurrence) of these codes "
        "starts within the window.",
    )
    observation: Coded | None = Field(
        default=None,
        description="1 if an Observation (measurement) of these codes falls within the window.",
    )
    encounter_outcome: Outcome | None = Field(
        default=None, description="The encounter's discharge disposition, recoded to 0/1."
    )

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [x for x in (self.condition, self.observation, self.encounter_outcome) if x]
        if len(given) != 1:
            raise ValueError("give exactly one of condition, observation, encounter_outcome")
        return self


class Index(Strict):
    """Which encounters (visits) are index events; each one is a row."""

    classes: Codes = Field(
        default_factory=list,
        description="FHIR Encounter.class codes (e.g. IMP) or OMOP visit_concept_ids; "
        "empty: every encounter.",
    )


class ExtractMapping(Strict):
    """A site's mapping from a FHIR export or an OMOP database to a study schema."""

    site: str = Field(min_length=1)
    index: Index = Field(default_factory=Index)
    features: dict[str, Measured | Demographic] = Field(
        description="Per schema feature: a patient field, or the codes, units and window "
        "of its measurements."
    )
    label: LabelRule
    attributes: dict[str, Measured | Demographic] = Field(
        default_factory=dict, description="Per schema attribute (for subgroups only)."
    )

    @model_validator(mode="after")
    def _codes_once(self) -> Self:
        owner: dict[str, str] = {}
        for name, rule in [*self.features.items(), *self.attributes.items()]:
            if isinstance(rule, Measured):
                for code in rule.codes:
                    if code in owner:
                        raise ValueError(f"code {code} maps to both '{owner[code]}' and '{name}'")
                    owner[code] = name
        return self

    def measured(self) -> dict[str, Measured]:
        """Every feature and attribute read from measurements, by schema name."""
        return {
            name: rule
            for name, rule in [*self.features.items(), *self.attributes.items()]
            if isinstance(rule, Measured)
        }

    def demographic(self) -> dict[str, Demographic]:
        """Every feature and attribute read from the patient, by schema name."""
        return {
            name: rule
            for name, rule in [*self.features.items(), *self.attributes.items()]
            if isinstance(rule, Demographic)
        }


def load_extract_mapping(path: Path) -> ExtractMapping:
    """Read a FHIR or OMOP mapping from YAML."""
    return read_yaml_model(path, ExtractMapping, "mapping", MappingError)
