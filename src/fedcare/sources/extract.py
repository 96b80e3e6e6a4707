"""What FHIR and OMOP extraction share: the mapping's checks against the schema, the
per-value unit conversions, the choice among values in a window, and the table it ends in.

An extracted table has one column per schema field, already in the schema's units
(units may differ from one measurement to the next, so each value is converted as
it is read). It then goes through :func:`fedcare.schema.mapping.apply_mapping` with
an identity mapping, so ranges, missing values, categories and labels are checked
exactly as for a CSV file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

import pandas as pd

from fedcare.schema.features import FeatureSchema, FeatureType
from fedcare.schema.mapping import (
    ColumnMapping,
    DataValidationError,
    MappingError,
    SiteMapping,
    Violation,
    apply_mapping,
)
from fedcare.schema.units import UnitError, conversion
from fedcare.sources.mapping import Demographic, ExtractMapping, Measured, Pick

NO_UNIT = "(none)"
"""How a value without a unit is named in reports."""

Linear = tuple[float, float]


def _schema_fields(schema: FeatureSchema) -> dict[str, tuple[str | None, str | None, FeatureType]]:
    """name -> (unit, analyte, type) for every feature and attribute."""
    fields: dict[str, tuple[str | None, str | None, FeatureType]] = {
        f.name: (f.unit, f.analyte, f.type) for f in schema.features
    }
    for attribute in schema.attributes:
        fields[attribute.name] = (None, None, FeatureType.CATEGORICAL)
    return fields


def conversions(mapping: ExtractMapping, schema: FeatureSchema) -> dict[str, dict[str, Linear]]:
    """Per measured field, each accepted unit's (factor, offset) into the schema's unit.

    Raises :class:`MappingError` naming every field whose units are missing or do not
    convert, and a time-to-event label, which an extract cannot give yet.
    """
    problems: list[str] = []
    if schema.label.horizon is not None:
        problems.append(
            f"the study's label '{schema.label.name}' is time-to-event; FHIR and OMOP "
            "extracts give 0/1 labels only: export a table with event and time columns"
        )
    fields = _schema_fields(schema)
    out: dict[str, dict[str, Linear]] = {}
    for name, rule in mapping.measured().items():
        if name not in fields:
            continue  # check_mapping names it
        unit, analyte, kind = fields[name]
        if kind is FeatureType.IMAGE:
            problems.append(f"feature '{name}' is an image: read images from an image folder")
            continue
        if unit is None:
            out[name] = dict.fromkeys(rule.units or {}, (1.0, 0.0))
            continue
        if not rule.units:
            problems.append(f"feature '{name}' is in {unit}: list the units its values come in")
            continue
        out[name] = {}
        for key, local in rule.units.items():
            try:
                out[name][key] = conversion(local, unit, analyte)
            except UnitError as exc:
                problems.append(f"feature '{name}', unit {key}: {exc}")
    for name, demographic in mapping.demographic().items():
        if name in fields and demographic.patient == "age" and fields[name][0] is not None:
            try:
                out[name] = {AGE_UNIT: conversion(AGE_UNIT, fields[name][0] or AGE_UNIT)}
            except UnitError as exc:
                problems.append(f"feature '{name}' (age): {exc}")
    if problems:
        raise MappingError(f"mapping for site '{mapping.site}': " + "; ".join(problems))
    return out


AGE_UNIT = "years"
"""What an age from a birth date counts; converted to the schema's unit like any value."""


def to_schema(linear: dict[str, Linear], unit: str, number: float) -> float:
    """``number`` in ``unit`` converted with that unit's (factor, offset); exact when the
    unit is already the schema's."""
    factor, offset = linear.get(unit, (1.0, 0.0))
    return number if (factor, offset) == (1.0, 0.0) else number * factor + offset


def completed_years(born: date, moment: datetime) -> int:
    """Age in whole years at ``moment``, as a birthday counts it."""
    day = moment.date()
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def identity_mapping(mapping: ExtractMapping, schema: FeatureSchema) -> SiteMapping:
    """The :class:`SiteMapping` that reads an extracted table: each field from its own
    column, coded values through the mapping's ``values``, nothing treated as a token."""

    def entry(name: str, rule: Measured | Demographic) -> ColumnMapping:
        return ColumnMapping(column=name, values=rule.values)

    label = schema.label.name
    outcome = mapping.label.encounter_outcome
    return SiteMapping(
        site=mapping.site,
        features={name: entry(name, rule) for name, rule in mapping.features.items()},
        label=ColumnMapping(column=label, values=None if outcome is None else outcome.values),
        attributes={name: entry(name, rule) for name, rule in mapping.attributes.items()},
        missing_tokens=(),
    )


def better(
    pick: Pick, held: tuple[float, float | str] | None, time: float, value: float | str
) -> bool:
    """Whether ``(time, value)`` replaces the value held for a row. Ties in time keep the
    value read first, so the result does not depend on anything but the data's order."""
    if held is None:
        return True
    held_time, held_value = held
    if pick is Pick.FIRST:
        return time < held_time
    if pick is Pick.LAST:
        return time > held_time
    # min/max rank numbers only: coded fields are refused them (check_picks), and a text
    # value for a numeric field is refused before it gets here.
    assert isinstance(value, float)
    assert isinstance(held_value, float)
    return value < held_value if pick is Pick.MIN else value > held_value


@dataclass
class Tally:
    """Counts of what an extraction left out or refused, by rule, for the report."""

    notices: dict[tuple[str, str, str], int] = field(default_factory=dict)
    violations: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def note(self, column: str, rule: str, count: int = 1, unit: str = "resource") -> None:
        """Count something left out: ``column`` names the field or resource type."""
        key = (column, rule, unit)
        self.notices[key] = self.notices.get(key, 0) + count

    def refuse(self, column: str, rule: str, count: int = 1, unit: str = "resource") -> None:
        """Count a breach: the extract is refused."""
        key = (column, rule, unit)
        self.violations[key] = self.violations.get(key, 0) + count

    @staticmethod
    def _listed(counts: dict[tuple[str, str, str], int]) -> tuple[Violation, ...]:
        return tuple(
            Violation(column, rule, rows, unit, in_table=False)
            for (column, rule, unit), rows in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        )

    def notice_list(self) -> tuple[Violation, ...]:
        return self._listed(self.notices)

    def violation_list(self) -> tuple[Violation, ...]:
        return self._listed(self.violations)


@dataclass(frozen=True)
class Extract:
    """An extracted table (one row per index event) and what was left out or refused."""

    frame: pd.DataFrame
    mapping: SiteMapping
    notices: tuple[Violation, ...]
    violations: tuple[Violation, ...]

    def checked(self, schema: FeatureSchema) -> Extract:
        """This extract if nothing was refused; else raise :class:`DataValidationError`
        listing the extraction's breaches together with those the schema checks find."""
        if not self.violations:
            return self
        found = list(self.violations)
        if not self.frame.empty:
            try:
                apply_mapping(self.frame, self.mapping, schema)
            except DataValidationError as exc:
                found.extend(exc.violations)
        raise DataValidationError(self.mapping.site, found, self.notices)


def check_picks(mapping: ExtractMapping) -> None:
    """Refuse min/max over coded values: there is no order to take them by."""
    bad = [
        name
        for name, rule in mapping.measured().items()
        if rule.values and rule.pick in (Pick.MIN, Pick.MAX)
    ]
    if bad:
        raise MappingError(
            f"mapping for site '{mapping.site}': {', '.join(bad)} are coded values: "
            "pick first or last, not min or max"
        )
