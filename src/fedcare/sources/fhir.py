"""FHIR R4 Bulk Data exports (NDJSON) into one row per index encounter.

A ``$export`` output folder holds ``manifest.json`` and one or more NDJSON files
per resource type. Every line is validated as its FHIR R4 resource by
``fhir.resources``; a line that is not valid is refused with its file and line.
Patients and Encounters are read first (a few per admission); Observations and
Conditions are then streamed line by line, keeping only the value each row takes
so far, so an export larger than memory is read in memory proportional to its
encounters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from fedcare.schema.features import FeatureSchema
from fedcare.schema.mapping import MappingError, check_mapping
from fedcare.schema.readers import DataFileError
from fedcare.sources.extract import (
    AGE_UNIT,
    NO_UNIT,
    Extract,
    Linear,
    Tally,
    better,
    check_picks,
    completed_years,
    conversions,
    identity_mapping,
    to_schema,
)
from fedcare.sources.mapping import UCUM, Demographic, ExtractMapping, Measured, Pick

if TYPE_CHECKING:
    from fhir.resources.R4B.codeableconcept import CodeableConcept
    from fhir.resources.R4B.condition import Condition
    from fhir.resources.R4B.encounter import Encounter
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient

MANIFEST = "manifest.json"
RESOURCE_TYPES = ("Patient", "Encounter", "Observation", "Condition")
_IGNORED_STATUS = {"entered-in-error", "cancelled"}
_SHOWN_CODES = 3


class FhirExportError(DataFileError):
    """A folder that is not a readable FHIR bulk export."""


def export_files(folder: Path) -> dict[str, list[Path]]:
    """The export's NDJSON files by resource type: from its manifest's ``output`` (each
    url's file name, in this folder), or without one from the file names (``Patient.ndjson``,
    ``Observation.2.ndjson``), as the Bulk Data specification names them."""
    if not folder.is_dir():
        raise FhirExportError(f"{folder}: no such folder (a FHIR export is a folder)")
    files: dict[str, list[Path]] = {kind: [] for kind in RESOURCE_TYPES}
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            outputs = json.loads(manifest.read_text(encoding="utf-8"))["output"]
            listed = [(str(o["type"]), str(o["url"])) for o in outputs]
        except (ValueError, KeyError, TypeError) as exc:
            raise FhirExportError(
                f"{manifest}: not a Bulk Data manifest (needs output: [{{type, url}}]): {exc}"
            ) from exc
        for kind, url in listed:
            path = folder / url.rstrip("/").rsplit("/", 1)[-1]
            if not path.is_file():
                raise FhirExportError(f"{manifest}: lists {url}, but {path} does not exist")
            if kind in files:
                files[kind].append(path)
    else:
        for path in sorted(folder.glob("*.ndjson")):
            kind = path.name.split(".", 1)[0]
            if kind in files:
                files[kind].append(path)
    if not files["Patient"] or not files["Encounter"]:
        raise FhirExportError(
            f"{folder}: a FHIR export needs Patient and Encounter NDJSON files "
            f"(found {', '.join(p.name for ps in files.values() for p in ps) or 'none'})"
        )
    return files


def _model(kind: str) -> Any:
    # Loaded on first use: the FHIR models take a third of a second to import.
    if kind == "Patient":
        from fhir.resources.R4B.patient import Patient

        return Patient
    if kind == "Encounter":
        from fhir.resources.R4B.encounter import Encounter

        return Encounter
    if kind == "Observation":
        from fhir.resources.R4B.observation import Observation

        return Observation
    from fhir.resources.R4B.condition import Condition

    return Condition


def _resources(path: Path, kind: str, tally: Tally) -> Iterator[Any]:
    """Each valid resource in an NDJSON file; every invalid line is counted, and the first
    one's line and reason reported."""
    model = _model(kind)
    first: str | None = None
    bad = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield model.model_validate_json(line)
            except ValidationError as exc:
                bad += 1
                if first is None:
                    error = exc.errors()[0]
                    where = ".".join(str(part) for part in error["loc"]) or "(resource)"
                    reason = str(error["msg"]).split("\n", 1)[0].strip()
                    first = f"line {number}: {where}: {reason}"[:200]
    if bad:
        tally.refuse(path.name, f"not a valid FHIR R4 {kind} (first at {first})", bad, "line")


