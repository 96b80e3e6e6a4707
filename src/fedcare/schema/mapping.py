"""Site mappings: from a hospital's own columns and units to the shared schema.

A mapping is applied at the site, before anything else touches the data. Every
rule is checked over the whole table and every breach is reported together, so
a data scientist fixes an extract once rather than once per error.

Nothing is changed silently. A column with ``values:`` must hold only listed
values; a raw value is listed when its text equals a key, or when both are
numbers and equal (``1.0`` matches ``"1"``: the same number, not a guess). A
value that breaks a rule is refused with the column, the raw values and their
counts, or, where the study says ``on_invalid: missing``, treated as missing and
still counted in :attr:`MappedTable.notices`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from fedcare.schema.features import (
    Censored,
    Feature,
    FeatureSchema,
    FeatureType,
    MissingRule,
    OnInvalid,
    Strict,
)
from fedcare.schema.images import IMAGE_ROOT, ImageError, image_path, load_image
from fedcare.schema.units import UnitError, canonical_unit, conversion
from fedcare.yamlfile import read_yaml_model

DEFAULT_MISSING_TOKENS: tuple[str, ...] = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "?")

Code = str | int | float
"""A schema value a local code maps to: a number, or a category's text."""

_SHOWN_VALUES = 5


def key_text(key: object) -> str:
    """A local code as text: the form `values:` keys and codes are compared in."""
    # YAML reads `{1: 0}` with an integer key; the key is the raw value's text.
    if isinstance(key, bool):
        raise ValueError(f"values key {key!r}: write the local code as text")
    return key if isinstance(key, str) else repr(key) if isinstance(key, float) else str(key)


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class ColumnMapping(Strict):
    """Where one schema field lives in the site's table, and how to read it.

    Either ``unit`` (converted to the schema's unit by pint, through the
    analyte's molar mass for mass/molar) or ``factor``/``offset`` (schema value =
    local value x factor + offset), not both.
    """

    column: str = Field(min_length=1)
    unit: str | None = Field(default=None, description="The local unit, e.g. mg/dL.")
    analyte: str | None = Field(
        default=None,
        description="The substance whose mass the local column counts, when it is not the "
        "schema's analyte (urea_nitrogen for a BUN column mapped to urea).",
    )
    factor: float | None = Field(default=None, description="schema = local x factor + offset.")
    offset: float | None = Field(
        default=None, description="Added after the factor (e.g. -32 for a shifted scale)."
    )
    values: dict[str, Code] | None = Field(
        default=None,
        description="Recode local values, e.g. {M: 0, F: 1}; any value not listed is invalid.",
    )

    @field_validator("values", mode="before")
    @classmethod
    def _keys_as_text(cls, value: object) -> object:
        if isinstance(value, dict):
            return {key_text(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        declared = self.factor is not None or self.offset is not None
        if declared and self.unit is not None:
            raise ValueError("give either unit or factor/offset, not both")
        if self.analyte is not None and self.unit is None:
            raise ValueError("analyte names the substance of the local unit: give unit too")
        for name, number in (("factor", self.factor), ("offset", self.offset)):
            if number is not None and not math.isfinite(number):
                raise ValueError(f"{name} must be a finite number")
        if self.factor == 0:
            raise ValueError("factor 0 would map every value to the offset")
        if self.values:
            seen: dict[float, str] = {}
            for key in self.values:
                number = _number(key)
                if number is not None and number in seen:
                    raise ValueError(
                        f"values keys '{seen[number]}' and '{key}' are the same number"
                    )
                if number is not None:
                    seen[number] = key
        return self

    @property
    def linear(self) -> tuple[float, float] | None:
        """The declared (factor, offset), or None."""
        if self.factor is None and self.offset is None:
            return None
        return (1.0 if self.factor is None else self.factor, self.offset or 0.0)


class EventMapping(Strict):
    """A time-to-event label: the event indicator and the follow-up time columns."""

    event: ColumnMapping | str = Field(
        description="The event indicator: 1 (or a code mapped to 1 by values) if it happened."
    )
    time: ColumnMapping | str = Field(
        description="Follow-up time; give its unit (days, weeks, months, years)."
    )

    def event_column(self) -> ColumnMapping:
        return _entry(self.event)

    def time_column(self) -> ColumnMapping:
        return _entry(self.time)


def _entry(entry: ColumnMapping | str) -> ColumnMapping:
    return ColumnMapping(column=entry) if isinstance(entry, str) else entry


class SiteMapping(Strict):
    """A site's mapping for one study schema. Kept at the site; never sent."""

    site: str = Field(min_length=1)
    features: dict[str, ColumnMapping | str] = Field(
        description=(
            "Per schema feature: the local column (a name, or a mapping with unit, factor "
            "or values)."
        )
    )
    label: EventMapping | ColumnMapping | str = Field(
        description="The label's column, or for a study with label.horizon its event and "
        "follow-up time columns."
    )
    attributes: dict[str, ColumnMapping | str] = Field(
        description="Per schema attribute (for subgroups only): the local column.",
        default_factory=dict,
    )
    missing_tokens: tuple[str, ...] = Field(
        default=DEFAULT_MISSING_TOKENS,
        description="Cell texts that mean missing; they replace the default list.",
    )

    def column(self, name: str) -> ColumnMapping:
        """The mapping for a schema feature, attribute or label name."""
        if name in self.features:
            return _entry(self.features[name])
        if name in self.attributes:
            return _entry(self.attributes[name])
        raise KeyError(name)

    def label_column(self) -> ColumnMapping:
        """The label's column; a time-to-event label's event column."""
        if isinstance(self.label, EventMapping):
            return self.label.event_column()
        return _entry(self.label)


@dataclass(frozen=True)
class Violation:
    """One broken rule: which column, which rule, how many rows."""

    column: str
    rule: str
    rows: int
    unit: str = "row"
    """What ``rows`` counts: rows of a table, or resources, lines or measurements of a source."""
    in_table: bool = True
    """``column`` is a table's column; else it names a field or resource type of a source."""

    def __str__(self) -> str:
        noun = self.unit if self.rows == 1 else f"{self.unit}s"
        where = f"column '{self.column}'" if self.in_table else self.column
        return f"{where}: {self.rule} ({self.rows} {noun})"


class DataValidationError(ValueError):
    """Site data that does not fit the schema. Nothing is trained or sent."""

    def __init__(
        self, site: str, violations: list[Violation], notices: tuple[Violation, ...] = ()
    ) -> None:
        self.site = site
        self.violations = violations
        self.notices = notices
        details = "\n".join(f"  - {v}" for v in violations)
        noted = "".join(f"\n  - {n}" for n in notices)
        super().__init__(
            f"site '{site}': data refused, {len(violations)} rule(s) broken; "
            f"nothing was trained or sent:\n{details}"
            + (f"\nnoted as well (not refused):{noted}" if notices else "")
        )

    def __reduce__(self) -> tuple[type[DataValidationError], tuple[object, ...]]:
        # Rebuilt from its parts, not its message: a site prepared in another process
        # raises it here unchanged (fedcare.simulation.preparation).
        return (type(self), (self.site, self.violations, self.notices))


class MappingError(ValueError):
    """A mapping file that is incomplete or inconsistent with the schema."""


@dataclass(frozen=True)
class MappedTable:
    """A site's table in the schema's columns and units, and what was done to fit it.

    ``notices`` lists every value that was set to missing (``on_invalid:
    missing``) and every row left out (patients censored before a label's
    horizon), with counts, so nothing changes without a record.
    """

    frame: pd.DataFrame
    notices: tuple[Violation, ...] = field(default=())


def load_mapping(path: Path) -> SiteMapping:
    """Read a site mapping from YAML."""
    return read_yaml_model(path, SiteMapping, "mapping", MappingError)


def _unit_problem(name: str, entry: ColumnMapping, feature: Feature) -> str | None:
    if entry.unit is None:
        return None
    if feature.unit is None:
        return f"feature '{name}' has no unit in the schema; drop the unit"
    try:
        conversion(entry.unit, feature.unit, feature.analyte, entry.analyte)
    except UnitError as exc:
        return f"feature '{name}': {exc}"
    return None


def check_mapping(mapping: SiteMapping, schema: FeatureSchema) -> None:
    """Refuse a mapping that misses a schema field, names unknown ones, or has bad units."""
    problems: list[str] = []
    wanted = {f.name for f in schema.features}
    missing = sorted(wanted - set(mapping.features))
    if missing:
        problems.append(f"no mapping for feature(s): {', '.join(missing)}")
    unknown = sorted(set(mapping.features) - wanted)
    if unknown:
        problems.append(f"mapping names feature(s) not in the schema: {', '.join(unknown)}")
    unknown_attrs = sorted(set(mapping.attributes) - {a.name for a in schema.attributes})
    if unknown_attrs:
        problems.append(f"mapping names attribute(s) not in the schema: {', '.join(unknown_attrs)}")
    for feature in schema.features:
        if feature.name not in mapping.features:
            continue
        entry = mapping.column(feature.name)
        problem = _unit_problem(feature.name, entry, feature)
        if problem:
            problems.append(problem)
        if entry.linear is not None and feature.type is not FeatureType.CONTINUOUS:
            problems.append(f"feature '{feature.name}': factor/offset need a continuous feature")
        if feature.type is FeatureType.IMAGE and entry.values:
            problems.append(f"feature '{feature.name}' is an image: no values to recode")
    for name in mapping.attributes:
        entry = mapping.column(name)
        if entry.unit is not None or entry.linear is not None:
            problems.append(f"attribute '{name}' is a label for subgroups: no unit or factor")
    problems.extend(_label_problems(mapping, schema))
    if problems:
        raise MappingError(f"mapping for site '{mapping.site}': " + "; ".join(problems))


def _label_problems(mapping: SiteMapping, schema: FeatureSchema) -> list[str]:
    timed = schema.label.horizon is not None
    if timed and not isinstance(mapping.label, EventMapping):
        return [
            f"the study's label '{schema.label.name}' is time-to-event "
            f"(horizon {schema.label.horizon:g} days): map it as label: {{event: COL, time: COL}}"
        ]
    if not timed and isinstance(mapping.label, EventMapping):
        return [
            f"the study's label '{schema.label.name}' has no horizon: map it to one column, "
            "or declare label.horizon in the study"
        ]
    if isinstance(mapping.label, EventMapping):
        time = mapping.label.time_column()
        if time.unit is None:
            return [f"label time column '{time.column}': give its unit (days, months, years)"]
        try:
            conversion(time.unit, "day")
        except UnitError as exc:
            return [f"label time column '{time.column}': {exc}"]
    return []


def _as_missing(series: pd.Series, tokens: tuple[str, ...]) -> pd.Series:
    """Local missing-value tokens (as text) become NaN; everything else is kept."""
    as_text = series.astype("string").str.strip()
    return series.where(~as_text.isin(tokens) & series.notna(), other=np.nan)


def _text(series: pd.Series) -> pd.Series:
    return series.astype("string").str.strip()


def _shown(raw: pd.Series, mask: pd.Series) -> str:
    """The distinct raw values under ``mask`` with their counts, most frequent first."""
    counts = _text(raw[mask]).value_counts()
    if len(counts) == 1:
        # One value: the row count after the rule already says how often.
        return f"'{counts.index[0]}'"
    parts = [f"'{value}' ({count})" for value, count in counts.head(_SHOWN_VALUES).items()]
    more = len(counts) - _SHOWN_VALUES
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _match(text: pd.Series, keys: list[str]) -> pd.Series:
    """For each cell, the key it equals as text, or failing that as a number; else NA."""
    matched = text.where(text.isin(keys))
    numeric_keys = {n: k for k in keys if (n := _number(k)) is not None}
    rest = matched.isna() & text.notna()
    if numeric_keys and rest.any():
        numbers = pd.to_numeric(text[rest], errors="coerce")
        matched[rest] = numbers.map(numeric_keys)
    return matched


class _Column:
    """One source column being checked; collects the breaches it finds."""

    def __init__(
        self,
        name: str,
        raw: pd.Series,
        on_invalid: OnInvalid,
        violations: list[Violation],
        notices: list[Violation],
    ) -> None:
        self.name = name
        self.raw = raw
        self.on_invalid = on_invalid
        self.violations = violations
        self.notices = notices

    def invalid(self, series: pd.Series, bad: pd.Series, rule: str) -> pd.Series:
        """Refuse or blank the cells under ``bad``, recording them with the raw values."""
        if not bad.any():
            return series
        detail = f"{rule}: {_shown(self.raw, bad)}"
        count = int(bad.sum())
        if self.on_invalid is OnInvalid.MISSING:
            self.notices.append(Violation(self.name, f"{detail}; set to missing", count))
        else:
            self.violations.append(Violation(self.name, detail, count))
        return series.where(~bad)

    def recode(self, values: Mapping[str, Code] | None) -> pd.Series:
        """Raw values through ``values``; unlisted ones are invalid."""
        if not values:
            return self.raw
        text = _text(self.raw)
        matched = _match(text, list(values))
        unlisted = text.notna() & matched.isna()
        listed = f"not listed in values {sorted(values)}"
        recoded = matched.map(lambda key: values[key], na_action="ignore").astype(object)
        return self.invalid(recoded, unlisted, listed)

    def numbers(self, series: pd.Series) -> pd.Series:
        numbers = pd.to_numeric(series, errors="coerce").astype("float64")
        return self.invalid(numbers, numbers.isna() & series.notna(), "not a number")

    def categories(self, series: pd.Series, categories: tuple[str, ...]) -> pd.Series:
        matched = _match(_text(series.astype(object)), list(categories))
        unknown = series.notna() & matched.isna()
        return self.invalid(matched, unknown, f"not among the categories {list(categories)}")


def clean_numbers(
    feature: Feature, entry: ColumnMapping, raw: pd.Series, tokens: frozenset[str]
) -> pd.Series | None:
    """A numeric feature's column of text cells in numpy, when no rule has anything to say
    about it; else None, and :func:`_map_feature` maps it and words what it found.

    The same result as :func:`_map_feature` (the tests compare the two): tokens are
    matched on the stripped text, numbers parsed by ``pd.to_numeric``, units converted
    by the same arithmetic. A table of a few hundred rows costs pandas more in per-call
    overhead than in work, and a simulation maps hundreds of sites.
    """
    if feature.type not in (FeatureType.CONTINUOUS, FeatureType.BINARY) or entry.values:
        return None
    cells = raw.to_numpy()
    if cells.dtype != object or not all(type(cell) is str for cell in cells):
        return None
    missing = np.fromiter((cell.strip() in tokens for cell in cells), dtype=bool, count=len(cells))
    if missing.any() and feature.missing.rule is MissingRule.REFUSE:
        return None
    text = cells.copy()
    text[missing] = np.nan
    numbers = np.asarray(pd.to_numeric(text, errors="coerce"), dtype=np.float64)
    given = ~missing
    if np.isnan(numbers[given]).any():
        return None
    if feature.type is FeatureType.BINARY:
        if not np.isin(numbers[given], [0.0, 1.0]).all():
            return None
    else:
        linear = entry.linear
        if linear is None and entry.unit is not None and feature.unit is not None:
            linear = conversion(entry.unit, feature.unit, feature.analyte, entry.analyte)
        if linear is not None:
            factor, offset = linear
            numbers = numbers * factor + offset
    if feature.range is not None:
        low, high = feature.range
        if ((numbers[given] < low) | (numbers[given] > high)).any():
            return None
    return pd.Series(numbers, index=raw.index, dtype=np.float64)


def _map_feature(feature: Feature, entry: ColumnMapping, column: _Column) -> pd.Series:
    out = column.recode(entry.values)
    if feature.type is FeatureType.CATEGORICAL:
        assert feature.categories is not None
        out = column.categories(out, feature.categories)
    else:
        out = column.numbers(out)
        if feature.type is FeatureType.BINARY:
            out = column.invalid(out, out.notna() & ~out.isin([0.0, 1.0]), "binary, not 0 or 1")
        else:
            out = _to_schema_units(feature, entry, out)
        if feature.range is not None:
            low, high = feature.range
            unit = f" {canonical_unit(feature.unit)}" if feature.unit else ""
            converted = entry.unit is not None or entry.linear is not None
            note = f" after conversion to{unit}" if converted and unit else unit
            out = column.invalid(
                out,
                out.notna() & ((out < low) | (out > high)),
                f"outside the valid range [{low:g}, {high:g}]{note} for '{feature.name}'",
            )
    if feature.missing.rule is MissingRule.REFUSE:
        # Count cells that were empty in the extract, not values refused above.
        empty = int(column.raw.isna().sum())
        if empty:
            column.violations.append(
                Violation(
                    column.name, f"missing value, and '{feature.name}' may not be missing", empty
                )
            )
    return out


def _map_image(feature: Feature, column: _Column, root: Path | None) -> pd.Series:
    """Each cell's image as a (height, width) uint8 array; every unreadable, misplaced or
    mis-sized image is reported by reason, with the first paths and the count."""
    assert feature.shape is not None
    empty = column.raw.isna()
    if empty.any():
        column.violations.append(
            Violation(
                column.name,
                f"missing image, and '{feature.name}' may not be missing",
                int(empty.sum()),
            )
        )
    if root is None:
        column.violations.append(
            Violation(
                column.name,
                "image paths need an image folder: give the folder holding manifest.csv as "
                "the data",
                int((~empty).sum()),
            )
        )
        return pd.Series([None] * len(column.raw), index=column.raw.index, dtype=object)
    images: list[object] = []
    failed: dict[str, list[str]] = {}
    for cell in column.raw:
        if cell is None or (isinstance(cell, float) and math.isnan(cell)):
            images.append(None)
            continue
        try:
            images.append(load_image(image_path(root, str(cell).strip()), feature.shape))
        except ImageError as exc:
            failed.setdefault(str(exc), []).append(str(cell))
            images.append(None)
    for rule, cells in failed.items():
        shown = ", ".join(f"'{c}'" for c in cells[:_SHOWN_VALUES])
        more = len(cells) - _SHOWN_VALUES
        shown += f" and {more} more" if more > 0 else ""
        column.violations.append(Violation(column.name, f"{rule}: {shown}", len(cells)))
    return pd.Series(images, index=column.raw.index, dtype=object)


def _to_schema_units(feature: Feature, entry: ColumnMapping, values: pd.Series) -> pd.Series:
    linear = entry.linear
    if linear is None and entry.unit is not None and feature.unit is not None:
        linear = conversion(entry.unit, feature.unit, feature.analyte, entry.analyte)
    if linear is None:
        return values
    factor, offset = linear
    return values * factor + offset


def _binary(column: _Column, entry: ColumnMapping, what: str) -> pd.Series:
    numbers = column.numbers(column.recode(entry.values))
    return column.invalid(
        numbers, numbers.notna() & ~numbers.isin([0.0, 1.0]), f"{what}, not 0 or 1"
    )


def clean_label(entry: ColumnMapping, raw: pd.Series, tokens: frozenset[str]) -> pd.Series | None:
    """A 0/1 label column in numpy when every cell is exactly 0 or 1 (text ``"0"`` or
    ``"1"``, or integers) and the mapping recodes nothing; else None, and :func:`_label`
    reads it and words what it found. The same labels as :func:`_label` (tested)."""
    if entry.values or tokens & {"0", "1"}:
        return None
    cells = raw.to_numpy()
    if cells.dtype.kind in "iu":
        if not np.isin(cells, (0, 1)).all():
            return None
        return pd.Series(cells.astype(np.int64), index=raw.index)
    if cells.dtype != object:
        return None
    ones = np.empty(len(cells), dtype=np.int64)
    for i, cell in enumerate(cells):
        if cell == "1":
            ones[i] = 1
        elif cell == "0":
            ones[i] = 0
        else:
            return None
    return pd.Series(ones, index=raw.index)


def apply_mapping(
    frame: pd.DataFrame,
    mapping: SiteMapping,
    schema: FeatureSchema,
    features_only: bool = False,
    label: bool = True,
) -> MappedTable:
    """Turn a site's table into the schema's columns and units, or refuse it.

    The frame has one column per feature (float, or text for categorical), per
    attribute (text) and the label (0/1 integers); with ``features_only`` (new
    patients to score) only the features, by the same rules; with ``label=False``
    (new patients whose outcomes are not known yet) the features and attributes.
    Raises :class:`DataValidationError` listing every broken rule.
    """
    check_mapping(mapping, schema)
    if frame.empty:
        raise DataValidationError(mapping.site, [Violation("(table)", "the table has no rows", 0)])
    violations: list[Violation] = []
    notices: list[Violation] = []
    out: dict[str, pd.Series] = {}

    def source(entry: ColumnMapping, on_invalid: OnInvalid = OnInvalid.REFUSE) -> _Column | None:
        if entry.column not in frame.columns:
            violations.append(Violation(entry.column, "column not found in the data", len(frame)))
            return None
        raw = _as_missing(frame[entry.column], mapping.missing_tokens)
        return _Column(entry.column, raw, on_invalid, violations, notices)

    root = frame.attrs.get(IMAGE_ROOT)
    tokens = frozenset(mapping.missing_tokens)
    for feature in schema.features:
        entry = mapping.column(feature.name)
        if entry.column in frame.columns:
            clean = clean_numbers(feature, entry, frame[entry.column], tokens)
            if clean is not None:
                out[feature.name] = clean
                continue
        column = source(entry, feature.on_invalid)
        if column is None:
            continue
        if feature.type is FeatureType.IMAGE:
            out[feature.name] = _map_image(feature, column, None if root is None else Path(root))
        else:
            out[feature.name] = _map_feature(feature, entry, column)

    for attribute in () if features_only else schema.attributes:
        if attribute.name not in mapping.attributes:
            continue
        entry = mapping.column(attribute.name)
        column = source(entry)
        if column is not None:
            text = column.recode(entry.values)
            if attribute.categories is not None:
                text = column.categories(text, attribute.categories)
            out[attribute.name] = _text(text.astype(object))

    keep = (
        None
        if features_only or not label
        else _label(mapping, schema, frame, source, violations, notices, out)
    )
    if violations:
        raise DataValidationError(mapping.site, violations)
    mapped = pd.DataFrame(out, index=frame.index)
    if keep is not None:
        mapped = mapped[keep]
    return MappedTable(mapped.reset_index(drop=True), tuple(notices))


def _label(
    mapping: SiteMapping,
    schema: FeatureSchema,
    frame: pd.DataFrame,
    source: Callable[[ColumnMapping], _Column | None],
    violations: list[Violation],
    notices: list[Violation],
    out: dict[str, pd.Series],
) -> pd.Series | None:
    """Put the 0/1 label in ``out``; return the rows to keep when some are left out."""
    name = schema.label.name
    event_entry = mapping.label_column()
    horizon = schema.label.horizon
    timed = horizon is not None and isinstance(mapping.label, EventMapping)
    if not timed and event_entry.column in frame.columns:
        clean = clean_label(
            event_entry, frame[event_entry.column], frozenset(mapping.missing_tokens)
        )
        if clean is not None:
            out[name] = clean
            return None
    event_column = source(event_entry)
    if event_column is None:
        return None
    event = _binary(event_column, event_entry, "label")
    if event_column.raw.isna().any():
        violations.append(
            Violation(event_entry.column, "label is missing", int(event_column.raw.isna().sum()))
        )
    if not timed:
        out[name] = event.fillna(0).clip(0, 1).astype("int64")
        return None
    # Both hold, as timed says; spelled out for the type checker.
    assert isinstance(mapping.label, EventMapping)
    assert horizon is not None
    time_entry = mapping.label.time_column()
    time_column = source(time_entry)
    if time_column is None:
        return None
    assert time_entry.unit is not None  # check_mapping insists on it
    factor, offset = conversion(time_entry.unit, "day")
    days = time_column.numbers(time_column.raw) * factor + offset
    days = time_column.invalid(days, days < 0, "follow-up time is negative")
    if time_column.raw.isna().any():
        violations.append(
            Violation(
                time_entry.column, "follow-up time is missing", int(time_column.raw.isna().sum())
            )
        )
    within = (event == 1) & (days <= horizon)
    censored = (event == 0) & (days < horizon)
    if censored.any():
        rule = f"censored before the horizon of {horizon:g} days"
        if schema.label.censored is Censored.REFUSE:
            violations.append(
                Violation(time_entry.column, f"{rule} (censored: refuse)", int(censored.sum()))
            )
        else:
            notices.append(
                Violation(time_entry.column, f"{rule}: row left out", int(censored.sum()))
            )
    out[name] = within.astype("int64")
    return ~censored