def _reference_id(reference: str | None, kind: str) -> str | None:
    """The id in ``Kind/id`` (relative or absolute)."""
    if not reference:
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == kind:
        return parts[-1]
    return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _instant(value: object) -> datetime | None:
    """A precise time; a date alone (no time of day) cannot be placed in a window."""
    if isinstance(value, datetime):
        return _aware(value)
    return None


def _observed_at(resource: Observation) -> datetime | None:
    """When an Observation was made: effectiveDateTime, effectivePeriod.start or
    effectiveInstant."""
    period = resource.effectivePeriod
    return (
        _instant(resource.effectiveDateTime)
        or _instant(period.start if period else None)
        or _instant(resource.effectiveInstant)
    )


def _codings(concept: CodeableConcept | None) -> list[str]:
    if concept is None or not concept.coding:
        return []
    return [f"{c.system or ''}|{c.code}" for c in concept.coding if c.code]


@dataclass(frozen=True, slots=True)
class _Row:
    encounter: str
    patient: str
    start: datetime
    outcome: str | None


@dataclass(frozen=True, slots=True)
class _Person:
    """What a row needs of a Patient; the resource itself is not kept."""

    born: date | None
    gender: str | None
    extensions: dict[str, str]


class _Held:
    """For one field, the value each row holds so far and when it was taken (epoch s)."""

    def __init__(self, rows: int) -> None:
        self.times = np.full(rows, np.nan)
        self.values: list[float | str | None] = [None] * rows

    def offer(self, pick: Pick, row: int, time: float, value: float | str) -> None:
        held_time = float(self.times[row])
        held_value = self.values[row]
        held = None if held_value is None else (held_time, held_value)
        if better(pick, held, time, value):
            self.times[row] = time
            self.values[row] = value

    def column(self) -> list[object]:
        return [math.nan if v is None else v for v in self.values]


@dataclass
class _Reader:
    mapping: ExtractMapping
    schema: FeatureSchema
    linear: dict[str, dict[str, Linear]]
    tally: Tally = field(default_factory=Tally)
    patients: dict[str, _Person] = field(default_factory=dict)
    rows: list[_Row] = field(default_factory=list)
    by_encounter: dict[str, int] = field(default_factory=dict)
    other_encounters: set[str] = field(default_factory=set)
    by_patient: dict[str, list[int]] = field(default_factory=dict)
    held: dict[str, _Held] = field(default_factory=dict)
    labelled: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rules = self.mapping.measured()
        self.code_owner = {code: name for name, rule in self.rules.items() for code in rule.codes}
        label = self.mapping.label
        self.label_rule = label.condition or label.observation
        self.label_codes = set(self.label_rule.codes if self.label_rule else ())
        self.urls = {d.url for d in self.mapping.demographic().values() if d.url is not None}

    def patient(self, resource: Patient) -> None:
        if resource.id in self.patients:
            self.tally.refuse("Patient", f"id '{resource.id}' appears more than once")
        extensions: dict[str, str] = {}
        for extension in resource.extension or ():
            for candidate in [extension, *(extension.extension or ())]:
                if candidate.url in self.urls and candidate.url not in extensions:
                    found = _extension_value(candidate)
                    if found is not None:
                        extensions[candidate.url] = found
        self.patients[str(resource.id)] = _Person(resource.birthDate, resource.gender, extensions)

    def start_values(self) -> None:
        """After the encounters: room for one value per row and measured field."""
        self.held = {name: _Held(len(self.rows)) for name in self.rules}

    def encounter(self, resource: Encounter) -> None:
        eid = str(resource.id)
        if eid in self.by_encounter or eid in self.other_encounters:
            self.tally.refuse("Encounter", f"id '{eid}' appears more than once")
            return
        classes = self.mapping.index.classes
        code = resource.class_fhir.code if resource.class_fhir else None
        if classes and code not in classes:
            self.other_encounters.add(eid)
            return
        start = _instant(resource.period.start if resource.period else None)
        if start is None:
            self.other_encounters.add(eid)
            self.tally.note("Encounter", "no period.start with a time: not an index event")
            return
        pid = _reference_id(resource.subject.reference if resource.subject else None, "Patient")
        if pid is None or pid not in self.patients:
            self.tally.refuse("Encounter", "its subject is not a Patient in the export")
            return
        hospital = resource.hospitalization
        disposition = _codings(hospital.dischargeDisposition if hospital else None)
        outcome = disposition[0].split("|", 1)[1] if disposition else None
        self.by_encounter[eid] = len(self.rows)
        self.by_patient.setdefault(pid, []).append(len(self.rows))
        self.rows.append(_Row(eid, pid, start, outcome))

    def linked(self, resource: Observation | Condition, kind: str) -> list[int] | None:
        """The rows a resource may belong to: its encounter's, else its patient's."""
        ref = resource.encounter.reference if resource.encounter else None
        eid = _reference_id(ref, "Encounter")
        if eid is not None:
            if eid in self.by_encounter:
                return [self.by_encounter[eid]]
            self.tally.note(kind, "of an encounter that is not an index event: ignored")
            return None
        pid = _reference_id(resource.subject.reference if resource.subject else None, "Patient")
        rows = self.by_patient.get(pid or "")
        if not rows:
            self.tally.note(kind, "of no patient with an index encounter: ignored")
            return None
        return rows

    def hours(self, row: int, moment: datetime) -> float:
        return (moment - self.rows[row].start).total_seconds() / 3600.0

    def observation(self, resource: Observation) -> None:
        if resource.status in _IGNORED_STATUS:
            self.tally.note("Observation", f"status {resource.status}: ignored")
            return
        parts: list[tuple[list[str], Any]] = [(_codings(resource.code), resource)]
        parts += [(_codings(c.code), c) for c in resource.component or ()]
        matched = False
        for codes, holder in parts:
            if self.label_codes.intersection(codes) and self.mapping.label.observation:
                matched = True
                self.label_event(resource, _observed_at(resource), "Observation")
            owners = {self.code_owner[c] for c in codes if c in self.code_owner}
            if len(owners) > 1:
                self.tally.refuse("Observation", f"codes {codes} map to {sorted(owners)}")
                matched = True
            elif owners:
                matched = True
                self.take(owners.pop(), resource, holder)
        if not matched:
            shown = ", ".join(parts[0][0][:_SHOWN_CODES]) or "(no coding)"
            self.tally.note("Observation", f"code {shown} is not mapped: ignored")

    def take(self, name: str, resource: Observation, holder: Any) -> None:
        rule = self.rules[name]
        moment = _observed_at(resource)
        if moment is None:
            self.tally.note(name, "observation without an effective time: ignored")
            return
        value = self.value(name, rule, holder)
        if value is None:
            return
        if isinstance(value, str) and rule.values is None:
            # A text or coded value for a measured number: refused, never left out
            # quietly (min and max could not rank it against numbers).
            self.tally.refuse(name, "a text or coded value, and the mapping lists no values")
            return
        rows = self.linked(resource, "Observation")
        for row in rows or ():
            if not rule.contains(self.hours(row, moment)):
                self.tally.note(
                    name, f"observation outside the window {list(rule.window_h)} h: ignored"
                )
                continue
            self.held[name].offer(rule.pick, row, moment.timestamp(), value)

    def value(self, name: str, rule: Measured, holder: Any) -> float | str | None:
        quantity = holder.valueQuantity
        if quantity is not None and quantity.value is not None:
            unit = quantity.code if quantity.code else quantity.unit
            key = unit or NO_UNIT
            if quantity.system not in (None, UCUM) and quantity.code:
                key = f"{quantity.system}|{quantity.code}"
            linear = self.linear.get(name, {})
            if rule.units is not None and key not in linear:
                self.tally.refuse(
                    name,
                    f"unit '{key}' is not among the mapped units {sorted(rule.units)}",
                )
                return None
            return to_schema(linear, key, float(quantity.value))
        if holder.valueInteger is not None:
            return float(holder.valueInteger)
        if holder.valueBoolean is not None:
            return 1.0 if holder.valueBoolean else 0.0
        if holder.valueString is not None:
            return str(holder.valueString)
        coded = _codings(holder.valueCodeableConcept)
        if coded:
            return coded[0].split("|", 1)[1]
        self.tally.note(name, "observation without a value: ignored")
        return None

    def condition(self, resource: Condition) -> None:
        rule = self.mapping.label.condition
        if rule is None or not self.label_codes.intersection(_codings(resource.code)):
            self.tally.note("Condition", "code not in the label's codes: ignored")
            return
        onset = (
            _instant(resource.onsetDateTime)
            or _instant(resource.onsetPeriod.start if resource.onsetPeriod else None)
            or _instant(resource.recordedDate)
        )
        self.label_event(resource, onset, "Condition")

    def label_event(
        self, resource: Observation | Condition, moment: datetime | None, kind: str
    ) -> None:
        assert self.label_rule is not None
        if moment is None:
            self.tally.note(self.schema.label.name, f"{kind} without a time: ignored")
            return
        for row in self.linked(resource, kind) or ():
            if self.label_rule.contains(self.hours(row, moment)):
                self.labelled.add(row)

    def demographic(self, rule_name: str, rule: Demographic, row: _Row) -> object:
        person = self.patients[row.patient]
        if rule.patient == "age":
            born = person.born
            if born is None:
                return math.nan
            years = float(completed_years(born, row.start))
            return to_schema(self.linear.get(rule_name, {}), AGE_UNIT, years)
        if rule.patient == "gender":
            return person.gender if person.gender else math.nan
        return person.extensions.get(rule.url or "", math.nan)

    def frame(self) -> pd.DataFrame:
        columns: dict[str, list[object]] = {}
        for name, demographic in self.mapping.demographic().items():
            columns[name] = [self.demographic(name, demographic, row) for row in self.rows]
        for name, held in self.held.items():
            columns[name] = held.column()
        label = self.schema.label.name
        if self.mapping.label.encounter_outcome is not None:
            columns[label] = [math.nan if r.outcome is None else r.outcome for r in self.rows]
        else:
            columns[label] = [int(i in self.labelled) for i in range(len(self.rows))]
        return pd.DataFrame(columns)


def _extension_value(extension: Any) -> str | None:
    for attribute in ("valueCode", "valueString", "valueInteger"):
        value = getattr(extension, attribute, None)
        if value is not None:
            return str(value)
    if extension.valueCoding is not None and extension.valueCoding.code:
        return str(extension.valueCoding.code)
    coded = _codings(extension.valueCodeableConcept)
    return coded[0].split("|", 1)[1] if coded else None


_DEMOGRAPHICS = {"age", "gender", "extension"}


def read_fhir(folder: Path, mapping: ExtractMapping, schema: FeatureSchema) -> Extract:
    """Extract one row per index encounter from a FHIR bulk export folder.

    Raises :class:`FhirExportError` for a folder that is not an export, and
    :class:`fedcare.schema.mapping.MappingError` for a mapping that does not fit the schema;
    breaches in the data are returned in the extract (:meth:`Extract.checked` refuses them).
    """
    check_picks(mapping)
    unknown = sorted({d.patient for d in mapping.demographic().values()} - _DEMOGRAPHICS)
    if unknown:
        raise MappingError(
            f"mapping for site '{mapping.site}': patient fields {unknown} are not read from "
            f"FHIR (use {sorted(_DEMOGRAPHICS)})"
        )
    site_mapping = identity_mapping(mapping, schema)
    check_mapping(site_mapping, schema)
    reader = _Reader(mapping, schema, conversions(mapping, schema))
    files = export_files(folder)
    for path in files["Patient"]:
        for resource in _resources(path, "Patient", reader.tally):
            reader.patient(resource)
    for path in files["Encounter"]:
        for resource in _resources(path, "Encounter", reader.tally):
            reader.encounter(resource)
    reader.start_values()
    for path in files["Observation"]:
        for resource in _resources(path, "Observation", reader.tally):
            reader.observation(resource)
    for path in files["Condition"]:
        for resource in _resources(path, "Condition", reader.tally):
            reader.condition(resource)
    return Extract(
        reader.frame(), site_mapping, reader.tally.notice_list(), reader.tally.violation_list()
    )
